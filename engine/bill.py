"""Spec §2: from line items to the four amounts that bound the policy scope."""
from __future__ import annotations

from typing import Iterable

from engine.model import Bill, LineItem
from engine.money import BP, round_half_up


def bill_from_items(items: Iterable[LineItem]) -> Bill:
    total = full_selfpay = over_limit = pre_selfpay = 0
    for item in items:
        total += item.amount_fen
        if item.category == "C":                      # 丙类: all full self-pay
            full_selfpay += item.amount_fen
            continue
        within = item.amount_fen
        if item.allowed_fen is not None and item.amount_fen > item.allowed_fen:
            over_limit += item.amount_fen - item.allowed_fen   # 超限价
            within = item.allowed_fen
        if item.category == "B":                      # 乙类 先行自付, rounded per line
            pre_selfpay += round_half_up(within * item.selfpay_ratio_bp, BP)
    return Bill(total, full_selfpay, over_limit, pre_selfpay)
