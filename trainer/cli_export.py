"""CLI: ``tuneloop export model VERSION --format gguf-...`` and ``tuneloop export tools``.

``register(sub)`` is called by trainer/cli.py; the ``export`` group is shared with monitoring's ``export logs``
(:func:`tuneloop.cli.add_group` returns a group another area added). The work is
:mod:`tuneloop.trainer.export_gguf` and :mod:`tuneloop.trainer.llamacpp`, imported in the handlers.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from tuneloop.cli import add_group

if TYPE_CHECKING:
    from tuneloop.cli import Context

FORMAT_NAMES = ("gguf-f16", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k_m", "gguf-q4_k_m")  # trainer.export_gguf.FORMATS


def register(sub: argparse._SubParsersAction) -> None:
    g = add_group(sub, "export", "export data for other tools and for many-replica deployments")
    p = g.add_parser(
        "model",
        help="a version as a GGUF file for llama.cpp, Ollama and LM Studio, smoke-tested against its parent",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Convert a registered version with llama.cpp's own converter (pinned: llama-cpp-python's vendored "
            "llama.cpp, built once into the tool cache), quantize it, then load it in llama.cpp and measure it "
            "against the version on its test split: token F1 of greedy answers, perplexity of the reference "
            "answers, tokens/s. A manifest (sizes, hashes, converter version, chat-template hash, the numbers) is "
            "written beside the file. Within the budget the file is registered as a version of kind gguf (lineage "
            "to its parent); over it, it is kept and flagged, not registered, and the command exits 1. An adapter "
            "version is merged into its base first."
        ),
        epilog=(
            "formats:\n"
            "  gguf-f16      16-bit floats (converter)\n"
            "  gguf-q8_0     8-bit blocks (converter); about a quarter of fp32\n"
            "  gguf-q6_k, gguf-q5_k_m, gguf-q4_k_m   k-quants (converter f16, then llama-quantize)\n"
            "examples:\n"
            "  tuneloop export model chat-v2 --format gguf-q8_0\n"
            "  tuneloop export model chat-v2 --format gguf-q4_k_m --max-metric-drop 0.05 --max-ppl-increase 0.2\n"
            "  ollama create chat-v2 -f Modelfile   # FROM ./chat-v2-gguf-q8_0.gguf"
        ),
    )
    p.add_argument("version", help="the version to export (adapter, merged or base)")
    p.add_argument("--format", required=True, choices=FORMAT_NAMES, help="GGUF type (see below)")
    p.add_argument("--limit", type=int, default=32, help="test-split examples measured (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length measured (default 32)")
    p.add_argument(
        "--max-metric-drop", type=float, default=0.02, help="budget: largest token-F1 drop vs the parent (0.02)"
    )
    p.add_argument(
        "--max-ppl-increase", type=float, default=0.05, help="budget: largest relative perplexity rise (0.05)"
    )
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(handler=cmd_export_model)

    t = g.add_parser(
        "tools",
        help="build the pinned llama.cpp (converter, quantize tool, GGUF runtime) now, once per machine",
        description="Download llama-cpp-python's sdist (it vendors llama.cpp) and build its library and "
        "llama-quantize for this CPU into the tool cache ($TUNELOOP_LLAMA_CPP, else beside the model cache). "
        "`export model` does it on first use; `make setup EXPORT=1` runs this.",
    )
    t.set_defaults(handler=cmd_export_tools)


def cmd_export_model(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.errors import UserError
    from tuneloop.trainer.export_gguf import ExportBudget, export_gguf

    if args.limit < 1 or args.max_new_tokens < 1:
        raise UserError("--limit and --max-new-tokens must be >= 1")
    if args.max_metric_drop < 0 or args.max_ppl_increase < 0:
        raise UserError("--max-metric-drop and --max-ppl-increase must be >= 0")
    budget = ExportBudget(max_metric_drop=args.max_metric_drop, max_ppl_increase=args.max_ppl_increase)
    say = (lambda m: None) if args.json else (lambda m: print(m, flush=True))
    res = export_gguf(ctx.db, ctx.settings, args.version, args.format, budget, args.limit, args.max_new_tokens, say=say)
    if args.json:
        print(json.dumps({**res.manifest, "path": str(res.path)}, indent=2))
    else:
        print(res.summary())
        if res.registered is not None:
            print(f"registered {res.registered.name} (kind gguf, parent {res.version})")
    return 0 if res.passed else 1


def cmd_export_tools(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.trainer.llamacpp import ensure

    t = ensure(ctx.settings.paths.models_path)
    print(f"llama.cpp ready: {t.root}")
    return 0
