"""The main job, shortened: `tuneloop demo --tiny` runs the whole loop on real components.

Pull/build base -> prepare chatterbot-corpus -> train v1 -> gate -> serve (real vLLM, real HTTP)
-> chitchat traffic through the openai client with feedback -> drift detected -> sample
-> train v2 -> gate -> canary judged by the live server -> promoted or rolled back.
"""

from __future__ import annotations

import json

import pytest


@pytest.mark.engine
@pytest.mark.train
@pytest.mark.slow
def test_tiny_demo_closes_the_loop(cli, home, tmp_path):
    out = tmp_path / "report"
    r = cli("demo", "--tiny", "--out", str(out), timeout=1200)
    s = json.loads((out / "summary.json").read_text())
    assert set(s["versions"]) == {"tiny-v1", "tiny-v2"}
    assert s["versions"]["tiny-v2"]["dataset"].startswith("tiny-production@")
    # production traffic was served and logged, feedback was posted and used
    assert s["requests"] >= 100 and s["traffic"]["before"]["failed"] == 0
    assert s["feedback"]["n"] > 0 and s["sample"]["card"]["origins"].get("feedback", 0) > 0
    # chitchat traffic drifts from the chatterbot training data
    assert s["drift"]["before"]["drifted"] is True
    # the canary was decided (by the live server's judge) and the registry agrees
    assert s["canary"]["decision"] in ("promote", "rollback")
    from tuneloop.db import Database
    from tuneloop.registry import version_by_stage

    db = Database(home / "tuneloop.duckdb")
    prod = version_by_stage(db, "production").name
    assert prod == ("tiny-v2" if s["canary"]["decision"] == "promote" else "tiny-v1")
    # lineage: training rows of v2 point back to logged production requests
    linked = db.query(
        """SELECT count(*) AS n FROM dataset_rows d JOIN requests r ON r.id = d.request_id
                         WHERE d.dataset_id = ?""",
        [s["versions"]["tiny-v2"]["dataset"]],
    )[0]["n"]
    assert linked > 0
    html = (out / "report.html").read_text()
    assert "<svg" in html and "tiny-v2" in html
    assert "promoted" in r.stdout or "rolled back" in r.stdout or "rollback" in r.stdout
