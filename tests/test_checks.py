"""Checkable rules (task success) and the library-backed text metrics."""

from __future__ import annotations

import re

import pytest

from tuneloop.checks import Rule, rule_from_dict
from tuneloop.errors import UserError
from tuneloop.textmetrics import bleu, rouge_l


def test_contains_is_case_and_whitespace_insensitive_and_needs_every_string():
    rule = Rule(contains=("$11", "per  month"))
    assert rule.check("The Plus plan costs $11 PER\nmonth.").passed
    v = rule.check("The Plus plan costs $12 per month.")
    assert not v.passed and v.missing == ["$11"] and v.reason() == "missing '$11'"


def test_regex_must_match_and_json_must_parse_even_inside_a_code_fence():
    assert Rule(regex=(r"\b(7|seven)\b",)).check("There are seven days.").passed
    v = Rule(regex=(r"^\d+$",)).check("twelve")
    assert not v.passed and v.unmatched == [r"^\d+$"]
    js = Rule(json=True)
    assert js.check('{"plan": "plus"}').passed and js.check('```json\n{"plan": "plus"}\n```').passed
    bad = js.check("{plan: plus}")
    assert not bad.passed and bad.json_error and "not JSON" in bad.reason()


def test_rules_round_trip_through_their_dict_form_and_expect_is_an_alias_of_contains():
    rule = rule_from_dict({"expect": "Paris", "regex": ["France?"], "json": False})
    assert rule == Rule(contains=("Paris",), regex=("France?",))
    assert rule_from_dict(rule.to_dict()) == rule
    assert not rule_from_dict(None) and not rule_from_dict({})


@pytest.mark.parametrize(
    "d, message",
    [
        ({"contain": "x"}, "unknown check key(s) contain"),
        ({"regex": "("}, "bad regex '('"),
        ({"json": "yes"}, "json must be true or false"),
        ({"contains": {"a": 1}}, "contains must be a string or a list of strings"),
    ],
)
def test_bad_rules_are_user_errors_naming_the_problem(d, message):
    with pytest.raises(UserError, match=re.escape(message)):
        rule_from_dict(d, where="golden.yaml")


def test_rouge_l_and_bleu_agree_with_the_maintained_libraries():
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    pred, ref = "The Plus plan costs $11 a month.", "The Plus plan costs $11 per month."
    want = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert rouge_l(pred, ref) == pytest.approx(want)
    assert bleu(pred, ref) == pytest.approx(BLEU(effective_order=True).sentence_score(pred, [ref]).score / 100)
    assert bleu(ref, ref) == pytest.approx(1.0) and bleu("completely different words", ref) < 0.1
    assert bleu("", "") == 1.0 and bleu("x", "") == 0.0
