"""The live server's background drift job: it finds the served version's traffic in the request log, stores a
drift report in ``drift_reports`` and exports the same numbers as gauges on ``/metrics``."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fixtures_server import DRIFT_SETTINGS, read_requests

pytestmark = [pytest.mark.engine, pytest.mark.slow]

VERSION = "tiny-drift"
N_REQUESTS = 30
assert int(DRIFT_SETTINGS["TUNELOOP_DRIFT__MIN_REQUESTS"]) <= N_REQUESTS


def _gauges(url: str) -> dict[tuple[str, str], float]:
    """{(metric, feature): value} of the drift gauges of VERSION on a live /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name in ("tuneloop_drift_score", "tuneloop_drifted") and s.labels.get("model_version") == VERSION:
                out[(s.name, s.labels["feature"])] = s.value
    return out


def _latest_report(db_path) -> list[dict]:
    from tuneloop.db import open_database

    return open_database(db_path).query(
        """SELECT feature, statistic, value, drifted, n_requests FROM drift_reports
           WHERE id = (SELECT id FROM drift_reports WHERE model_version = ? ORDER BY created_at DESC LIMIT 1)""",
        [VERSION],
    )


def _matches(gauges: dict, report: list[dict]) -> bool:
    if not report or not gauges:
        return False
    want = {("tuneloop_drifted", r["feature"]): 1.0 if r["drifted"] else 0.0 for r in report}
    want |= {("tuneloop_drift_score", r["feature"]): r["value"] for r in report if r["value"] is not None}
    return gauges.keys() == want.keys() and all(gauges[k] == pytest.approx(v) for k, v in want.items())


def test_drift_job_exports_gauges_that_match_its_stored_report(default_server, tiny_model, tiny_adapters):
    from tuneloop.dataset_store import save_dataset
    from tuneloop.ids import hash_path
    from tuneloop.registry import ModelVersion, register_version

    srv, db = default_server, default_server.db()
    train = [
        {
            "id": str(i),
            "messages": [
                {"role": "user", "content": f"What is the weather like in city number {i}?"},
                {"role": "assistant", "content": f"It is sunny in city {i}."},
            ],
            "request_id": None,
            "origin": "file",
        }
        for i in range(40)
    ]
    ds = save_dataset(db, srv.home, "drift-train", {"train": train}, "sft", card={}, source={"test": True})
    register_version(
        db,
        ModelVersion(
            name=VERSION,
            kind="adapter",
            base_model=str(tiny_model),
            path=str(tiny_adapters["a"]),
            content_hash=hash_path(tiny_adapters["a"]),
            dataset_id=ds.id,
        ),
    )

    async def traffic() -> list[str]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as h:

            async def one(i: int) -> str:
                msg = [{"role": "user", "content": f"Tell me a story about dragons, part {i}."}]
                r = await h.post("/v1/chat/completions", json={"model": VERSION, "messages": msg, "max_tokens": 8})
                assert r.status_code == 200 and r.headers["x-model-version"] == VERSION, r.text
                return r.json()["id"]

            return await asyncio.gather(*(one(i) for i in range(N_REQUESTS)))

    ids = asyncio.run(traffic())

    # the job runs every second: wait until its report covers all the traffic and /metrics shows it
    deadline = time.monotonic() + 90
    gauges, report = {}, []
    while time.monotonic() < deadline:
        gauges = _gauges(srv.url)
        report = _latest_report(srv.db_path)
        if report and report[0]["n_requests"] == N_REQUESTS and _matches(gauges, report):
            break
        time.sleep(0.25)
    assert report, f"no drift report for {VERSION} within 90 s:\n{srv.output()[-3000:]}"
    assert {r["n_requests"] for r in report} == {N_REQUESTS}  # every request of the version, and only those
    assert _matches(gauges, report), (gauges, report)
    features = {r["feature"] for r in report}
    assert "overall" in features and {"prompt_length_psi", "vocabulary"} <= features, features
    logged = {r["id"] for r in read_requests(srv.db_path, "model_version = ?", [VERSION])}
    assert logged == set(ids)
