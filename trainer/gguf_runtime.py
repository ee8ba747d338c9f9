"""The GGUF side of an export's smoke test, run in llama.cpp (``llama_cpp``) in its own process.

Contract
--------
``python -m tuneloop.trainer.gguf_runtime`` reads one JSON job on stdin and writes one JSON result on stdout. It
imports only ``llama_cpp`` and numpy (the environment is :meth:`tuneloop.trainer.llamacpp.LlamaCpp.python_env`), so
a crash in llama.cpp is a failed subprocess, never a crashed tuneloop.

Job: ``{"model": path, "lora": GGUF LoRA path or null (applied on top of the model), "n_ctx": int, "prompts": [[token ids]], "max_new_tokens": int, "scored": [[ids, mask]],
"chat": [messages]}``. Result:

* ``metadata``: the GGUF's ``tokenizer.chat_template`` and ``tokenizer.ggml.eos_token_id`` (llama.cpp hands
  metadata over as strings; the id is made an int again);
* ``answers``: greedy completions of ``prompts`` (token ids in, so both runtimes see the same prompt), stopped at
  EOS or ``max_new_tokens``, with ``completion_tokens`` and ``seconds`` (decode speed = tokens / seconds);
* ``nll``: per scored sequence, (sum of negative log-likelihood over the tokens whose mask is 1, their count), from
  llama.cpp's logits — the parent's are computed the same way in transformers, which makes the perplexity ratio;
* ``chat``: the answer to ``chat`` through ``create_chat_completion``, which renders the chat template stored in the
  GGUF (proof the file carries a working template).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def run(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        model_path=job["model"],
        lora_path=job.get("lora") or None,
        n_ctx=int(job.get("n_ctx", 512)),
        logits_all=True,
        verbose=False,
        seed=0,
    )
    meta = dict(llm.metadata)
    answers, tokens, seconds = [], 0, 0.0
    for ids in job.get("prompts", []):
        t0 = time.perf_counter()
        out: Any = llm.create_completion(prompt=ids, max_tokens=int(job["max_new_tokens"]), temperature=0.0)
        seconds += time.perf_counter() - t0
        answers.append(out["choices"][0]["text"].strip())
        tokens += int(out["usage"]["completion_tokens"])
    nll = []
    for ids, mask in job.get("scored", []):
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        total, n = 0.0, 0
        for i in range(1, len(ids)):  # token i is predicted by the logits at i - 1
            if i < len(mask) and mask[i]:
                total -= float(logp[i - 1, ids[i]])
                n += 1
        nll.append([total, n])
    chat = None
    if job.get("chat"):
        llm.reset()
        c: Any = llm.create_chat_completion(messages=job["chat"], max_tokens=16, temperature=0.0)
        chat = c["choices"][0]["message"]["content"]
    return {
        "metadata": {
            "chat_template": meta.get("tokenizer.chat_template"),
            "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]) if "tokenizer.ggml.eos_token_id" in meta else None,
            "architecture": meta.get("general.architecture"),
        },
        "answers": answers,
        "completion_tokens": tokens,
        "seconds": seconds,
        "nll": nll,
        "chat": chat,
    }


def main() -> int:
    json.dump(run(json.load(sys.stdin)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
