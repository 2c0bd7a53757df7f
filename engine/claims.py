"""The boundary for scenario JSON: validate once, build the engine's value types.

Every refusal is an ``InvalidInput`` naming the field (``claims[1].items[0].amount``) and the
problem. The service validates its protobuf requests with the same checks (``check_*``).
"""
from __future__ import annotations

from datetime import date
from typing import Any, Mapping

from engine.bill import bill_from_items
from engine.errors import InvalidInput
from engine.model import (
    CATEGORIES, GROUPS, IDENTITIES, LEVELS, Bill, LineItem, Member,
)
from engine.money import parse_ratio_bp, parse_yuan

# The largest amount accepted anywhere: 10 billion yuan. Keeps every product amount × rate
# far inside int64 in the kernel.
MAX_FEN = 1_000_000_000_000


def check_keys(obj: Any, path: str, required: set[str], optional: set[str]) -> Mapping:
    if not isinstance(obj, dict):
        raise InvalidInput(path, "must be an object")
    unknown = set(obj) - required - optional
    if unknown:
        raise InvalidInput(f"{path}.{sorted(unknown)[0]}", "unknown field")
    missing = required - set(obj)
    if missing:
        raise InvalidInput(f"{path}.{sorted(missing)[0]}", "is required")
    return obj


def parse_date(v: Any, field: str) -> date:
    if not isinstance(v, str):
        raise InvalidInput(field, f"must be a date YYYY-MM-DD, got {v!r}")
    try:
        return date.fromisoformat(v)
    except ValueError:
        raise InvalidInput(field, f"must be a date YYYY-MM-DD, got {v!r}") from None


def parse_flag(v: Any, field: str) -> bool:
    if not isinstance(v, bool):
        raise InvalidInput(field, f"must be true or false, got {v!r}")
    return v


def amount(v: Any, field: str) -> int:
    fen = parse_yuan(v, field)
    return check_amount(fen, field)


def check_amount(fen: int, field: str) -> int:
    if fen < 0:
        raise InvalidInput(field, f"must not be negative, got {fen} fen")
    if fen > MAX_FEN:
        raise InvalidInput(field, f"must not exceed {MAX_FEN // 100} yuan")
    return fen


def check_enum(v: Any, field: str, allowed: tuple[str, ...], what: str) -> str:
    if v not in allowed:
        raise InvalidInput(field, f"unknown {what} {v!r}; expected one of {list(allowed)}")
    return v


def check_member(identity: str, groups: frozenset[str], other_facility: str | None,
                 path: str = "member") -> None:
    """Spec §1: an employee cannot be five-guarantee; only employees select an other facility."""
    check_enum(identity, f"{path}.identity", IDENTITIES, "identity")
    for g in sorted(groups):
        check_enum(g, f"{path}.groups", GROUPS, "group")
    if identity == "EMPLOYEE" and "FIVE_GUARANTEE" in groups:
        raise InvalidInput(f"{path}.groups", "an EMPLOYEE cannot be in FIVE_GUARANTEE "
                                             "(residents only)")
    if identity == "RESIDENT" and other_facility:
        raise InvalidInput(f"{path}.other_facility", "only an EMPLOYEE selects an other "
                                                     "facility (二(四)2(3))")


def check_bill(bill: Bill, path: str) -> Bill:
    for name in ("total_fen", "full_selfpay_fen", "over_limit_fen", "pre_selfpay_fen"):
        check_amount(getattr(bill, name), f"{path}.{name.removesuffix('_fen')}")
    if bill.in_scope_fen < 0:
        raise InvalidInput(f"{path}.total", "is less than full self-pay + over-limit + "
                                            "pre-self-pay")
    return bill


def parse_member(raw: Any) -> tuple[Member, int]:
    """A scenario's member and its opening personal-account balance in fen."""
    check_keys(raw, "member", {"identity", "continuous_since"},
               {"retired", "groups", "maternity_eligible", "primary_facility", "other_facility",
                "account_balance"})
    groups = raw.get("groups", [])
    if not isinstance(groups, list):
        raise InvalidInput("member.groups", "must be a list")
    groups = frozenset(groups)
    check_member(raw["identity"], groups, raw.get("other_facility"))
    member = Member(
        identity=raw["identity"],
        continuous_since=parse_date(raw["continuous_since"], "member.continuous_since"),
        retired=parse_flag(raw.get("retired", False), "member.retired"),
        groups=groups,
        maternity_eligible=parse_flag(raw.get("maternity_eligible", False),
                                      "member.maternity_eligible"),
        primary_facility=raw.get("primary_facility"),
        other_facility=raw.get("other_facility"),
    )
    if member.retired and member.identity != "EMPLOYEE":
        raise InvalidInput("member.retired", "only an EMPLOYEE can be retired (职工退休人员)")
    return member, amount(raw.get("account_balance", "0.00"), "member.account_balance")


def parse_items(raw: Any, path: str) -> tuple[LineItem, ...]:
    if not isinstance(raw, list):
        raise InvalidInput(path, "must be a list of line items")
    items = []
    for i, it in enumerate(raw):
        p = f"{path}[{i}]"
        check_keys(it, p, {"category", "amount"}, {"allowed_amount", "selfpay_ratio"})
        cat = check_enum(it["category"], f"{p}.category", CATEGORIES, "category")
        allowed = it.get("allowed_amount")
        ratio = it.get("selfpay_ratio")
        if cat == "C" and allowed is not None:
            raise InvalidInput(f"{p}.allowed_amount", "a class-C line is all self-pay; it has "
                                                      "no price cap")
        if cat != "B" and ratio is not None:
            raise InvalidInput(f"{p}.selfpay_ratio", "only a class-B line has a first "
                                                     "self-pay ratio")
        items.append(LineItem(
            category=cat,
            amount_fen=amount(it["amount"], f"{p}.amount"),
            allowed_fen=None if allowed is None else amount(allowed, f"{p}.allowed_amount"),
            selfpay_ratio_bp=0 if ratio is None else parse_ratio_bp(ratio, f"{p}.selfpay_ratio"),
        ))
    return tuple(items)


def parse_bill(raw: Mapping, path: str) -> tuple[Bill, tuple[LineItem, ...]]:
    """Line items (spec §2) or the four pre-aggregated amounts, never both."""
    agg = {"total", "full_selfpay", "over_limit", "pre_selfpay"}
    if "items" in raw:
        if agg & set(raw):
            raise InvalidInput(f"{path}.{sorted(agg & set(raw))[0]}",
                               "give either items or the pre-aggregated amounts, not both")
        items = parse_items(raw["items"], f"{path}.items")
        if not items:
            raise InvalidInput(f"{path}.items", "must list at least one line item")
        return check_bill(bill_from_items(items), path), items
    if "total" not in raw:
        raise InvalidInput(f"{path}.items", "is required (or the pre-aggregated total)")
    bill = Bill(*(amount(raw.get(k, "0"), f"{path}.{k}")
                  for k in ("total", "full_selfpay", "over_limit", "pre_selfpay")))
    return check_bill(bill, path), ()


def check_claim_flags(kind: str, path: str, *, referral: bool, home_bed: bool,
                      out_of_area: bool, childbirth: bool, referred_on: date | None) -> None:
    """Inpatient-only flags on an outpatient claim and vice versa are mistakes, not no-ops."""
    if kind == "OUTPATIENT":
        for name, on in (("referral_from", referral), ("home_bed_after_transfer", home_bed),
                         ("out_of_area_unfiled", out_of_area), ("childbirth", childbirth)):
            if on:
                raise InvalidInput(f"{path}.{name}", "applies to INPATIENT claims only")
    elif referred_on is not None:
        raise InvalidInput(f"{path}.referred_by_primary_on", "applies to OUTPATIENT claims only")


def check_levels(facilities: Mapping[str, str]) -> None:
    for fid, level in facilities.items():
        check_enum(level, f"facilities.{fid}.level", LEVELS, "level")
