"""PII scrubbing: each kind replaced and counted; look-alikes left alone."""

import pytest

from tuneloop.pii import luhn_ok, scrub


@pytest.mark.parametrize(
    "text,expected,counts",
    [
        ("write to jane.doe@example.com today", "write to <EMAIL> today", {"email": 1}),
        ("card 4111 1111 1111 1111 please", "card <CREDIT_CARD> please", {"credit_card": 1}),
        ("card 4111-1111-1111-1111", "card <CREDIT_CARD>", {"credit_card": 1}),
        ("call 555-123-4567 or +44 20 7946 0958", "call <PHONE> or <PHONE>", {"phone": 2}),
        ("from 192.168.1.20 and 2001:db8::1", "from <IP> and <IP>", {"ip": 2}),
        ("it came from 10.0.0.7.", "it came from <IP>.", {"ip": 1}),
    ],
)
def test_each_kind_is_replaced_and_counted(text, expected, counts):
    assert scrub(text) == (expected, counts)


@pytest.mark.parametrize(
    "text",
    ["bad card 4111 1111 1111 1112", "at 12:30:45, version 1.2.3", "order 12345 in 2024", "not an ip 999.1.1.1", ""],
)
def test_look_alikes_are_left_alone(text):
    assert scrub(text) == (text, {})


def test_luhn():
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
