"""Money at the edges: yuan strings <-> integer fen, and the one rounding rule.

Inside the engine every amount is an ``int`` of fen and every rate an ``int`` of basis points
(1% = 100 bp). Floats never touch money.
"""
from __future__ import annotations

import re

from engine.errors import InvalidInput

BP = 10_000  # basis points in 100%

_YUAN = re.compile(r"^(\d+)(?:\.(\d{1,2}))?$", re.ASCII)
_RATIO = re.compile(r"^(\d+)(?:\.(\d{1,4}))?$", re.ASCII)


def round_half_up(numerator: int, denominator: int) -> int:
    """Round ``numerator / denominator`` half up to an integer (spec: "Units").

    The spec rounds a product ``amount × rate`` half up to the fen once per fund layer; callers
    pass ``amount_fen × rate_bp`` (summed over bands where there are bands) and ``BP``.
    Both arguments are non-negative here: amounts are validated non-negative at the boundary.
    """
    return (2 * numerator + denominator) // (2 * denominator)


def apply_rate(amount_fen: int, rate_bp: int) -> int:
    """``amount × rate`` rounded half up to the fen."""
    return round_half_up(amount_fen * rate_bp, BP)


def parse_yuan(text: object, field: str) -> int:
    """Parse a yuan decimal string with at most two decimals ("1234.50") into fen."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise InvalidInput(field, f"must be a yuan amount as a decimal string, got {text!r}")
    s = str(text).strip()
    if s.startswith("-"):
        raise InvalidInput(field, f"must not be negative, got {s!r}")
    m = _YUAN.match(s)
    if not m:
        raise InvalidInput(field, f"must be a yuan amount with at most 2 decimals, got {s!r}")
    whole, frac = m.group(1), (m.group(2) or "").ljust(2, "0")
    return int(whole) * 100 + int(frac)


def parse_ratio_bp(text: object, field: str) -> int:
    """Parse a ratio in [0, 1] with at most 4 decimals ("0.15") into basis points."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise InvalidInput(field, f"must be a ratio as a decimal string, got {text!r}")
    s = str(text).strip()
    if s.startswith("-"):
        raise InvalidInput(field, f"must be within [0, 1], got {s!r}")
    m = _RATIO.match(s)
    if not m:
        raise InvalidInput(field, f"must be a ratio in [0, 1] with at most 4 decimals, got {s!r}")
    bp = int(m.group(1)) * BP + int((m.group(2) or "").ljust(4, "0"))
    if bp > BP:
        raise InvalidInput(field, f"must be within [0, 1], got {s!r}")
    return bp


def format_yuan(fen: int) -> str:
    """Fen as a yuan string with two decimals, the format of scenario files."""
    sign = "-" if fen < 0 else ""
    fen = abs(fen)
    return f"{sign}{fen // 100}.{fen % 100:02d}"
