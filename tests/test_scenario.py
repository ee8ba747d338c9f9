"""The demo scenario is deterministic, checkable, and keeps its held-out phrasings out of traffic and training."""

from __future__ import annotations

import json

from tuneloop.deploy import scenario


def test_every_fact_answer_passes_its_own_rule_and_no_other_facts_rule():
    for f in scenario.FACTS:
        assert f.rule.check(f.answer).passed, f.key
        others = [g.key for g in scenario.FACTS if g is not f and g.rule.check(f.answer).passed]
        assert others == [], f"{f.key}'s answer also passes {others}"


def test_traffic_is_deterministic_and_never_asks_a_held_out_phrasing():
    a, b = scenario.traffic(300, seed=1), scenario.traffic(300, seed=1)
    assert [q.text for q in a] == [q.text for q in b]
    assert [q.text for q in a] != [q.text for q in scenario.traffic(300, seed=2)]
    held = {h for f in scenario.FACTS for h in f.held_out}
    assert not any(h in q.text for q in a for h in held)
    assert {q.fact.key for q in a if q.fact} == {f.key for f in scenario.FACTS}  # every fact gets asked
    small_talk = [q for q in a if q.fact is None]
    assert 0.12 < len(small_talk) / len(a) < 0.28  # about a fifth of the traffic is small talk, left unrated
    assert not any(q.text.rstrip("!.").endswith(f.asked) for q in small_talk for f in scenario.FACTS)


def test_heldout_dataset_rows_carry_the_checks_and_the_system_prompt(db, tmp_path):
    from tuneloop.dataset_store import load_splits

    ds = scenario.register_heldout(db, tmp_path)
    assert scenario.register_heldout(db, tmp_path) == ds  # idempotent
    test = load_splits(db, ds)["test"]
    assert len(test) == sum(len(f.held_out) for f in scenario.FACTS)
    by_key = {f.key: f for f in scenario.FACTS}
    for row in test:
        f = by_key[row["id"].rsplit("-h", 1)[0]]
        assert row["messages"][0] == {"role": "system", "content": scenario.SYSTEM}
        assert row["messages"][1]["content"] in f.held_out
        assert json.loads(row["check"]) == f.rule.to_dict()


def test_golden_prompts_file_loads_as_the_gate_reads_it(tmp_path):
    from tuneloop.trainer.evaluate import load_golden

    gold = load_golden(str(scenario.write_golden(tmp_path / "golden.yaml")))
    assert [g["name"] for g in gold] == [f.key for f in scenario.FACTS]
    for g, f in zip(gold, scenario.FACTS):
        assert g["messages"] == scenario.messages(f.asked[0]) and g["rule"] == f.rule
