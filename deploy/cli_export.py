"""CLI: ``tuneloop export model VERSION --format ...`` and ``tuneloop export tools``.

It lives in ``deploy`` because it composes two areas: the exports themselves (``trainer``) and vLLM's offline
engine that measures int8 / int4 exports (``server.offline_engine``, handed in as the generator, as the gate does).
``register(sub)`` is called by deploy/cli.py; the ``export`` group is shared with monitoring's ``export logs``
(:func:`tuneloop.cli.add_group` returns a group another area added). The work is
:mod:`tuneloop.trainer.export_gguf` (GGUF, :mod:`tuneloop.trainer.llamacpp`) and
:mod:`tuneloop.trainer.export_quant` (int8 / int4 for vLLM, :mod:`tuneloop.trainer.quant_tool`), imported in the
handlers.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from tuneloop.cli import add_group

if TYPE_CHECKING:
    from tuneloop.cli import Context

#: trainer.export_gguf.FORMATS, then trainer.export_quant.FORMATS
GGUF_FORMATS = ("gguf-f16", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k_m", "gguf-q4_k_m", "gguf-lora")
QUANT_FORMATS = ("int8-w8a8", "int4-w4a16")


def register(sub: argparse._SubParsersAction) -> None:
    g = add_group(sub, "export", "export data for other tools and for many-replica deployments")
    p = g.add_parser(
        "model",
        help="a version as GGUF (llama.cpp, Ollama, LM Studio) or int8/int4 weights vLLM serves, smoke-tested and "
        "measured against its parent",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "GGUF: convert a registered version with llama.cpp's own converter (pinned: llama-cpp-python's vendored "
            "llama.cpp, built once into the tool cache), quantize it, then load it in llama.cpp and measure it "
            "against the version on its test split. int8/int4: quantize it with llm-compressor (pinned, in its own "
            "package overlay), calibrated on the version's train split, then load it in vLLM and measure it there "
            "against the parent. Measured: token F1 of greedy answers, perplexity of the reference answers, "
            "tokens/s. A manifest (sizes, hashes, tool version, chat-template hash, the numbers) is written beside "
            "the export. Within the budget the export is registered as a version (kind gguf, or quantized, which "
            "tuneloop serves, gates and canaries like any version) with lineage to its parent; over it, it is kept "
            "and flagged, not registered, and the command exits 1. An adapter version is merged into its base "
            "first, except for gguf-lora."
        ),
        epilog=(
            "formats:\n"
            "  gguf-f16      16-bit floats (converter)\n"
            "  gguf-q8_0     8-bit blocks (converter); about a quarter of fp32\n"
            "  gguf-q6_k, gguf-q5_k_m, gguf-q4_k_m   k-quants (converter f16, then llama-quantize)\n"
            "  gguf-lora     a LoRA adapter version as a GGUF LoRA (f16), measured on its base as GGUF f16\n"
            "  int8-w8a8     int8 weights and activations (SmoothQuant + GPTQ), served by vLLM (CPU: bfloat16)\n"
            "  int4-w4a16    int4 weights in groups, 16-bit activations (GPTQ), served by vLLM\n"
            "examples:\n"
            "  tuneloop export model chat-v2 --format gguf-q8_0\n"
            "  tuneloop export model chat-v2 --format gguf-q4_k_m --max-metric-drop 0.05 --max-ppl-increase 0.2\n"
            "  ollama create chat-v2 -f Modelfile   # FROM ./chat-v2-gguf-q8_0.gguf\n"
            "  tuneloop export model chat-v2 --format gguf-lora   # Modelfile: FROM <base gguf>, ADAPTER <the file>\n"
            "  tuneloop export model chat-v2 --format int8-w8a8 && tuneloop serve --model chat-v2-int8-w8a8"
        ),
    )
    p.add_argument("version", help="the version to export (adapter, merged or base)")
    p.add_argument("--format", required=True, choices=GGUF_FORMATS + QUANT_FORMATS, help="export format (see below)")
    p.add_argument("--limit", type=int, default=32, help="test-split examples measured (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length measured (default 32)")
    p.add_argument(
        "--max-metric-drop", type=float, default=0.02, help="budget: largest token-F1 drop vs the parent (0.02)"
    )
    p.add_argument(
        "--max-ppl-increase", type=float, default=0.05, help="budget: largest relative perplexity rise (0.05)"
    )
    p.add_argument(
        "--golden",
        metavar="FILE",
        default=None,
        help="golden prompts both the export and its parent answer (default: deploy.gate_golden, if set)",
    )
    p.add_argument(
        "--max-golden-drop",
        type=float,
        default=0.0,
        help="budget: largest drop of the golden pass rate (0.0: no golden prompt the parent passes may fail)",
    )
    p.add_argument(
        "--calibration-samples", type=int, default=64, help="int8/int4: train-split rows that calibrate (default 64)"
    )
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(handler=cmd_export_model)

    t = g.add_parser(
        "tools",
        help="install the pinned export tools now, once per machine: llama.cpp (GGUF) and llm-compressor (int8/int4)",
        description="Download llama-cpp-python's sdist (it vendors llama.cpp) and build its library and "
        "llama-quantize for this CPU into the tool cache ($TUNELOOP_LLAMA_CPP, else beside the model cache); "
        "install llm-compressor and the versions it pins into its own overlay ($TUNELOOP_LLMCOMPRESSOR, else "
        "beside it), out of tuneloop's environment. `export model` does each on first use; `make setup EXPORT=1` "
        "runs this.",
    )
    t.set_defaults(handler=cmd_export_tools)


def cmd_export_model(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.errors import UserError
    from tuneloop.trainer.export_common import ExportBudget

    if args.limit < 1 or args.max_new_tokens < 1:
        raise UserError("--limit and --max-new-tokens must be >= 1")
    if args.max_metric_drop < 0 or args.max_ppl_increase < 0 or args.max_golden_drop < 0:
        raise UserError("--max-metric-drop, --max-ppl-increase and --max-golden-drop must be >= 0")
    budget = ExportBudget(
        max_metric_drop=args.max_metric_drop,
        max_ppl_increase=args.max_ppl_increase,
        max_golden_drop=args.max_golden_drop,
    )
    from tuneloop.trainer.evaluate import load_golden

    golden = load_golden(args.golden or ctx.settings.deploy.gate_golden or None)
    say = (lambda m: None) if args.json else (lambda m: print(m, flush=True))
    if args.format in QUANT_FORMATS:
        from tuneloop.server.offline_engine import OfflineGenerator
        from tuneloop.trainer.export_quant import export_quantized

        with OfflineGenerator(ctx.settings.engine) as gen:
            res = export_quantized(
                ctx.db, ctx.settings, args.version, args.format, gen, budget, args.limit, args.max_new_tokens,
                args.calibration_samples, say=say, golden=golden,
            )  # fmt: skip
    else:
        from tuneloop.trainer.export_gguf import export_gguf

        res = export_gguf(
            ctx.db, ctx.settings, args.version, args.format, budget, args.limit, args.max_new_tokens, say=say,
            golden=golden,
        )  # fmt: skip
    if args.json:
        print(json.dumps({**res.manifest, "path": str(res.path)}, indent=2))
    else:
        print(res.summary())
        if res.registered is not None:
            print(f"registered {res.registered.name} (kind {res.registered.kind}, parent {res.version})")
    return 0 if res.passed else 1


def cmd_export_tools(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.trainer import llamacpp, quant_tool

    t = llamacpp.ensure(ctx.settings.paths.models_path)
    print(f"llama.cpp ready: {t.root}")
    q = quant_tool.ensure(ctx.settings.paths.models_path)
    print(f"llm-compressor ready: {q.root}")
    return 0
