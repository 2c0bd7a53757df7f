"""The engine's value types: who the member is, what was billed, what the funds paid.

All money is ``int`` fen, all rates ``int`` basis points, all dates ``datetime.date``. These
objects are built once, validated, at the boundary (``engine.claims`` for scenario JSON, the
service for protobuf) and trusted inside.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Mapping

IDENTITIES = ("EMPLOYEE", "RESIDENT")
GROUPS = ("FIVE_GUARANTEE", "POVERTY_REGISTERED", "MINIMUM_LIVING", "EXTREME_HARDSHIP")
LEVELS = ("LEVEL_1", "LEVEL_2", "LEVEL_3", "NON_DESIGNATED")
CLAIM_KINDS = ("INPATIENT", "OUTPATIENT")
CATEGORIES = ("A", "B", "C")


@dataclass(frozen=True, slots=True)
class Member:
    identity: str                       # 二(二)1–2: EMPLOYEE | RESIDENT
    continuous_since: date              # 二(四)4: first day of the unbroken contribution run
    retired: bool = False
    groups: frozenset[str] = frozenset()
    maternity_eligible: bool = False
    primary_facility: str | None = None  # 二(四)1(3)
    other_facility: str | None = None    # 二(四)2(3), employees only


@dataclass(frozen=True, slots=True)
class LineItem:
    category: str                       # A 甲类 | B 乙类 | C 丙类
    amount_fen: int
    allowed_fen: int | None = None      # price cap (限价); above it is over-limit
    selfpay_ratio_bp: int = 0           # 先行自付 ratio of a class-B line


@dataclass(frozen=True, slots=True)
class Bill:
    """The four amounts a hospital system sends (spec §2); ``in_scope`` is derived."""

    total_fen: int
    full_selfpay_fen: int = 0
    over_limit_fen: int = 0
    pre_selfpay_fen: int = 0

    @property
    def in_scope_fen(self) -> int:
        return self.total_fen - self.full_selfpay_fen - self.over_limit_fen - self.pre_selfpay_fen


@dataclass(frozen=True, slots=True)
class Claim:
    kind: str                           # INPATIENT | OUTPATIENT
    service_date: date                  # discharge date or visit date
    facility_id: str
    facility_level: str                 # from the facility registry, never from the request
    bill: Bill
    items: tuple[LineItem, ...] = ()    # kept for the trace when the bill came from lines
    home_bed_after_transfer: bool = False
    out_of_area_unfiled: bool = False
    childbirth: bool = False
    referred_by_primary_on: date | None = None
    use_account: bool = False
    # Deductible already paid by earlier admissions of the same referral chain (二(四)3);
    # the shell resolves ``referral_from`` into this amount.
    chain_deductible_fen: int = 0
    referral: bool = False


@dataclass(frozen=True, slots=True)
class Accumulators:
    """One member's state for one policy year: per layer, paid so far and cumulative base."""

    year: int
    paid: Mapping[str, int] = field(default_factory=dict)
    base: Mapping[str, int] = field(default_factory=dict)

    def paid_of(self, layer_id: str) -> int:
        return self.paid.get(layer_id, 0)

    def base_of(self, layer_id: str) -> int:
        return self.base.get(layer_id, 0)


@dataclass(frozen=True, slots=True)
class Step:
    """One line of the explanation trace: what was computed, from what, under which clause."""

    clause: str
    what: str
    inputs: Mapping[str, object]
    result: int


@dataclass(frozen=True, slots=True)
class LayerPayment:
    layer: str
    fund: str
    amount_fen: int
    cap_remaining_fen: int | None       # what the layer could still pay before this claim


@dataclass(frozen=True, slots=True)
class Settlement:
    bill: Bill
    in_scope_fen: int
    deductible_fen: int
    payments: tuple[LayerPayment, ...]
    fund_total_fen: int
    patient_total_fen: int
    account_paid_fen: int
    cash_fen: int
    balance_after_fen: int
    accumulators_after: Accumulators
    chain_deductible_after_fen: int     # deductible paid along this claim's referral chain
    policy_version: str
    trace: tuple[Step, ...] = ()

    @property
    def funds(self) -> dict[str, int]:
        """Payment per fund code, in layer order, leaving out funds that paid nothing."""
        out: dict[str, int] = {}
        for p in self.payments:
            if p.amount_fen:
                out[p.fund] = out.get(p.fund, 0) + p.amount_fen
        return out

    def deltas(self, before: Accumulators) -> dict[str, tuple[int, int]]:
        """Per layer, (paid delta, base delta) from ``before`` to after: what reversal undoes."""
        after = self.accumulators_after
        keys = set(after.paid) | set(after.base) | set(before.paid) | set(before.base)
        out = {}
        for k in sorted(keys):
            d = (after.paid_of(k) - before.paid_of(k), after.base_of(k) - before.base_of(k))
            if d != (0, 0):
                out[k] = d
        return out
