"""Simulated production users for the demo: chat requests through the official ``openai`` client, then feedback.

Contract
--------
* :func:`chitchat_conversations` — ``n`` (first message, reference reply) pairs from
  the chitchat-dataset package (another distribution than the chatterbot-corpus the
  first version is trained on, so the traffic drifts), shuffled with a seed.
* :func:`simulate_traffic` — one chat request per pair for the ``production`` alias,
  from a simulated user drawn out of ``users``; the user scores the answer against
  the reference reply with :func:`tuneloop.textmetrics.token_f1` (normalised
  tokens: lower case, punctuation removed) and posts to ``/v1/feedback`` a
  thumbs-up when it reaches ``good_f1``, else a thumbs-down with the reference as
  the correction. Returns counts per rating and per serving version (the
  response's ``model``) and the mean F1.
* :func:`print_traffic` — one line summarising such a result.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tuneloop.errors import UserError
from tuneloop.textmetrics import token_f1


def chitchat_conversations(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (first message, reply) pairs from the chitchat-dataset package (a different distribution than chatterbot)."""
    import importlib.util
    import random

    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or spec.origin is None:
        raise UserError(
            "the demo's production traffic needs the PyPI package chitchat-dataset: pip install --no-deps chitchat-dataset==0.9.0"
        )
    data = json.loads((Path(spec.origin).parent / "dataset.json").read_text())
    pairs = []
    for conv in data.values():
        msgs = [m for turn in conv.get("messages", []) for m in turn]
        texts = [m.get("text", "").strip() for m in msgs if m.get("text", "").strip()]
        if len(texts) >= 2 and 3 <= len(texts[0].split()) <= 40 and 2 <= len(texts[1].split()) <= 40:
            pairs.append((texts[0], texts[1]))
    random.Random(seed).shuffle(pairs)
    if not pairs:
        raise UserError("chitchat-dataset has no usable conversations")
    return [pairs[i % len(pairs)] for i in range(n)]


def simulate_traffic(
    url: str,
    convs: list[tuple[str, str]],
    users: int = 32,
    concurrency: int = 8,
    max_tokens: int = 48,
    good_f1: float = 0.2,
    seed: int = 0,
    desc: str = "traffic",
) -> dict[str, Any]:
    """Chat requests for ``production`` via the openai client + simulated feedback; per-arm stats from the responses."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from openai import OpenAI
    from tqdm import tqdm

    client = OpenAI(
        base_url=url + "/v1", api_key=os.environ.get("TUNELOOP_API_KEY", "none"), max_retries=2, timeout=120
    )
    http = httpx.Client(
        base_url=url, timeout=30, headers={"Authorization": f"Bearer {os.environ.get('TUNELOOP_API_KEY', 'none')}"}
    )
    rng = random.Random(seed)
    jobs = [(i, prompt, ref, f"user-{rng.randrange(users)}") for i, (prompt, ref) in enumerate(convs)]
    stats: dict[str, Any] = {
        "requests": 0,
        "failed": 0,
        "up": 0,
        "down": 0,
        "corrections": 0,
        "f1": [],
        "by_version": {},
    }

    def one(job: tuple[int, str, str, str]) -> dict[str, Any]:
        i, prompt, ref, user = job
        try:
            r = client.chat.completions.create(
                model="production",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0.7,
                user=user,
                seed=seed + i,
            )
        except Exception as e:
            return {"ok": False, "error": str(e)}
        answer = r.choices[0].message.content or ""
        f1 = token_f1(answer, ref)
        body: dict[str, Any] = {"request_id": r.id, "source": "demo-user"}
        if f1 >= good_f1:
            body["rating"] = "up"
        else:
            body.update(rating="down", correction=ref)
        fb = http.post("/v1/feedback", json=body)
        return {"ok": True, "model": r.model, "f1": f1, "rating": body["rating"], "feedback_status": fb.status_code}

    try:
        with ThreadPoolExecutor(concurrency) as ex:
            for res in tqdm(ex.map(one, jobs), total=len(jobs), desc=desc, unit="req", file=sys.stderr):
                stats["requests"] += 1
                if not res["ok"]:
                    stats["failed"] += 1
                    stats.setdefault("errors", []).append(res["error"][:200])
                    continue
                stats[res["rating"]] += 1
                stats["corrections"] += res["rating"] == "down"
                stats["f1"].append(res["f1"])
                v = stats["by_version"].setdefault(res["model"], {"requests": 0, "up": 0, "f1": 0.0})
                v["requests"] += 1
                v["up"] += res["rating"] == "up"
                v["f1"] += res["f1"]
    finally:
        http.close()
    for v in stats["by_version"].values():
        v["f1"] = v["f1"] / v["requests"] if v["requests"] else 0.0
    f1s = stats.pop("f1")
    stats["mean_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
    return stats


def print_traffic(t: dict[str, Any]) -> None:
    """One line: requests, feedback counts, mean F1 overall and per serving version."""
    print(
        f"{t['requests']} requests ({t['failed']} failed), feedback: {t['up']} up, {t['down']} down with a correction; "
        f"mean token F1 vs the reference reply {t['mean_f1']:.3f}; by version: "
        + ", ".join(f"{k} {v['requests']} (F1 {v['f1']:.3f})" for k, v in t["by_version"].items())
    )
