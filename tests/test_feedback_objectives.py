"""Training from the feedback users actually give: SFT, DPO and KTO sets sampled from logged feedback, trained.

Requests are logged through the server's own request-log writer (``RequestLogWriter``)
and feedback through the feedback API's own validation and storage
(``feedback_routes.normalise`` + ``upsert_feedback``), into a real DuckDB file; every
dataset trained on here comes out of ``feedback.sample.sample`` over those rows. Training
is real TRL/PEFT on the tiny random Llama (2 steps); the loop runs through the real
``tuneloop`` console script.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from tuneloop.db import Database, open_database, utcnow
from tuneloop.errors import UserError
from tuneloop.feedback.sample import SampleConfig, choose_objective, sample
from tuneloop.ids import new_id
from tuneloop.registry import ModelVersion, get_dataset, get_run, get_version, register_version, set_stage
from tuneloop.settings import LogSettings, load_settings
from tuneloop.trainer.config import KTO_RATIO, kto_weights

# ---- logging traffic and feedback the way the server does ---------------------------------------


class Traffic:
    """Served requests through the request-log writer, feedback through the feedback API's storage."""

    def __init__(self, db: Database, version: str = "tiny-v1"):
        from tuneloop.monitoring.requestlog import RequestLogWriter

        self.db, self.version = db, version
        self.writer = RequestLogWriter(db, LogSettings(flush_interval_s=3600))
        self.feedback: list[tuple[str, dict]] = []

    def served(self, prompt: str, response: str, *, ago: timedelta = timedelta(minutes=5), **feedback) -> str:
        """Log one served chat request; ``feedback`` (rating="up"/"down"/1..5, correction=...) is posted after."""
        from tuneloop.monitoring.records import RequestRecord

        rid = new_id("chatcmpl-")
        self.writer.submit(
            RequestRecord(
                id=rid,
                received_at=utcnow() - ago,
                route="chat.completions",
                status=200,
                model="production",
                model_version=self.version,
                arm="production",
                prompt=[{"role": "user", "content": prompt}],
                response=response,
                finish_reason="stop",
                prompt_tokens=len(prompt.split()),
                completion_tokens=len(response.split()),
                latency_s=0.1,
            )
        )
        if feedback:
            self.feedback.append((rid, feedback))
        return rid

    def flush(self) -> None:
        """Write the queued requests (the writer's shutdown drain), then post the feedback on them."""
        import msgspec

        from tuneloop.server.feedback_routes import FeedbackIn, normalise, upsert_feedback

        assert self.writer.close() == 0
        for rid, fb in self.feedback:
            body = msgspec.convert({"request_id": rid, **fb}, FeedbackIn)
            upsert_feedback(self.db, rid, body.source, normalise(body), self.version)
        self.feedback.clear()


def log_mixed_feedback(db: Database, n_up: int = 6, n_down: int = 4, n_fixed: int = 10, n_plain: int = 4) -> dict:
    """Thumbs-up (one as 5 stars), thumbs-down (one as 1 star), corrected thumbs-down and unrated requests."""
    t = Traffic(db)
    ids: dict = {"up": {}, "down": {}, "fixed": {}, "plain": {}}
    for i in range(n_up):
        resp = f"{i} plus {i} is {2 * i}."
        ids["up"][t.served(f"what is {i} plus {i}?", resp, rating=5 if i == 0 else "up")] = resp
    for i in range(n_down):
        resp = f"Banana number {i}."
        ids["down"][t.served(f"name colour number {i}", resp, rating=1 if i == 0 else "down")] = resp
    for i in range(n_fixed):
        fix = f"The capital of country {i} is City {i}."
        ids["fixed"][
            t.served(f"what is the capital of country {i}?", "I do not know.", rating="down", correction=fix)
        ] = fix
    for i in range(n_plain):
        resp = f"Hello visitor {i}."
        ids["plain"][t.served(f"say hello to visitor {i}", resp)] = resp
    t.flush()
    return ids


def splits_of(db: Database, ref: str) -> dict[str, list[dict]]:
    from tuneloop.dataset_store import load_splits

    dd = load_splits(db, ref)
    return {s: [dict(r) for r in dd[s]] for s in dd}


def rows_of(db: Database, ref: str) -> list[dict]:
    return [r for rows in splits_of(db, ref).values() for r in rows]


def all_rows_cfg(name: str, **kw) -> SampleConfig:
    return SampleConfig(name=name, strategies={"random": 1.0}, dedup_against=[], **kw)


# ---- sampling ----------------------------------------------------------------------------------------


def test_kto_set_labels_thumbs_up_and_corrections_true_thumbs_down_false_with_lineage_and_aligned_splits(home, db):
    ids = log_mixed_feedback(db)
    res = sample(db, home, all_rows_cfg("fb"), progress=False)
    assert res.kto is not None and res.kto.kind == "kto" and res.kto.name == "fb-kto"
    got = {(r["request_id"], r["label"], r["completion"][0]["content"]) for r in rows_of(db, res.kto.id)}
    want = (
        {(rid, True, resp) for rid, resp in ids["up"].items()}
        | {(rid, True, fix) for rid, fix in ids["fixed"].items()}
        | {(rid, False, "I do not know.") for rid in ids["fixed"]}
        | {(rid, False, resp) for rid, resp in ids["down"].items()}
    )
    assert got == want  # unrated requests give no KTO row
    for r in rows_of(db, res.kto.id):
        assert r["prompt"][-1]["role"] == "user" and r["completion"][0]["role"] == "assistant"
        assert r["origin"] == "feedback"
    # lineage: one dataset_rows row per KTO row, with its request id
    lin = db.query("SELECT request_id FROM dataset_rows WHERE dataset_id = ?", [res.kto.id])
    assert sorted(r["request_id"] for r in lin) == sorted(rid for rid, _, _ in want)
    assert get_dataset(db, res.kto.id).parent_ids == [res.sft.id]
    # a sampled request's rows sit in the split of its SFT row (nothing the gate holds out is trained on)
    sft_split = {r["request_id"]: s for s, rows in splits_of(db, res.sft.id).items() for r in rows}
    for s, rows in splits_of(db, res.kto.id).items():
        for r in rows:
            if r["request_id"] in sft_split:
                assert sft_split[r["request_id"]] == s
    for s, rows in splits_of(db, res.preference.id).items():
        assert all(sft_split[r["request_id"]] == s for r in rows)
    card = get_dataset(db, res.kto.id).card
    assert card["desirable"] == {"thumbs_up": 6, "corrections": 10, "replay": 0}
    assert card["undesirable"] == {"thumbs_down_corrected": 10, "thumbs_down": 4}
    train = splits_of(db, res.kto.id)["train"]
    fb = res.card["feedback"]
    assert res.card["kto_dataset"] == res.kto.id and res.card["preference_dataset"] == res.preference.id
    assert fb["kto_desirable"] == sum(r["label"] for r in train) > 0
    assert fb["kto_undesirable"] == sum(not r["label"] for r in train) > 0
    assert fb["preference_pairs"] == res.preference.rows_train
    assert get_dataset(db, res.sft.id).card["kto_dataset"] == res.kto.id  # the stored card names it too
    # deterministic: the same logs and seed give the same KTO dataset
    assert sample(db, home, all_rows_cfg("fb"), progress=False).kto.id == res.kto.id


def test_sft_set_trains_thumbs_up_answers_and_never_an_uncorrected_thumbs_down_answer(home, db):
    ids = log_mixed_feedback(db)
    res = sample(db, home, all_rows_cfg("sft"), progress=False)
    answers = {r["request_id"]: r["messages"][-1]["content"] for r in rows_of(db, res.sft.id)}
    assert {rid: answers[rid] for rid in ids["up"]} == ids["up"]  # thumbs-up (and 5-star) responses are answers
    assert {rid: answers[rid] for rid in ids["fixed"]} == ids["fixed"]  # corrections replace the served answer
    assert not set(ids["down"]) & set(answers)  # thumbs-down (and 1-star) requests are not SFT rows
    assert not {a for a in answers.values() if a.startswith("Banana") or a == "I do not know."}
    assert res.card["thumbs_down_not_sft_answers"] == 4 and res.card["counts"]["negative_feedback"] == 4


@pytest.mark.parametrize(
    "kind, counts, why",
    [
        ("no thumbs-down", {"n_down": 0, "n_fixed": 0}, "no undesirable (thumbs-down) example"),
        ("no thumbs-up", {"n_up": 0, "n_fixed": 0}, "no desirable (thumbs-up or corrected) example"),
    ],
)
def test_kto_set_is_not_written_without_both_labels_and_the_card_says_why(home, db, kind, counts, why):
    log_mixed_feedback(db, **counts)
    res = sample(db, home, all_rows_cfg("one-sided"), progress=False)
    assert res.kto is None and res.card["kto_dataset"] is None
    assert why in res.card["kto_note"] and why in get_dataset(db, res.sft.id).card["kto_note"]
    assert not [d for d in db.query("SELECT kind FROM datasets") if d["kind"] == "kto"]


def test_replay_rows_join_the_kto_train_split_as_desirable_and_dpo_gets_none(home, db):
    t = Traffic(db)
    old = {
        t.served(f"old question {i}", f"old answer {i}", ago=timedelta(hours=3)): f"old answer {i}" for i in range(30)
    }
    t.flush()
    first = sample(db, home, all_rows_cfg("old", until=utcnow() - timedelta(hours=1)), progress=False)
    assert {r["request_id"] for r in rows_of(db, first.sft.id)} == set(old)
    log_mixed_feedback(db)
    res = sample(
        db,
        home,
        all_rows_cfg("new", since=utcnow() - timedelta(hours=1), replay_from=first.sft.id, replay_fraction=0.25),
        progress=False,
    )
    sp = splits_of(db, res.kto.id)
    replay = [r for r in sp["train"] if r["origin"] == "replay"]
    feedback_train = [r for r in sp["train"] if r["origin"] == "feedback"]
    assert len(replay) == round(len(feedback_train) * 0.25 / 0.75) > 0
    assert all(r["label"] is True and r["completion"][0]["content"] == old[r["request_id"]] for r in replay)
    assert not [r for s in ("validation", "test") for r in sp[s] if r["origin"] == "replay"]
    card = get_dataset(db, res.kto.id).card
    assert card["desirable"]["replay"] == len(replay) and first.sft.id in get_dataset(db, res.kto.id).parent_ids
    # the card's feedback counts (what the loop's auto rule reads) count feedback rows, not replay
    assert res.card["feedback"]["kto_desirable"] == sum(r["label"] for r in feedback_train)
    # DPO: no replay (a pair needs a rejected answer); its card says so
    assert {r["origin"] for r in rows_of(db, res.preference.id)} == {"feedback"}
    assert "none" in get_dataset(db, res.preference.id).card["replay"]


# ---- the pure rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_des, n_und", [(10, 2), (2, 10), (5, 5), (6, 5), (7, 5), (3, 7), (1, 100), (100, 1)])
def test_automatic_kto_weights_put_the_label_ratio_in_trls_range_weighting_the_minority_up(n_des, n_und):
    d, u = kto_weights(n_des, n_und)
    lo, hi = KTO_RATIO
    assert lo <= d * n_des / (u * n_und) <= hi
    if lo <= n_des / n_und <= hi:
        assert (d, u) == (1.0, 1.0)  # already balanced enough: unchanged
    elif n_des < n_und:
        assert d > 1 and u == 1.0  # desirable is the minority
    else:
        assert u > 1 and d == 1.0  # undesirable is the minority


def test_kto_weight_overrides_are_kept_and_a_zero_one_is_derived():
    assert kto_weights(10, 2, 0.5, 0.7) == (0.5, 0.7)
    d, u = kto_weights(10, 2, desirable=2.0)
    assert d == 2.0 and 1 <= d * 10 / (u * 2) <= 4 / 3
    d, u = kto_weights(10, 2, undesirable=3.0)
    assert u == 3.0 and 1 <= d * 10 / (u * 2) <= 4 / 3
    with pytest.raises(UserError, match="KTO needs desirable and undesirable rows"):
        kto_weights(5, 0)


@pytest.mark.parametrize(
    "pairs, desirable, undesirable, objective",
    [
        (8, 0, 0, "dpo"),  # enough pairs: DPO, whatever the thumbs say
        (12, 5, 5, "dpo"),
        (7, 5, 5, "kto"),  # too few pairs, both thumbs: KTO
        (0, 1, 1, "kto"),
        (7, 5, 0, "sft"),  # no thumbs-down
        (0, 0, 3, "sft"),  # no thumbs-up or correction
        (0, 0, 0, "sft"),
    ],
)
def test_auto_rule_picks_dpo_with_enough_pairs_else_kto_with_both_labels_else_sft(
    pairs, desirable, undesirable, objective
):
    got, why = choose_objective(pairs, desirable, undesirable, min_pairs=8)
    assert got == objective and str(pairs) in why


def test_auto_rule_needs_at_least_one_pair_for_dpo_even_with_min_pairs_zero():
    assert choose_objective(0, 0, 0, min_pairs=0)[0] == "sft"
    assert choose_objective(1, 0, 0, min_pairs=0)[0] == "dpo"


# ---- training each objective on the sampled sets ----------------------------------------------------


@pytest.fixture(scope="module")
def sampled(tiny_model, tmp_path_factory):
    """One home with logged mixed feedback, sampled into SFT, preference and KTO sets."""
    home = tmp_path_factory.mktemp("objectives") / "home"
    home.mkdir()
    db = open_database(home / "tuneloop.duckdb")
    log_mixed_feedback(db)
    res = sample(db, home, all_rows_cfg("fb"), progress=False)
    settings = load_settings(overrides=[f"paths.home={home}"])
    return {"db": db, "home": home, "res": res, "settings": settings, "base": str(tiny_model)}


def _train(sampled, method: str, dataset: str, name: str, **extra):
    from tuneloop.config import build
    from tuneloop.trainer.config import TrainConfig
    from tuneloop.trainer.train import train

    args = [f"base={sampled['base']}", f"dataset={dataset}", f"method={method}", f"name={name}", "max_steps=2"]
    cfg = build(TrainConfig, {}, args + [f"{k}={v}" for k, v in extra.items()])
    return train(cfg, sampled["db"], sampled["settings"], progress=False)


def _assert_servable_lora(path: str) -> None:
    from safetensors import safe_open

    from tuneloop.registry import unservable_reason

    conf = json.loads((Path(path) / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and unservable_reason("adapter", path) is None
    assert not conf.get("modules_to_save")  # vLLM loads plain LoRA A/B matrices only
    with safe_open(str(Path(path) / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert keys and all("lora_" in k for k in keys)
        assert {str(f.get_tensor(k).dtype) for k in keys} == {"torch.float32"}  # fp32 on CPU, as dpo


@pytest.mark.train
@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_sft_and_dpo_train_servable_lora_adapters_on_the_sets_sampled_from_feedback(sampled, method):
    res = sampled["res"]
    dataset = res.sft.id if method == "sft" else res.preference.id
    out = _train(sampled, "lora" if method == "sft" else "dpo", dataset, f"obj-{method}")
    v = get_version(sampled["db"], out.version.name)
    run = get_run(sampled["db"], out.run_id)
    assert v.kind == "adapter" and v.dataset_id == dataset and run.status == "succeeded"
    assert run.method == ("lora" if method == "sft" else "dpo") and out.metrics["steps"] == 2
    _assert_servable_lora(v.path)


@pytest.mark.train
@pytest.mark.slow
def test_kto_trains_a_servable_lora_on_the_sampled_kto_set_with_imbalance_weights_overrides_and_sft_replay(sampled):
    db, res = sampled["db"], sampled["res"]
    train_rows = splits_of(db, res.kto.id)["train"]
    n_des = sum(r["label"] for r in train_rows)
    n_und = len(train_rows) - n_des
    assert n_des != n_und  # the sample is imbalanced, so the weights have something to correct
    out = _train(sampled, "kto", res.kto.id, "obj-kto")
    v = get_version(db, out.version.name)
    run = get_run(db, out.run_id)
    assert v.kind == "adapter" and v.dataset_id == res.kto.id == run.dataset_id
    assert run.method == "kto" and v.config["method"] == "kto" and out.metrics["steps"] == 2
    d, u = kto_weights(n_des, n_und)
    used = {"kto_desirable_rows": n_des, "kto_undesirable_rows": n_und, "kto_desirable_weight": d}
    assert v.config["kto_effective"] == {**used, "kto_undesirable_weight": u} == run.config["kto_effective"]
    assert (v.config["kto_desirable_weight"], v.config["kto_undesirable_weight"]) == (0.0, 0.0)  # asked: automatic
    assert run.metrics["kto_desirable_weight"] == d and run.metrics["kto_undesirable_weight"] == u
    assert 1 <= d * n_des / (u * n_und) <= 4 / 3
    losses = json.loads((Path(v.path).parent / "loss.json").read_text())
    assert [e["step"] for e in losses] == [1, 2]
    _assert_servable_lora(v.path)
    # explicit weights override the automatic ones
    out2 = _train(sampled, "kto", res.kto.id, "obj-kto-w", kto_desirable_weight=2.0, kto_undesirable_weight=0.5)
    assert (out2.metrics["kto_desirable_weight"], out2.metrics["kto_undesirable_weight"]) == (2.0, 0.5)
    # an SFT set replayed into a kto run joins as desirable rows, and the weights follow the new counts
    out3 = _train(sampled, "kto", res.kto.id, "obj-kto-replay", replay_dataset=res.sft.id, replay_fraction=0.2)
    m = out3.metrics
    assert m["replayed_rows"] > 0 and m["kto_desirable_rows"] == n_des + m["replayed_rows"]
    assert m["kto_undesirable_rows"] == n_und
    assert (m["kto_desirable_weight"], m["kto_undesirable_weight"]) == kto_weights(n_des + m["replayed_rows"], n_und)


@pytest.mark.train
@pytest.mark.slow
def test_kto_on_a_non_kto_set_lora_on_a_kto_set_and_kto_batch_of_one_are_refused_before_any_run(sampled):
    res = sampled["res"]
    runs = sampled["db"].query("SELECT count(*) AS n FROM runs")[0]["n"]
    with pytest.raises(UserError, match="method=kto needs a kto dataset"):
        _train(sampled, "kto", res.sft.id, "bad-kto-1")
    with pytest.raises(UserError, match=r"needs an SFT dataset .* \(use method=kto\)"):
        _train(sampled, "lora", res.kto.id, "bad-kto-2")
    with pytest.raises(UserError, match="method=kto needs batch_size >= 2"):
        _train(sampled, "kto", res.kto.id, "bad-kto-3", batch_size=1)
    assert sampled["db"].query("SELECT count(*) AS n FROM runs")[0]["n"] == runs


# ---- the loop picks the objective --------------------------------------------------------------


def _production_tiny(db: Database, tiny_model) -> None:
    register_version(
        db,
        ModelVersion(
            name="tiny-v1", kind="base", base_model=str(tiny_model), path=str(tiny_model), content_hash="tiny"
        ),
    )
    set_stage(db, "tiny-v1", "production")


@pytest.mark.train
@pytest.mark.slow
@pytest.mark.parametrize(
    "settings_overrides, opts_method, objective, method, reason",
    [
        ([], None, "sft", "lora", "sft from deploy.loop_train_method"),  # the default is unchanged: an SFT LoRA
        (["deploy.loop_train_method=auto", "deploy.loop_min_pairs=5"], None, "dpo", "dpo", "auto (deploy."),
        (["deploy.loop_train_method=auto", "deploy.loop_min_pairs=50"], None, "kto", "kto", "auto (deploy."),
        (["deploy.loop_min_pairs=50"], "auto", "kto", "kto", "auto (the loop's method option)"),
    ],
)
def test_loop_train_step_trains_sft_by_default_else_the_objective_auto_picks_and_records_why(
    home, db, tiny_model, monkeypatch, settings_overrides, opts_method, objective, method, reason
):
    from tuneloop.deploy import loop
    from tuneloop.deploy.loop import LoopOptions, run_cycle
    from tuneloop.store_deploy import steps_of

    _production_tiny(db, tiny_model)
    log_mixed_feedback(db)
    # the gate is not under test here: fail it at once so the cycle ends after the real train step
    monkeypatch.setattr(loop, "_do_gate", lambda *a, **kw: {"passed": False, "message": "not judged in this test"})
    opts = LoopOptions(train_overrides=["max_steps=2"], method=opts_method, canary=False, progress=False)
    res = run_cycle(db, load_settings(overrides=settings_overrides), opts)
    t = steps_of(db, res.cycle_id)["train"]
    assert t["status"] == "done" and (t["details"]["objective"], t["details"]["method"]) == (objective, method)
    assert reason in t["details"]["method_reason"]
    run = get_run(db, t["details"]["run_id"])
    assert run.method == method
    assert get_dataset(db, run.dataset_id).kind == {"sft": "sft", "dpo": "preference", "kto": "kto"}[objective]
    assert f"{objective} (method={method})" in res.summary()


@pytest.mark.train
@pytest.mark.slow
def test_cli_loop_train_method_kto_trains_gates_on_vllm_and_promotes_a_kto_version(cli, db, tiny_model):
    _production_tiny(db, tiny_model)
    log_mixed_feedback(db)
    r = cli(
        "--set",
        "deploy.gate_min_delta=1.0",
        "--set",
        "deploy.gate_max_forgetting=100",
        "loop",
        "--train",
        "method=kto",
        "--train",
        "max_steps=2",
        "--no-canary",
        "--eval-limit",
        "4",
    )
    assert "kto (method=kto): --train method=kto" in r.stdout, r.stdout
    v = get_version(db, "tiny-v2")
    run = get_run(db, v.run_id)
    assert run.method == "kto" and v.kind == "adapter" and get_dataset(db, v.dataset_id).kind == "kto"
    assert v.stage == "production"
    # the gate generated the candidate's answers on vLLM, with the KTO adapter as a LoRA request
    from tuneloop.db import loads
    from tuneloop.store_deploy import steps_of

    steps = steps_of(db, db.query("SELECT id FROM loop_runs LIMIT 1")[0]["id"])
    assert steps["train"]["details"]["objective"] == "kto" and steps["gate"]["details"]["passed"]
    report = loads(
        db.query("SELECT report FROM eval_reports WHERE id = ?", [steps["gate"]["details"]["report_id"]])[0]["report"]
    )
    assert report["generation"]["tiny-v2"]["backend"] == "vllm"


@pytest.mark.train
@pytest.mark.slow
def test_cli_loop_kto_without_thumbs_down_and_dpo_without_pairs_are_clear_errors_that_train_nothing(
    cli, home, db, tiny_model
):
    from tuneloop.deploy.loop import LoopError, LoopOptions, run_cycle

    _production_tiny(db, tiny_model)
    log_mixed_feedback(db, n_down=0, n_fixed=0)  # thumbs-up and unrated only
    r = cli("loop", "--train", "method=kto", "--no-canary", check=False)
    assert r.returncode == 2, r.stderr
    assert "error: method=kto needs both thumbs-up (or corrected) and thumbs-down feedback" in r.stderr
    assert "no undesirable (thumbs-down) example" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(LoopError, match=r"method=dpo needs preference pairs .* this sample has none"):
        # the same requests again (window, no dedup against the set the failed cycle sampled)
        opts = LoopOptions(train_overrides=["method=dpo"], window="1h", dedup_against=[], progress=False)
        run_cycle(db, load_settings(), opts)
    assert not db.query("SELECT 1 FROM runs")  # nothing was trained
