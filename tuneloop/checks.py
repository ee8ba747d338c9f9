"""Checkable rules for a generated answer: the task-success metric's one home.

Contract
--------
A :class:`Rule` says what a correct answer must do, in terms a reader can check:

* ``contains``: every listed string appears in the answer (case-insensitive,
  runs of whitespace treated as one space);
* ``regex``: every listed regular expression matches somewhere (``re.search``);
* ``json``: the answer (stripped, with an optional Markdown code fence) parses
  as JSON.

:meth:`Rule.check` returns a :class:`Verdict` (``passed`` plus what was missing);
:func:`rule_from_dict` builds a rule from ``{"contains"|"expect": str|[str],
"regex": str|[str], "json": bool}`` (golden-prompt files, dataset rows' ``check``
column, the demo scenario) and raises :class:`~tuneloop.errors.UserError` on a bad
rule. Evaluation scores ``task_success`` with it, golden prompts pass by it, and
the demo's simulated users rate answers by it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from tuneloop.errors import UserError

_WS = re.compile(r"\s+")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def _norm(text: str) -> str:
    return _WS.sub(" ", text).strip().lower()


@dataclass(frozen=True)
class Verdict:
    passed: bool
    missing: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    json_error: str | None = None

    def reason(self) -> str:
        """Why the answer failed ('' when it passed)."""
        parts = [f"missing {m!r}" for m in self.missing] + [f"no match for /{r}/" for r in self.unmatched]
        if self.json_error:
            parts.append(f"not JSON ({self.json_error})")
        return "; ".join(parts)


@dataclass(frozen=True)
class Rule:
    contains: tuple[str, ...] = ()
    regex: tuple[str, ...] = ()
    json: bool = False

    def check(self, answer: str) -> Verdict:
        text = _norm(answer)
        missing = [c for c in self.contains if _norm(c) not in text]
        unmatched = [rx for rx in self.regex if not re.search(rx, answer)]
        err = None
        if self.json:
            body = answer.strip()
            m = _FENCE.match(body)
            try:
                json.loads(m.group(1) if m else body)
            except ValueError as e:
                err = str(e)
        return Verdict(not missing and not unmatched and err is None, missing, unmatched, err)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.contains:
            out["contains"] = list(self.contains)
        if self.regex:
            out["regex"] = list(self.regex)
        if self.json:
            out["json"] = True
        return out

    def __bool__(self) -> bool:
        return bool(self.contains or self.regex or self.json)


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str | int | float) for v in value):
        return tuple(str(v) for v in value)
    raise UserError(f"{what} must be a string or a list of strings, got {value!r}")


def rule_from_dict(d: dict[str, Any] | None, where: str = "rule") -> Rule:
    """A :class:`Rule` from its dict form (see module doc); an empty rule when ``d`` is empty."""
    if not d:
        return Rule()
    if not isinstance(d, dict):
        raise UserError(f"{where}: a check must be a mapping with contains/regex/json, got {d!r}")
    unknown = set(d) - {"contains", "expect", "regex", "json"}
    if unknown:
        raise UserError(f"{where}: unknown check key(s) {', '.join(sorted(unknown))} (use contains, regex, json)")
    contains = _strings(d.get("contains"), f"{where}: contains") + _strings(d.get("expect"), f"{where}: expect")
    regex = _strings(d.get("regex"), f"{where}: regex")
    for rx in regex:
        try:
            re.compile(rx)
        except re.error as e:
            raise UserError(f"{where}: bad regex {rx!r}: {e}") from None
    js = d.get("json", False)
    if not isinstance(js, bool):
        raise UserError(f"{where}: json must be true or false, got {js!r}")
    return Rule(contains, regex, js)
