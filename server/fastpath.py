"""The service's settlement path over the kernel: wire messages straight from its output row.

``Core.evaluate`` used to run the kernel through ``engine.kernel.settle`` (which builds the
engine's frozen ``Settlement``, ``Accumulators`` and one ``LayerPayment`` per layer), then
``views.accumulators_view`` and ``convert.settlement_to_wire`` over those objects. Here the
claim row comes from the validated call and the registry record, ``engine._kernel.settle_row``
fills the output row, and the ``reimburse.v1.Settlement`` and the ledger ``Outcome`` are built
from that row and the kernel's accumulator state. What depends only on the policy and the
member's facts (which layers a member's view lists, their caps, bands and clauses) is prepared
once per (policy, member facts) and reused.

The result is byte for byte the message the general path builds: ``tests/test_fastpath.py``
compares both on random members, claims and accumulators, and the golden scenarios run over
the wire through this path. A call with ``want_trace`` still takes the reference evaluator.
"""
from __future__ import annotations

import threading
from array import array
from datetime import date

from engine import kernel as _kernel_mod
from engine._kernel import (
    NO_VALUE, O_ACCOUNT_PAID, O_APPLIED, O_BALANCE_AFTER, O_CASH, O_CHAIN_AFTER, O_DEDUCTIBLE,
    O_FUND_TOTAL, O_IN_SCOPE, O_LAYERS, O_PATIENT_TOTAL,
)
from engine._kernel import settle_row as _settle_row
from engine.errors import NoPolicyInForce
from engine.model import Accumulators
from engine.money import BP
from engine.policy import Policy
from engine.reference import cap_scale_bp
from reimburse.v1 import types_pb2 as ty
from server import _single
from server.convert import FUND, IDENTITY_WIRE, KIND_WIRE, SettleCall, rule_level
from server.ledger.base import MemberRecord, MemberState, NotFound, Outcome
from server.views import MEMBER_FACTS

# view entry kinds: how a layer's limit is found (views._limit)
_CAP, _YEARLY, _MONTHLY = 0, 1, 2


def member_mask(m: MemberRecord) -> int:
    """The member's own facts (identity, groups, retired, maternity) as the kernel's bits."""
    return _kernel_mod.member_facts(m.identity, m.groups, m.retired, m.maternity_eligible)


class _ViewEntry:
    """One layer of a member's accumulators view (views.accumulators_view), prepared."""

    __slots__ = ("index", "static", "limit_kind", "cap", "scaled", "threshold", "bands")

    def __init__(self, index, static, limit_kind, cap, scaled, threshold=None, bands=None):
        self.index, self.static, self.limit_kind = index, static, limit_kind
        self.cap, self.scaled, self.threshold, self.bands = cap, scaled, threshold, bands


class Plan:
    """A compiled policy with what the wire needs of its layers, and per-member-facts views."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.cp = _kernel_mod.compile_policy(policy)
        self.kernel = self.cp.kernel
        self.version = policy.version
        self.layers = tuple((layer.id, FUND.get(layer.fund, ty.FUND_UNSPECIFIED), layer.fund)
                            for layer in policy.layers)
        self.wire_layers = [(lid.encode(), fund, code.encode()) for lid, fund, code in self.layers]
        self.marginal = self.cp.marginal
        self._views: dict[int, tuple[_ViewEntry, ...]] = {}
        self._wire_views: dict[int, _single.WireView] = {}
        self._scale: dict[int, int] = {}
        # server._single's encoder: the fixed fields of each layer's LayerPayment and
        # FundPayment, encoded by upb once
        codes = list(dict.fromkeys(code for _, _, code in self.layers))
        self.wire = _single.WirePlan(
            self.kernel, [lid for lid, _, _ in self.layers],
            [ty.LayerPayment(layer_id=lid, fund=fund, fund_code=code).SerializeToString()
             for lid, fund, code in self.layers],
            [ty.FundPayment(fund=fund, fund_code=code).SerializeToString()
             for _, fund, code in self.layers],
            [codes.index(code) for _, _, code in self.layers], self.version)

    def scale(self, months: int) -> int:
        s = self._scale.get(months)
        if s is None:
            s = self._scale[months] = cap_scale_bp(self.policy, months)
        return s

    def view_entries(self, mask: int) -> tuple[_ViewEntry, ...]:
        got = self._views.get(mask)
        if got is None:
            got = self._views[mask] = self._prepare_view(mask)
        return got

    def wire_view(self, mask: int) -> _single.WireView:
        """view_entries for server._single: each entry's fixed LayerAccumulator fields
        encoded by upb once."""
        got = self._wire_views.get(mask)
        if got is None:
            got = self._wire_views[mask] = _single.WireView([
                (e.index, ty.LayerAccumulator(**e.static).SerializeToString(), e.limit_kind,
                 e.cap, e.scaled, e.threshold, e.bands) for e in self.view_entries(mask)])
        return got

    def _prepare_view(self, mask: int) -> tuple[_ViewEntry, ...]:
        out = []
        for i, layer in enumerate(self.policy.layers):
            need = _kernel_mod.facts_mask(layer.when & MEMBER_FACTS)
            if need & ~mask:
                continue
            static = dict(layer_id=layer.id, fund=FUND.get(layer.fund, ty.FUND_UNSPECIFIED),
                          fund_code=layer.fund, clause=layer.ref)
            if layer.kind == "deductible_rate":
                cap = layer.annual_cap_fen
                out.append(_ViewEntry(i, static, _CAP, None if cap is None else cap.value,
                                      layer.cap_scaled_by_continuity))
            elif layer.kind == "marginal_bands":
                # views._row: the first row without groups or with one of the member's
                row = next(r for r in layer.rows
                           if not r.groups or _kernel_mod.facts_mask(r.groups) & mask)
                threshold = layer.threshold_fen.value if layer.threshold_fen else 0
                if row.threshold_share_bp is not None:
                    threshold = threshold * row.threshold_share_bp.value // BP
                cap = row.annual_cap_fen
                out.append(_ViewEntry(i, static, _CAP, None if cap is None else cap.value,
                                      row.cap_scaled_by_continuity, threshold,
                                      tuple((b.from_fen, b.rate_bp) for b in row.bands.value)))
            elif layer.yearly_allowance_fen is not None:
                out.append(_ViewEntry(i, static, _YEARLY, layer.yearly_allowance_fen.value,
                                      False))
            else:
                out.append(_ViewEntry(i, static, _MONTHLY, layer.monthly_allowance_fen.value,
                                      False))
        return tuple(out)


_PLANS: dict[int, Plan] = {}
_PLANS_LOCK = threading.Lock()


def plan_for(policy: Policy) -> Plan:
    """The plan of a policy snapshot (the store caches snapshots, so this is a dict lookup)."""
    p = _PLANS.get(id(policy))
    if p is not None and p.policy is policy:
        return p
    with _PLANS_LOCK:
        p = Plan(policy)
        if len(_PLANS) >= 256:
            _PLANS.clear()
        _PLANS[id(policy)] = p
    return p


_DAY_PLANS: dict[tuple[object, str, date], Plan] = {}   # (store, region, day): the store
# itself in the key (hashed by identity), so that another store never finds this one's plans


def plan_on(policies, region: str, day: date) -> Plan:
    """``plan_for(policies.policy_for(region, day))``, remembered per (region, day): a store's
    files do not change once loaded. NoPolicyInForce as ``policy_for``."""
    key = (policies, region, day)
    plan = _DAY_PLANS.get(key)
    if plan is None:
        plan = plan_for(policies.policy_for(region, day))
        if len(_DAY_PLANS) >= 4096:
            _DAY_PLANS.clear()
        _DAY_PLANS[key] = plan
    return plan


def accumulators_message(plan: Plan, mask: int, member_id: str, year: int, day: date,
                         months: int, scale: int, st: array, balance_fen: int,
                         as_of: ty.Date) -> ty.Accumulators:
    """views.accumulators_view from the kernel's state row (after the claim)."""
    out = ty.Accumulators(member_id=member_id, year=year, as_of=as_of,
                          account_balance_fen=balance_fen, policy_version=plan.version,
                          continuous_months=months, cap_scale_bp=scale)
    add = out.layers.add
    for e in plan.view_entries(mask):
        i = e.index
        paid, base = st[2 * i], st[2 * i + 1]
        kw = dict(e.static)
        if paid:
            kw["paid_fen"] = paid
        if base:
            kw["cumulative_base_fen"] = base
        kind = e.limit_kind
        limit = (e.cap * scale // BP if e.scaled else e.cap) if kind == _CAP else \
            e.cap if kind == _YEARLY else e.cap * day.month
        if limit is not None:
            kw["limit_fen"] = limit
            kw["remaining_fen"] = limit - paid if limit > paid else 0
        if e.bands is not None:
            _band(e, base, kw)
        add(**kw)
    return out


def _band(e: _ViewEntry, c: int, kw: dict) -> None:
    """views._band_position."""
    if c < e.threshold:
        kw["current_rate_bp"] = 0
        kw["to_next_band_fen"] = e.threshold - c
        return
    bands = e.bands
    i = max(k for k, b in enumerate(bands) if b[0] <= c)
    kw["current_rate_bp"] = bands[i][1]
    if i + 1 < len(bands):
        kw["to_next_band_fen"] = bands[i + 1][0] - c


def settle(plan: Plan, call: SettleCall, m: MemberRecord, level: str, chain_fen: int,
           acc: Accumulators, balance_fen: int,
           serialize: bool = True) -> tuple[Outcome, ty.Settlement]:
    """The settlement of ``call`` for member ``m`` over ``acc``: the ledger outcome (its
    ``result`` the serialized message, unless ``serialize`` is false) and the message.
    Coverage is the caller's check."""
    cp = plan.cp
    day = call.service_date
    since = m.continuous_since
    months = (day.year * 12 + day.month) - (since.year * 12 + since.month) + 1
    mask = member_mask(m)
    row = _kernel_mod.row_of(
        mask, m.primary_facility, m.other_facility, months, call.kind, level, day,
        call.facility_id, home_bed=call.home_bed_after_transfer,
        out_of_area=call.out_of_area_unfiled, childbirth=call.childbirth,
        referred_on=call.referred_by_primary_on, bill=call.bill, chain_fen=chain_fen,
        referral=bool(call.referral_from), use_account=call.use_account,
        balance_fen=balance_fen)
    fid = call.facility_id
    bill = call.bill
    if acc.year != day.year:
        raise ValueError(f"accumulators of {acc.year} given for a claim of {day.year}")
    before = cp.state_of(acc) if acc.paid or acc.base else cp._zero_state
    st = before[:]
    out = cp._zero_out[:]
    status = _settle_row(plan.kernel, row, st, out)
    if status:
        _kernel_mod._raise(status, cp)
    o = out.tolist()
    applied = cp._applied.get(o[O_APPLIED]) or cp.applied_layers(o[O_APPLIED])
    layers = plan.layers
    wire_day = ty.Date(year=day.year, month=day.month, day=day.day)
    msg = ty.Settlement(
        request_id=call.request_id, member_id=call.member_id, facility_id=fid,
        kind=KIND_WIRE[call.kind], service_date=wire_day,
        breakdown=ty.Breakdown(total_fen=bill.total_fen, full_selfpay_fen=bill.full_selfpay_fen,
                               over_limit_fen=bill.over_limit_fen,
                               pre_selfpay_fen=bill.pre_selfpay_fen,
                               in_scope_fen=o[O_IN_SCOPE], deductible_fen=o[O_DEDUCTIBLE]),
        fund_total_fen=o[O_FUND_TOTAL], patient_total_fen=o[O_PATIENT_TOTAL],
        account_paid_fen=o[O_ACCOUNT_PAID], cash_fen=o[O_CASH],
        balance_after_fen=o[O_BALANCE_AFTER],
        accumulators_after=accumulators_message(
            plan, mask, call.member_id, acc.year, day, months, plan.scale(months), st,
            o[O_BALANCE_AFTER], wire_day),
        policy_version=plan.version, chain_deductible_after_fen=o[O_CHAIN_AFTER],
        identity=IDENTITY_WIRE[m.identity], childbirth=call.childbirth)
    funds: dict[str, list] = {}
    deltas = {}
    add_layer = msg.layers.add
    for i in applied:
        lid, fund, code = layers[i]
        amount = o[O_LAYERS + 2 * i]
        cap = o[O_LAYERS + 2 * i + 1]
        if cap == NO_VALUE:
            add_layer(layer_id=lid, fund=fund, fund_code=code, amount_fen=amount)
        else:
            add_layer(layer_id=lid, fund=fund, fund_code=code, amount_fen=amount,
                      cap_remaining_fen=cap)
        if amount:
            f = funds.get(code)
            if f is None:
                funds[code] = [fund, amount]
            else:
                f[1] += amount
        d = (st[2 * i] - before[2 * i], st[2 * i + 1] - before[2 * i + 1])
        if d != (0, 0):
            deltas[lid] = d
    if funds:
        add_fund = msg.funds.add
        for code, (fund, amount) in funds.items():
            add_fund(fund=fund, fund_code=code, amount_fen=amount)
    if call.want_trace:
        raise ValueError("a traced call takes the reference evaluator")
    return Outcome(deltas=deltas, account_paid_fen=o[O_ACCOUNT_PAID],
                   chain_deductible_after_fen=o[O_CHAIN_AFTER], policy_version=plan.version,
                   result=msg.SerializeToString() if serialize else b"",
                   fund_total_fen=o[O_FUND_TOTAL]), msg


def claim_context(m: MemberRecord, f, acc: Accumulators,
                  balance_fen: int) -> _single.ClaimContext:
    """What a claim's evaluation takes from its member, facility and year's accumulators
    (server._single.ClaimContext): the member's and the facility's facts for the kernel."""
    mask = member_mask(m)
    level = rule_level(f)
    facts = mask | _kernel_mod.place_facts(level, f.facility_id, m.primary_facility,
                                           m.other_facility)
    return _single.ClaimContext(m, f, acc, balance_fen, mask, facts, _kernel_mod._LEVEL[level],
                                IDENTITY_WIRE[m.identity])


def read_context(reads, member_id: str, facility_id: str, year: int) -> _single.ClaimContext:
    """claim_context from one call's reads (NotFound for an unknown member or facility)."""
    f = reads.get_facility(facility_id)
    m = reads.get_member(member_id)
    return claim_context(m, f, reads.accumulators(member_id, year), m.account_balance_fen)


def _wire_settle(core, req: tuple, c: _single.ClaimContext, pre: bool):
    """server._single.settle of a parsed request in context ``c``; None where the general
    path answers (not covered, no policy in force, refused by the kernel)."""
    try:
        plan = plan_on(core.policies, c.region, req[4])
    except NoPolicyInForce:
        return None
    got = c.settle(plan, req, pre)     # None where not covered (service.check_covered)
    if got is None or pre:
        return got
    result, deltas, account_paid, chain_after, fund_total = got
    return Outcome(deltas=deltas, account_paid_fen=account_paid,
                   chain_deductible_after_fen=chain_after, policy_version=plan.version,
                   result=result, fund_total_fen=fund_total)


def pre_settle_wire(core, req: tuple) -> bytes | None:
    """The encoded SettleResponse of a PreSettle of ``req`` (server._single.parse_settle's
    tuple), byte for byte what the general path answers; None where that path answers (an
    unknown member or facility, and _wire_settle's cases), so that every refusal is worded
    in one place."""
    ledger = core.ledger
    member_id, facility_id, year = req[1], req[2], req[4].year
    try:
        c = ledger.derived(("claim", member_id, facility_id, year),
                           lambda: read_context(ledger, member_id, facility_id, year))
    except NotFound:
        return None
    return _wire_settle(core, req, c, True)


def settle_wire(core, req: tuple, state: MemberState) -> Outcome | None:
    """The ledger outcome of settling ``req`` over ``state`` (inside the ledger's
    transaction), as ``Core.evaluate`` makes it; None where the general path answers."""
    return _wire_settle(core, req, claim_context(state.member, state.facility,
                                                 state.accumulators, state.balance_fen), False)
