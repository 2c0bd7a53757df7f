"""Money at the edges (engine.money): yuan strings ↔ fen, ratios ↔ basis points, and the one
rounding rule of the spec ("Units": half up to the fen, once per fund layer, never via float).
"""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidInput
from engine.money import BP, apply_rate, format_yuan, parse_ratio_bp, parse_yuan, round_half_up


@pytest.mark.parametrize("text, fen", [
    ("0", 0), ("0.00", 0), ("0.01", 1), ("0.1", 10), ("0.5", 50), ("0.05", 5),
    ("12", 1200), ("12.3", 1230), ("1234.50", 123450), ("00012.30", 1230),
    ("10000000000.00", 1_000_000_000_000), (" 7.25 ", 725), (12, 1200), (0, 0),
])
def test_parse_yuan_reads_at_most_two_decimals_into_fen(text, fen):
    assert parse_yuan(text, "amount") == fen


@pytest.mark.parametrize("text, problem", [
    ("-1", "negative"), ("-0.01", "negative"), ("1.234", "at most 2 decimals"),
    ("1.", "at most 2 decimals"), (".5", "at most 2 decimals"), ("", "at most 2 decimals"),
    ("1,000.00", "at most 2 decimals"), ("1e3", "at most 2 decimals"),
    ("+1.00", "at most 2 decimals"), ("1.0.0", "at most 2 decimals"),
    ("¥1.00", "at most 2 decimals"), ("1 000", "at most 2 decimals"),
    (1.5, "decimal string"), (True, "decimal string"), (None, "decimal string"),
    (-3, "negative"),
])
def test_parse_yuan_refuses_anything_else_naming_the_field(text, problem):
    with pytest.raises(InvalidInput) as e:
        parse_yuan(text, "claims[0].total")
    assert e.value.field == "claims[0].total"
    assert problem in e.value.problem


@pytest.mark.parametrize("text", ["１２.００", "١٢", "1.٥"])
def test_parse_yuan_and_parse_ratio_refuse_non_ascii_digits(text):
    # Full-width or Arabic-Indic digits are not the decimal strings of the scenario format.
    with pytest.raises(InvalidInput):
        parse_yuan(text, "amount")
    with pytest.raises(InvalidInput):
        parse_ratio_bp(text, "ratio")


@pytest.mark.parametrize("text, bp", [
    ("0", 0), ("0.0", 0), ("1", 10_000), ("1.0000", 10_000), ("0.1", 1000), ("0.15", 1500),
    ("0.1234", 1234), ("0.0001", 1), ("0.5", 5000), (0, 0), (1, 10_000),
])
def test_parse_ratio_bp_reads_a_ratio_in_0_1_with_at_most_four_decimals(text, bp):
    assert parse_ratio_bp(text, "ratio") == bp


@pytest.mark.parametrize("text, problem", [
    ("1.0001", "within [0, 1]"), ("2", "within [0, 1]"), ("-0.1", "within [0, 1]"),
    ("-0", "within [0, 1]"), ("0.12345", "at most 4 decimals"), ("0.00001", "at most 4 decimals"),
    ("15%", "at most 4 decimals"), (".5", "at most 4 decimals"), (0.5, "decimal string"),
    (False, "decimal string"), (2, "within [0, 1]"),
])
def test_parse_ratio_bp_refuses_anything_else_naming_the_field(text, problem):
    with pytest.raises(InvalidInput) as e:
        parse_ratio_bp(text, "items[1].selfpay_ratio")
    assert e.value.field == "items[1].selfpay_ratio"
    assert problem in e.value.problem


@pytest.mark.parametrize("fen, text", [
    (0, "0.00"), (1, "0.01"), (5, "0.05"), (10, "0.10"), (99, "0.99"), (100, "1.00"),
    (123450, "1234.50"), (1_000_000_000_000, "10000000000.00"), (-5, "-0.05"),
    (-150, "-1.50"),
])
def test_format_yuan_writes_two_decimals(fen, text):
    assert format_yuan(fen) == text


@pytest.mark.parametrize("numerator, denominator, result", [
    (0, 10, 0), (4, 10, 0), (5, 10, 1), (6, 10, 1), (14, 10, 1), (15, 10, 2), (25, 10, 3),
    (35, 10, 4),                         # half up, not half to even: 2.5 → 3, 3.5 → 4
    (4999, BP, 0), (5000, BP, 1), (15000, BP, 2), (10_000, BP, 1),
])
def test_round_half_up_rounds_halves_up_never_to_even(numerator, denominator, result):
    assert round_half_up(numerator, denominator) == result


@pytest.mark.parametrize("fen, rate, result", [
    (1, 5000, 1),         # 0.5 fen → 1
    (1, 4999, 0),         # 0.4999 fen → 0
    (3, 5000, 2),         # 1.5 → 2
    (10, 8500, 9),        # 8.5 → 9
    (1005, 1000, 101),    # 100.5 → 101 (spec §2 pre-self-pay per line)
    (950_000, 4250, 403_750),
    (1_000_000_000_000, 10_000, 1_000_000_000_000),
    (123, 0, 0),
])
def test_apply_rate_is_amount_times_rate_rounded_half_up(fen, rate, result):
    assert apply_rate(fen, rate) == result


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**15), st.integers(1, 10**6))
def test_round_half_up_agrees_with_decimal_round_half_up(numerator, denominator):
    # Decimal's 28 significant digits hold a quotient < 10**15 with 13 decimals: a non-half
    # fraction (at least 1/(2 × 10**6) away from .5) is never rounded onto .5 by the division.
    expected = (Decimal(numerator) / Decimal(denominator)).quantize(
        Decimal(1), rounding=ROUND_HALF_UP)
    assert round_half_up(numerator, denominator) == int(expected)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**14))
def test_format_then_parse_gives_back_the_same_fen(fen):
    assert parse_yuan(format_yuan(fen), "amount") == fen


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10_000))
def test_a_ratio_written_with_four_decimals_parses_to_its_basis_points(bp):
    assert parse_ratio_bp(f"{bp // BP}.{bp % BP:04d}", "ratio") == bp
