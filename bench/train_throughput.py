"""Training throughput: ``tuneloop train`` (default config) vs a plain TRL SFTTrainer script.

Both sides fine-tune the same model (SmolLM2-135M-Instruct by default) with the
same LoRA adapter (r=8, alpha=16, q/k/v/o), batch size, learning rate, schedule,
seed and number of steps on the same ~200 chatterbot conversations, in fresh
subprocesses, one after the other, in the same run:

* ``tuneloop``: the real CLI (``tuneloop train ... --json``) with its defaults:
  padding-free batches, fp32 on CPU, answer-only loss incl. EOS.
* ``trl-default``: ``SFTTrainer`` with ``SFTConfig`` defaults (padded batches)
  except ``bf16=False`` (bf16 is unusable on CPUs without bf16 instructions) and
  ``gradient_checkpointing`` set like tuneloop's (False) so the comparison
  isolates batching; the data is given in TRL's own conversational
  prompt/completion format, so both sides optimise the same answer-only loss.

Metric: non-pad tokens/s = TRL's ``num_tokens`` (attention-mask sum when padded,
sequence length when padding-free) / ``train_runtime``. Also reported: final
loss (mean of the last 5 logged steps) and peak RSS of each subprocess
(``ru_maxrss`` from ``os.wait4``).

Sides alternate (A B A B) ``--repeats`` times and each side's best run counts,
so background load on a shared machine hits both alike.

    python bench/train_throughput.py [--steps 30] [--rows 200] [--repeats 2] [--base smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def run_child(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float, str]:
    """Run ``cmd``; return (exit status, peak RSS MiB of that child, stdout)."""
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        out = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, ru.ru_maxrss / 1024.0, out


def baseline(args) -> None:
    """The plain TRL script (runs in its own process)."""
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    dd = load_from_disk(str(Path(args.dataset_dir) / "data"))
    ds = dd["train"].map(
        lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
        remove_columns=dd["train"].column_names,
    )
    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    cfg = SFTConfig(
        output_dir=args.out,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        max_steps=args.steps,
        seed=42,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    peft = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    tr = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft)
    res = tr.train()
    logs = tr.state.log_history
    losses = [e["loss"] for e in logs if "loss" in e]
    toks = [e["num_tokens"] for e in logs if "num_tokens" in e]
    print(
        json.dumps(
            {
                "num_tokens": int(toks[-1]),
                "train_runtime_s": float(res.metrics["train_runtime"]),
                "losses": losses,
                "steps": tr.state.global_step,
            }
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per side (default 30)")
    ap.add_argument("--rows", type=int, default=200, help="chatterbot conversations (default 200)")
    ap.add_argument("--base", default="smollm2-135m-instruct", help="base model name or folder")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side, alternating (default 2); the best counts")
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dataset-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline:
        baseline(args)
        return 0

    from tuneloop.trainer.bootstrap import resolve_base

    work = Path(tempfile.mkdtemp(prefix="tl-bench-train-"))
    env = dict(os.environ, TUNELOOP_HOME=str(work / "home"), TOKENIZERS_PARALLELISM="false")
    models = Path(os.environ.get("TUNELOOP_MODEL_CACHE", Path.home() / ".cache" / "tuneloop" / "models"))
    base = str(resolve_base(args.base, models))
    tl = str(VENV_BIN / "tuneloop")
    subprocess.run(
        [tl, "data", "corpus", "chatterbot-corpus", "-o", str(work / "chat.jsonl"), "--limit", str(args.rows)],
        env=env,
        check=True,
        capture_output=True,
    )
    r = subprocess.run(
        [
            tl,
            "data",
            "prepare",
            str(work / "chat.jsonl"),
            "--name",
            "bench",
            "--base",
            base,
            "--split",
            "100/0/0",
            "--json",
            "--no-progress",
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    ds = json.loads(r.stdout)
    ds_path = ds.get("path") or ds["dataset"]["path"]
    print(
        f"dataset {ds.get('id')} ({(ds.get('rows') or {}).get('train')} train rows), base {base}, {args.steps} steps per side",
        flush=True,
    )

    def side_a(i: int) -> dict:
        t0 = time.monotonic()
        rc, rss, out = run_child(
            [
                tl,
                "train",
                f"base={base}",
                f"dataset={ds_path}",
                f"name=bench-tuneloop-{i}",
                f"max_steps={args.steps}",
                "save_steps=0",
                "eval_steps=0",
                "--quiet",
                "--json",
            ],
            env,
            work / f"tuneloop-{i}.log",
        )
        if rc != 0:
            raise SystemExit(f"tuneloop train failed (exit {rc}); see {work / f'tuneloop-{i}.log'}")
        m = json.loads(out[out.index("{\n") :])["metrics"]
        hist = json.loads((work / "home" / "runs" / f"bench-tuneloop-{i}" / "loss.json").read_text())
        return {
            "num_tokens": m["num_tokens"],
            "train_runtime_s": m["train_runtime_s"],
            "rss": rss,
            "losses": [e["loss"] for e in hist if e.get("loss") is not None],
            "wall": time.monotonic() - t0,
        }

    def side_b(i: int) -> dict:
        t0 = time.monotonic()
        rc, rss, out = run_child(
            [
                sys.executable,
                __file__,
                "--baseline",
                "--dataset-dir",
                ds_path,
                "--base",
                base,
                "--steps",
                str(args.steps),
                "--out",
                str(work / f"trl-default-{i}"),
            ],
            env,
            work / f"trl-{i}.log",
        )
        if rc != 0:
            raise SystemExit(f"baseline failed (exit {rc}); see {work / f'trl-{i}.log'}")
        return {**json.loads(out.strip().splitlines()[-1]), "rss": rss, "wall": time.monotonic() - t0}

    # alternate the sides (A B A B ...) so background load hits both alike; report each side's best run
    runs = {"tuneloop": [], "trl-default": []}
    for i in range(args.repeats):
        runs["tuneloop"].append(side_a(i))
        runs["trl-default"].append(side_b(i))
    tps = lambda r: r["num_tokens"] / r["train_runtime_s"]  # noqa: E731
    tail = lambda xs: sum(xs[-5:]) / len(xs[-5:])  # noqa: E731
    print(
        f"{'side':<12} {'run':>3} {'tokens':>7} {'train_s':>8} {'tokens/s':>9} {'final loss':>10} {'peak RSS MiB':>12}"
    )
    for side, rs in runs.items():
        for i, r in enumerate(rs):
            print(
                f"{side:<12} {i:>3} {r['num_tokens']:>7} {r['train_runtime_s']:>8.1f} {tps(r):>9.1f} "
                f"{tail(r['losses']):>10.4f} {r['rss']:>12.0f}"
            )
    best_a = max(tps(r) for r in runs["tuneloop"])
    best_b = max(tps(r) for r in runs["trl-default"])
    print(f"best tokens/s: tuneloop {best_a:.1f}, trl-default {best_b:.1f}")
    print(f"ratio tokens/s tuneloop / trl-default: {best_a / best_b:.2f}x (target >= 1.5x)")
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # kept only when a side fails (its log is named in the error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
