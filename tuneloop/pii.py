"""PII scrubbing shared by data preparation, the request log and feedback sampling.

Contract: :func:`scrub` returns the text with e-mail addresses, phone numbers,
credit-card numbers (13-19 digits that pass the Luhn check) and IPv4/IPv6
addresses replaced by ``<EMAIL>``, ``<PHONE>``, ``<CREDIT_CARD>``, ``<IP>``,
and a count per kind (``email``, ``phone``, ``credit_card``, ``ip``; kinds
with zero hits are omitted). Digit runs that fail the Luhn check are not cards
and are left as they are. Pure function, no state.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

KINDS = ("email", "phone", "credit_card", "ip")

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# card candidates: 13-19 contiguous digits, or the printed groupings (4-4-4-4[-3], Amex 4-6-5) with one
# consistent separator; never glued to other digits, a '+' (phone) or a '.' (IP, decimals)
_CARD = re.compile(r"(?<![\d.+-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{5})(?![\d]|[.-]\d)")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])")
_PHONE = re.compile(
    r"(?<![\w+.-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]?\d{3,4}(?!\w|[.-]\d)"
    r"|(?<![\w+.-])\+\d{9,14}(?!\w|[.-]\d)"
)


def luhn_ok(digits: str) -> bool:
    """True when ``digits`` (only 0-9) passes the Luhn checksum."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _sub(
    pattern: re.Pattern[str], text: str, token: str, keep: Callable[[re.Match[str]], bool] = lambda m: True
) -> tuple[str, int]:
    n = 0

    def repl(m: re.Match) -> str:
        nonlocal n
        if not keep(m):
            return m.group(0)
        n += 1
        return token

    return pattern.sub(repl, text), n


def _is_card(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group(0))
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _is_ipv4(m: re.Match) -> bool:
    try:
        ipaddress.IPv4Address(m.group(0))
        return True
    except ValueError:
        return False


def _is_ipv6(m: re.Match) -> bool:
    s = m.group(0)
    if s.count(":") < 2 or not re.search(r"[0-9A-Fa-f]", s):
        return False
    try:
        ipaddress.IPv6Address(s)
        return True
    except ValueError:
        return False


def _is_phone(m: re.Match) -> bool:
    return 7 <= len(re.sub(r"\D", "", m.group(0))) <= 15


def scrub(text: str) -> tuple[str, dict[str, int]]:
    """Replace PII in ``text``; return ``(scrubbed, counts_per_kind)``."""
    if not text:
        return text, {}
    counts: dict[str, int] = {}
    text, counts["email"] = _sub(_EMAIL, text, "<EMAIL>")
    text, counts["credit_card"] = _sub(_CARD, text, "<CREDIT_CARD>", _is_card)
    # long digit runs that fail Luhn are not PII: shield them from the phone pattern
    shielded: list[str] = []

    def shield(m: re.Match) -> str:
        shielded.append(m.group(0))
        return f"\x00{len(shielded) - 1}\x00"

    text = _CARD.sub(shield, text)
    text, n4 = _sub(_IPV4, text, "<IP>", _is_ipv4)
    text, n6 = _sub(_IPV6, text, "<IP>", _is_ipv6)
    counts["ip"] = n4 + n6
    text, counts["phone"] = _sub(_PHONE, text, "<PHONE>", _is_phone)
    if shielded:
        text = re.sub("\x00(\\d+)\x00", lambda m: shielded[int(m.group(1))], text)
    return text, {k: v for k, v in counts.items() if v}


def add_counts(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    """Accumulate ``more`` into ``total`` (in place) and return it."""
    for k, v in more.items():
        total[k] = total.get(k, 0) + v
    return total
