"""The Cython kernel behind the reference's signature: same Settlement, computed in C.

``compile_policy`` packs a ``Policy`` snapshot once into one flat int64 program (layout:
engine/_kernel.pxd). ``settle`` derives the facts mask and the continuous months in Python,
runs the kernel on one claim row and builds the Settlement ``engine.reference.settle`` builds,
except the trace (``evaluate.settle(trace=True)`` always uses the reference). ``settle_batch``
runs many claims in order over arrays, each with a member-year state slot.
"""
from __future__ import annotations

from array import array
from datetime import date
from typing import Iterable, Sequence

from engine import _kernel as _k
from engine._kernel import settle_row as _settle_row
from engine._kernel import (
    A_DED, A_DED_DELTA, A_DIVISOR, A_HAS, A_RATE, A_RATE_DELTA, A_SIZE, A_WHEN, B_SIZE, C_BALANCE,
    C_SIZE, H_ADJ, H_BANDS, H_BIT_REFERRAL, H_BIT_REFERRED, H_HEADER_SIZE, H_LAYERS, H_NADJ,
    H_NBANDS, H_NLAYERS, H_NROWS, H_NSCALE, H_ROWS, H_SCALE, H_SIZE, H_VERSION, H_WINDOW,
    HAS_DED, HAS_DED_DELTA, HAS_DIVISOR, HAS_RATE, HAS_RATE_DELTA, L_ADJ_COUNT, L_ADJ_START,
    L_ALLOWANCE, L_CAP, L_CAP_SCALED, L_CHAIN, L_CLAIM_KIND, L_DED, L_FLOOR, L_FLOOR_WHEN, L_KIND,
    L_MONTHLY, L_RATE, L_ROW_COUNT, L_ROW_START, L_SIZE, L_THRESHOLD, L_WHEN, LAYOUT_VERSION,
    MAX_LAYERS, NO_VALUE, O_ACCOUNT_PAID, O_APPLIED, O_BALANCE_AFTER, O_CASH, O_CHAIN_AFTER,
    O_DEDUCTIBLE, O_FUND_TOTAL, O_IN_SCOPE, O_LAYERS, O_PATIENT_TOTAL, R_BAND_COUNT,
    R_BAND_START, R_CAP, R_CAP_SCALED, R_GROUPS, R_SHARE, R_SIZE, S_SIZE, ST_AMOUNT_RANGE,
    ST_BAD_CODE, ST_BAD_MONTHS, ST_BAD_SLOT, ST_NO_ROW, ST_STATE_RANGE, CompiledKernel,
)
from engine.errors import InvalidInput
from engine.model import (
    CLAIM_KINDS, LEVELS, Accumulators, Claim, LayerPayment, Member, Settlement,
)
from engine.policy import FACT_BIT, LAYER_KINDS, Layer, Policy

__all__ = ["CompiledPolicy", "compile_policy", "pack_policy", "claim_row", "pack_claims",
           "settle", "settle_batch", "facts_mask", "STATUS_TEXT", "zeros"]

_Q0 = array("q", [0])


def zeros(n: int) -> array:
    """``n`` zeroed int64s. Repeating a one-element array is one allocation and a memset;
    ``array("q", bytes(8 * n))`` also makes and copies a temporary bytes object, which for a
    1000-claim batch's 320 KB of output rows cost 350 µs against 8 µs (in a server thread,
    docs/performance.md)."""
    return _Q0 * n


_LEVEL = {name: i for i, name in enumerate(LEVELS)}
_KIND = {name: i for i, name in enumerate(CLAIM_KINDS)}
_LEVEL_BIT = {name: FACT_BIT[name] for name in LEVELS}
IDENTITY_BIT = {name: FACT_BIT[name] for name in ("EMPLOYEE", "RESIDENT")}
GROUP_BIT = {name: FACT_BIT[name] for name in
             ("FIVE_GUARANTEE", "POVERTY_REGISTERED", "MINIMUM_LIVING", "EXTREME_HARDSHIP")}
_RETIRED = FACT_BIT["RETIRED"]
_MATERNITY = FACT_BIT["MATERNITY_ELIGIBLE"]
_HOME_BED = FACT_BIT["HOME_BED_AFTER_TRANSFER"]
_OUT_OF_AREA = FACT_BIT["OUT_OF_AREA_UNFILED"]
_CHILDBIRTH = FACT_BIT["CHILDBIRTH"]
_PRIMARY = FACT_BIT["PRIMARY_FACILITY"]
_OTHER = FACT_BIT["OTHER_FACILITY"]

STATUS_TEXT = {
    ST_AMOUNT_RANGE: "a bill amount or the chain deductible is outside 0..MAX_FEN",
    ST_BAD_CODE: "claim kind, facility level or month out of range",
    ST_BAD_MONTHS: "service date before the member's continuous contribution began",
    ST_NO_ROW: "no group row of a marginal_bands layer matches the member",
    ST_BAD_SLOT: "state slot or account index out of range",
    ST_STATE_RANGE: "an accumulator or the balance is outside +-2**62",
}


def facts_mask(names: Iterable[str]) -> int:
    """A set of policy.FACTS as the bit mask the kernel tests conditions with."""
    mask = 0
    for name in names:
        mask |= FACT_BIT[name]
    return mask


# --- compiling a policy ----------------------------------------------------------------------

class CompiledPolicy:
    """A policy snapshot packed for the kernel, with what the adapter needs to read results."""

    __slots__ = ("policy", "kernel", "program", "layer_ids", "funds", "marginal", "index",
                 "n_layers", "state_size", "out_size", "_zero_state", "_zero_out", "_applied")

    def __init__(self, policy: Policy, program: array):
        self.policy = policy
        self.kernel = CompiledKernel(program)
        self.program = self.kernel.program
        self.layer_ids = tuple(layer.id for layer in policy.layers)
        self.funds = tuple(layer.fund for layer in policy.layers)
        self.marginal = tuple(layer.kind == "marginal_bands" for layer in policy.layers)
        self.index = {lid: i for i, lid in enumerate(self.layer_ids)}
        self.n_layers = len(self.layer_ids)
        self.state_size = self.kernel.state_size
        self.out_size = self.kernel.out_size
        self._zero_state = zeros(self.state_size)
        self._zero_out = zeros(self.out_size)
        self._applied: dict[int, tuple[int, ...]] = {}

    def applied_layers(self, mask: int) -> tuple[int, ...]:
        """The layer indices of an O_APPLIED mask, in layer order (few distinct masks occur)."""
        got = self._applied.get(mask)
        if got is None:
            got = self._applied[mask] = tuple(i for i in range(self.n_layers) if mask >> i & 1)
        return got

    def new_state(self, n_slots: int = 1) -> array:
        """Zeroed accumulators: ``n_slots`` rows of (paid, base) per layer."""
        return zeros(self.state_size * n_slots)

    def new_out(self, n_claims: int = 1) -> array:
        return zeros(self.out_size * n_claims)

    def state_of(self, acc: Accumulators) -> array:
        """One slot's state from Accumulators (keys of other layers are not the kernel's)."""
        st = self._zero_state[:]
        index = self.index
        for lid, v in acc.paid.items():
            i = index.get(lid)
            if i is not None:
                st[2 * i] = v
        for lid, v in acc.base.items():
            i = index.get(lid)
            if i is not None:
                st[2 * i + 1] = v
        return st


def _param(p, default: int = NO_VALUE) -> int:
    """A Param's value, or ``default`` when the parameter is absent (None)."""
    return default if p is None else p.value


def _pack_layer(layer: Layer, adj: list[int], rows: list[int], bands: list[int]) -> list[int]:
    row = [0] * L_SIZE
    row[L_KIND] = LAYER_KINDS.index(layer.kind)
    row[L_CLAIM_KIND] = _KIND[layer.claim_kind]
    row[L_WHEN] = facts_mask(layer.when)
    row[L_ADJ_START] = len(adj) // A_SIZE
    row[L_ADJ_COUNT] = len(layer.adjustments)
    for a in layer.adjustments:
        has = ((HAS_DED if a.deductible_fen is not None else 0)
               | (HAS_DED_DELTA if a.deductible_delta_fen is not None else 0)
               | (HAS_RATE if a.rate_bp is not None else 0)
               | (HAS_RATE_DELTA if a.rate_delta_bp is not None else 0)
               | (HAS_DIVISOR if a.rate_divisor is not None else 0))
        entry = [0] * A_SIZE
        entry[A_WHEN] = facts_mask(a.when)
        entry[A_HAS] = has
        entry[A_DED] = _param(a.deductible_fen, 0)
        entry[A_DED_DELTA] = _param(a.deductible_delta_fen, 0)
        entry[A_RATE] = _param(a.rate_bp, 0)
        entry[A_RATE_DELTA] = _param(a.rate_delta_bp, 0)
        entry[A_DIVISOR] = _param(a.rate_divisor, 1)
        adj.extend(entry)
    row[L_CAP] = row[L_FLOOR] = NO_VALUE
    if layer.kind == "deductible_rate":                                     # spec §3.1
        for lvl, i in _LEVEL.items():
            # reference: `layer.deductible_fen[level].value if layer.deductible_fen else 0`
            row[L_DED + i] = layer.deductible_fen[lvl].value if layer.deductible_fen else 0
            row[L_RATE + i] = layer.rate_bp[lvl].value
        row[L_CAP] = _param(layer.annual_cap_fen)
        row[L_CAP_SCALED] = int(layer.cap_scaled_by_continuity)
        row[L_CHAIN] = int(layer.referral_chain_ref is not None)
        floor = layer.childbirth_floor
        if floor is not None and floor.amount_fen is not None:
            row[L_FLOOR_WHEN] = facts_mask(floor.when)
            row[L_FLOOR] = floor.amount_fen.value
    elif layer.kind == "marginal_bands":                                    # spec §3.2, §3.3
        row[L_THRESHOLD] = layer.threshold_fen.value if layer.threshold_fen else 0
        row[L_ROW_START] = len(rows) // R_SIZE
        row[L_ROW_COUNT] = len(layer.rows)
        for r in layer.rows:
            entry = [0] * R_SIZE
            entry[R_GROUPS] = facts_mask(r.groups)
            entry[R_SHARE] = _param(r.threshold_share_bp)
            entry[R_CAP] = _param(r.annual_cap_fen)
            entry[R_CAP_SCALED] = int(r.cap_scaled_by_continuity)
            entry[R_BAND_START] = len(bands) // B_SIZE
            entry[R_BAND_COUNT] = len(r.bands.value)
            for band in r.bands.value:
                bands.extend((band.from_fen, band.rate_bp))
            rows.extend(entry)
    else:                                                                   # spec §4
        row[L_RATE] = layer.rate_bp.value
        monthly = layer.yearly_allowance_fen is None
        row[L_MONTHLY] = int(monthly)
        row[L_ALLOWANCE] = (layer.monthly_allowance_fen if monthly
                            else layer.yearly_allowance_fen).value
    return row


def pack_policy(policy: Policy) -> array:
    """The kernel program of a policy snapshot: header, then the tables in the pxd's layout."""
    if len(policy.layers) > MAX_LAYERS:
        raise ValueError(f"the kernel settles at most {MAX_LAYERS} layers, "
                         f"{policy.version} has {len(policy.layers)}")
    layers: list[int] = []
    adj: list[int] = []
    rows: list[int] = []
    bands: list[int] = []
    for layer in policy.layers:
        layers.extend(_pack_layer(layer, adj, rows, bands))
    scale: list[int] = []
    for step in policy.continuity_cap_scale.value:                          # 二(四)4
        scale.extend((NO_VALUE if step.upto_months is None else step.upto_months, step.scale_bp))
    head = [0] * H_HEADER_SIZE
    head[H_VERSION] = LAYOUT_VERSION
    head[H_NLAYERS] = len(policy.layers)
    head[H_NADJ] = len(adj) // A_SIZE
    head[H_NROWS] = len(rows) // R_SIZE
    head[H_NBANDS] = len(bands) // B_SIZE
    head[H_NSCALE] = len(scale) // S_SIZE
    head[H_WINDOW] = policy.referral_window_days.value                      # 二(四)2(3)
    head[H_BIT_REFERRED] = FACT_BIT["REFERRED_BY_PRIMARY"]
    head[H_BIT_REFERRAL] = FACT_BIT["REFERRAL"]
    at = H_HEADER_SIZE
    for key, table in ((H_LAYERS, layers), (H_ADJ, adj), (H_ROWS, rows), (H_BANDS, bands),
                       (H_SCALE, scale)):
        head[key] = at
        at += len(table)
    head[H_SIZE] = at
    return array("q", head + layers + adj + rows + bands + scale)


# Policy snapshots are cached by the store per change date, so the same object comes back for
# every claim: key on its id, and hold it so the id cannot be reused while it is cached.
_CACHE: dict[int, CompiledPolicy] = {}
_CACHE_SIZE = 256


def compile_policy(policy: Policy) -> CompiledPolicy:
    cp = _CACHE.get(id(policy))
    if cp is not None and cp.policy is policy:
        return cp
    cp = CompiledPolicy(policy, pack_policy(policy))
    for old in list(_CACHE)[:max(0, len(_CACHE) - _CACHE_SIZE + 1)]:
        _CACHE.pop(old, None)            # oldest first; another thread may have got there
    _CACHE[id(policy)] = cp
    return cp


# --- one claim ---------------------------------------------------------------------------------

def _months(member: Member, day: date) -> int:
    """reference.continuous_months, with its error."""
    since = member.continuous_since
    if day < since:
        raise InvalidInput("claim.date", f"service date {day} is before the member's "
                                         f"continuous contribution began ({since})")
    return (day.year * 12 + day.month) - (since.year * 12 + since.month) + 1


def member_facts(identity: str, groups, retired: bool, maternity_eligible: bool) -> int:
    """The member's part of the facts mask (reference.claim_facts)."""
    facts = IDENTITY_BIT.get(identity, 0)
    for g in groups:
        facts |= GROUP_BIT[g]
    if retired:
        facts |= _RETIRED
    if maternity_eligible:
        facts |= _MATERNITY
    return facts


def place_facts(level: str, facility_id: str, primary_facility: str | None,
                other_facility: str | None) -> int:
    """The facts of where a claim is settled: the facility's level, and whether it is the
    member's primary or other selected facility."""
    facts = _LEVEL_BIT[level]
    if primary_facility is not None and facility_id == primary_facility:
        facts |= _PRIMARY
    elif other_facility is not None and facility_id == other_facility:
        facts |= _OTHER
    return facts


def row_of(facts: int, primary_facility: str | None, other_facility: str | None, months: int,
           kind: str, level: str, day: date, facility_id: str, *, home_bed: bool,
           out_of_area: bool, childbirth: bool, referred_on: date | None, bill,
           chain_fen: int, referral: bool, use_account: bool, balance_fen: int) -> tuple:
    """The kernel's claim row (C_* columns) from a member's ``facts`` and the claim's fields.

    reference.claim_facts as a bit mask, except REFERRED_BY_PRIMARY, which the kernel derives
    from the dates and the policy's window. Shared by ``claim_row`` and the service fast path.
    """
    lvl, knd = _LEVEL.get(level), _KIND.get(kind)
    if lvl is None or knd is None:
        raise InvalidInput("claim", f"unknown claim kind {kind!r} or facility level {level!r}")
    facts |= place_facts(level, facility_id, primary_facility, other_facility)
    if home_bed:
        facts |= _HOME_BED
    if out_of_area:
        facts |= _OUT_OF_AREA
    if childbirth:
        facts |= _CHILDBIRTH
    return (facts, knd, lvl, day.month, months, day.toordinal(),
            0 if referred_on is None else referred_on.toordinal(),
            bill.total_fen, bill.full_selfpay_fen, bill.over_limit_fen, bill.pre_selfpay_fen,
            chain_fen, referral, use_account, balance_fen)


def claim_row(member: Member, claim: Claim, balance_fen: int = 0) -> tuple[int, ...]:
    """The kernel's claim row for an engine Member and Claim."""
    day = claim.service_date
    return row_of(
        member_facts(member.identity, member.groups, member.retired, member.maternity_eligible),
        member.primary_facility, member.other_facility, _months(member, day), claim.kind,
        claim.facility_level, day, claim.facility_id,
        home_bed=claim.home_bed_after_transfer, out_of_area=claim.out_of_area_unfiled,
        childbirth=claim.childbirth, referred_on=claim.referred_by_primary_on, bill=claim.bill,
        chain_fen=claim.chain_deductible_fen, referral=claim.referral,
        use_account=claim.use_account, balance_fen=balance_fen)


def _raise(status: int, cp: CompiledPolicy) -> None:
    if status == ST_NO_ROW:
        # as the reference: a hand-built policy without a catch-all row
        raise ValueError(f"{cp.policy.version}: {STATUS_TEXT[status]}")
    if status in (ST_AMOUNT_RANGE, ST_STATE_RANGE):
        raise OverflowError(STATUS_TEXT[status])
    raise InvalidInput("claim", STATUS_TEXT.get(status, f"kernel status {status}"))


def settle(policy: Policy, member: Member, claim: Claim, acc: Accumulators,
           balance_fen: int = 0) -> Settlement:
    """reference.settle in the kernel: the same Settlement with ``trace=()``."""
    cp = _CACHE.get(id(policy))
    if cp is None or cp.policy is not policy:
        cp = compile_policy(policy)
    if acc.year != claim.service_date.year:
        raise ValueError(f"accumulators of {acc.year} given for a claim of "
                         f"{claim.service_date.year}")
    row = claim_row(member, claim, balance_fen)
    st = cp.state_of(acc) if acc.paid or acc.base else cp._zero_state[:]
    out = cp._zero_out[:]   # fresh buffers per call: settle may run on many threads
    status = _settle_row(cp.kernel, row, st, out)
    if status:
        _raise(status, cp)
    o = out.tolist()
    ids, funds, marginal = cp.layer_ids, cp.funds, cp.marginal
    applied = cp._applied.get(o[O_APPLIED]) or cp.applied_layers(o[O_APPLIED])
    payments = []
    paid = dict(acc.paid)
    base = dict(acc.base)
    for i in applied:
        lid = ids[i]
        cap = o[O_LAYERS + 2 * i + 1]
        payments.append(LayerPayment(lid, funds[i], o[O_LAYERS + 2 * i],
                                     None if cap == NO_VALUE else cap))
        paid[lid] = st[2 * i]          # a paid entry, possibly 0, for each applied layer
        if marginal[i]:
            base[lid] = st[2 * i + 1]  # and a base entry for each applied marginal layer
    return Settlement(claim.bill, o[O_IN_SCOPE], o[O_DEDUCTIBLE], tuple(payments),
                      o[O_FUND_TOTAL], o[O_PATIENT_TOTAL], o[O_ACCOUNT_PAID], o[O_CASH],
                      o[O_BALANCE_AFTER], Accumulators(acc.year, paid, base),
                      o[O_CHAIN_AFTER], policy.version)


# --- many claims -------------------------------------------------------------------------------

def pack_claims(rows: Iterable[Sequence[int]]) -> array:
    """Claim rows (``claim_row``) as one flat array for ``settle_batch``."""
    out = array("q")
    for r in rows:
        if len(r) != C_SIZE:
            raise ValueError(f"a claim row has {C_SIZE} columns, got {len(r)}")
        out.extend(r)
    return out


def settle_batch(compiled: CompiledPolicy, claims, slots, state, balances, out,
                 accounts=None) -> int:
    """Settle many claims in order (see engine._kernel.settle_batch); returns how many were
    refused (their O_STATUS is not ST_OK). The claim rows' C_BALANCE column is ignored: the
    balance comes from ``balances``."""
    return _k.settle_batch(compiled.kernel, claims, slots, state, balances, out, accounts)


# claim_row builds its tuple in the C_* column order of the pxd
assert (_k.C_FACTS, _k.C_KIND, _k.C_LEVEL, _k.C_MONTH, _k.C_MONTHS, _k.C_DAY, _k.C_REFERRED_DAY,
        _k.C_TOTAL, _k.C_FULL_SELFPAY, _k.C_OVER_LIMIT, _k.C_PRE_SELFPAY, _k.C_CHAIN,
        _k.C_REFERRAL, _k.C_USE_ACCOUNT, C_BALANCE) == tuple(range(C_SIZE))
