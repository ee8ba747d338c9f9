"""PII scrub as data preparation, the request log and feedback sampling rely on it.

(tests/test_pii_scrub.py covers one example per kind; these are the harder
cases: every kind in one text, card formats, numbers that sit next to each
other, and look-alikes that must survive.)
"""

import pytest

from tuneloop.pii import KINDS, scrub


def test_every_kind_in_one_text_is_replaced_and_counted_separately():
    text = "mail bob@ex.com from 10.1.2.3, card 4111111111111111, call 555-123-4567, or ann@ex.org via ::1"
    out, counts = scrub(text)
    assert out == "mail <EMAIL> from <IP>, card <CREDIT_CARD>, call <PHONE>, or <EMAIL> via <IP>"
    assert counts == {"email": 2, "ip": 2, "credit_card": 1, "phone": 1}
    assert set(counts) <= set(KINDS)


@pytest.mark.parametrize(
    "card",
    [
        "4111111111111111",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "5500 0000 0000 0004",
        "3782 822463 10005",
        "4012888888881881",
    ],
)
def test_common_card_formats_that_pass_luhn_are_cards(card):
    assert scrub(f"pay with {card}.") == ("pay with <CREDIT_CARD>.", {"credit_card": 1})


def test_a_luhn_invalid_number_is_left_alone_while_its_neighbours_are_scrubbed():
    text = "Order 4111 1111 1111 1112 arrived? call 555-123-4567"
    assert scrub(text) == ("Order 4111 1111 1111 1112 arrived? call <PHONE>", {"phone": 1})


def test_adjacent_numbers_are_not_glued_into_one_candidate():
    assert scrub("ip 10.1.2.3 4111111111111111 555-123-4567") == (
        "ip <IP> <CREDIT_CARD> <PHONE>",
        {"ip": 1, "credit_card": 1, "phone": 1},
    )
    assert scrub("two 4111111111111111,4012888888881881")[1] == {"credit_card": 2}


@pytest.mark.parametrize("phone", ["(555) 123-4567", "+1 415 555 2671", "+4915112345678", "+44 20 7946 0958"])
def test_international_and_local_phone_numbers_are_phones_not_cards(phone):
    assert scrub(f"ring {phone} now") == ("ring <PHONE> now", {"phone": 1})


@pytest.mark.parametrize(
    "text",
    [
        "at 10:30 on 2024-01-15",
        "pi is 3.14159",
        "ticket 123456",
        "isbn 978-3-16-148410-0",
        "MAC 00:1A:2B:3C:4D:5E",
        "ratio 1:2:3",
        "user@localhost",
        "C++ and C#",
    ],
)
def test_everyday_numbers_and_symbols_survive(text):
    assert scrub(text) == (text, {})


def test_scrub_is_idempotent():
    once, _ = scrub("jane@example.com 4111 1111 1111 1111 192.168.0.1 +1 415 555 2671")
    assert scrub(once) == (once, {})
