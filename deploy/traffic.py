"""Simulated production users for the demo: support questions through the official ``openai`` client, then feedback.

Contract
--------
* :func:`simulate_traffic` — one chat request per :class:`tuneloop.deploy.scenario.Question`
  (system prompt + question, temperature 0.3 as a support deployment would set it:
  sampled, but close to the model's best answer) for the ``production`` alias, from a simulated user
  drawn out of ``users`` (200: the canary split is sticky per user, so few users
  would skew the arms). The user checks the answer against the question's fact (:meth:`tuneloop.checks.Rule.check`, e.g. "it states $11") and posts to
  ``/v1/feedback`` a thumbs-up when it passes, else a thumbs-down with the fact
  sheet's answer as the correction; small talk (``fact`` None) goes unrated.
  Returns counts per rating and per serving version (the response's ``model``:
  requests, rated, thumbs-up, task success = thumbs-up share of rated) and the
  overall task success.
* :func:`print_traffic` — one line summarising such a result.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuneloop.deploy.scenario import Question


def simulate_traffic(
    url: str,
    questions: list[Question],
    users: int = 200,
    concurrency: int = 8,
    max_tokens: int = 48,
    temperature: float = 0.3,
    seed: int = 0,
    desc: str = "traffic",
) -> dict[str, Any]:
    """Chat requests for ``production`` via the openai client + rule-based feedback; per-version stats."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from openai import OpenAI
    from tqdm import tqdm

    from tuneloop.deploy.scenario import messages

    key = os.environ.get("TUNELOOP_API_KEY", "none")
    client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=2, timeout=120)
    http = httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"})
    rng = random.Random(seed)
    jobs = [(i, q, f"user-{rng.randrange(users)}") for i, q in enumerate(questions)]
    stats: dict[str, Any] = {
        "requests": 0,
        "failed": 0,
        "unrated": 0,
        "up": 0,
        "down": 0,
        "corrections": 0,
        "by_version": {},
    }

    def one(job: tuple[int, Question, str]) -> dict[str, Any]:
        i, q, user = job
        try:
            r = client.chat.completions.create(
                model="production",
                messages=messages(q.text),  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=temperature,
                user=user,
                seed=seed + i,
            )
        except Exception as e:
            return {"ok": False, "error": str(e)}
        answer = r.choices[0].message.content or ""
        if q.fact is None:  # small talk: nobody rates it
            return {"ok": True, "model": r.model, "rating": None}
        verdict = q.fact.rule.check(answer)
        body: dict[str, Any] = {"request_id": r.id, "source": "demo-user"}
        if verdict.passed:
            body["rating"] = "up"
        else:  # a support agent answers the question from the fact sheet
            body.update(rating="down", correction=q.fact.answer)
        fb = http.post("/v1/feedback", json=body)
        return {"ok": True, "model": r.model, "rating": body["rating"], "feedback_status": fb.status_code}

    try:
        with ThreadPoolExecutor(concurrency) as ex:
            for res in tqdm(ex.map(one, jobs), total=len(jobs), desc=desc, unit="req", file=sys.stderr):
                stats["requests"] += 1
                if not res["ok"]:
                    stats["failed"] += 1
                    stats.setdefault("errors", []).append(res["error"][:200])
                    continue
                v = stats["by_version"].setdefault(res["model"], {"requests": 0, "rated": 0, "up": 0})
                v["requests"] += 1
                if res["rating"] is None:
                    stats["unrated"] += 1
                    continue
                stats[res["rating"]] += 1
                stats["corrections"] += res["rating"] == "down"
                v["rated"] += 1
                v["up"] += res["rating"] == "up"
    finally:
        http.close()
    for v in stats["by_version"].values():
        v["task_success"] = v["up"] / v["rated"] if v["rated"] else 0.0
    answered = stats["up"] + stats["down"]
    stats["task_success"] = stats["up"] / answered if answered else 0.0
    return stats


def print_traffic(t: dict[str, Any]) -> None:
    """One line: requests, feedback counts, task success overall and per serving version."""
    print(
        f"{t['requests']} requests ({t['failed']} failed, {t['unrated']} small talk unrated), feedback: {t['up']} up, "
        f"{t['down']} down with a correction; product answers that state the right fact: {t['task_success']:.0%}; "
        "by version: "
        + ", ".join(f"{k} {v['up']}/{v['rated']} ({v['task_success']:.0%})" for k, v in t["by_version"].items())
    )
