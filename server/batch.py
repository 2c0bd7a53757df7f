"""SettleBatch and PreSettleBatch: many claims per call through the batch kernel.

The wire path costs no Python object per claim in the ``ClaimColumns`` form: the request bytes
are decoded in C (``server._wire.decode_batch``), validated and turned into kernel claim rows in
C (``build_rows``), settled in order by ``engine._kernel.settle_batch`` over one state slot per
member-year, and the result columns are read back and encoded in C. What Python does is per
distinct member, facility and member-year (look up the record, its facts, its accumulators),
plus, for ``SettleBatch`` only, per claim what the journal needs (the idempotency digest and
the stored ``Settlement``). The ``requests`` form (one ``SettleRequest`` per claim: line items,
referrals) is validated per item in Python and then takes the same path.

Semantics (docs/api.md "Batches"): claims are evaluated in order, each over the ledger's state
and the earlier accepted claims of the batch (same member-year, same account); a refused claim
gets its code and error and changes nothing; ``SettleBatch`` commits every accepted claim in one
ledger transaction, or none when the ledger cannot commit (the call fails UNAVAILABLE).
Idempotency is per claim, by (facility, request id) and the digest of the equivalent
``SettleRequest``, the same as ``Settle``'s: a claim sent by either RPC settles once.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from datetime import date

import grpc
from google.rpc import code_pb2

from engine import _kernel
from engine.errors import InvalidInput, NoPolicyInForce
from engine.kernel import GROUP_BIT, IDENTITY_BIT, STATUS_TEXT, zeros
from engine.model import LEVELS, Accumulators
from engine.policy import FACT_BIT
from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from server import _wire, convert, fastpath
from server.errors import NotCovered, code_of
from server.ledger.base import BatchItem, FacilityRecord, MemberRecord, NotFound, Outcome
from server.ledger.base import ReferralReversed, SettleResult
from server.wire import RawRequest

MAX_BATCH = 100_000           # claims per call (the 4 MiB message limit binds first)
MAX_YEARS = 50                # years one batch may span
C_SIZE = _kernel.C_SIZE
_LEVEL_INDEX = {name: i for i, name in enumerate(LEVELS)}
_LEVEL_BITS = array("q", [FACT_BIT[name] for name in LEVELS])
_FLAG_BITS = array("q", [FACT_BIT[n] for n in ("HOME_BED_AFTER_TRANSFER", "OUT_OF_AREA_UNFILED",
                                               "CHILDBIRTH", "PRIMARY_FACILITY",
                                               "OTHER_FACILITY")])
_EMPTY = array("q")
_MEMBER_ROWS: dict = {}       # member_table's memo of cached records (server/_wire.pyx)
_KIND_NAME = {ty.CLAIM_KIND_INPATIENT: "INPATIENT", ty.CLAIM_KIND_OUTPATIENT: "OUTPATIENT"}


class RawBatch(RawRequest):
    """A ``SettleBatchRequest`` kept as its bytes (decoded by ``server._wire``); its
    ``requests`` and ``claims`` parsed on demand, for interceptors that look."""

    TYPE = st.SettleBatchRequest
    DESCRIPTOR = TYPE.DESCRIPTOR
    __slots__ = ()

    @property
    def requests(self):
        return self.message().requests

    @property
    def claims(self):
        return self.message().claims


# --- decoding and validating --------------------------------------------------------------------

@dataclass
class Batch:
    """A decoded batch: columns (``server._wire.INT_COLUMNS``), id tables, per-claim refusals."""

    n: int
    member_ids: list[str]
    facility_ids: list[str]
    request_ids: list[str]
    cols: list[array]
    chain: array = field(default_factory=lambda: _EMPTY)
    referral: array = field(default_factory=lambda: _EMPTY)
    refused: dict[int, BaseException] = field(default_factory=dict)
    prefix: str = "claims"       # field names in errors: claims.total_fen[3] / requests[3]...
    # the requests form's referrals (claim index -> referring settlement id), resolved against
    # the ledger by the servicer and checked again by it as the batch commits
    chain_from: dict[int, str] = field(default_factory=dict)


def decode(data: bytes, *, settle: bool) -> Batch:
    """The batch in ``data``; ``InvalidInput`` for what makes the whole call malformed."""
    try:
        has_requests, mids, fids, rids, cols = _wire.decode_batch(data)
    except (_wire.WireError, ValueError) as e:
        raise InvalidInput("claims", f"is not a valid ClaimColumns message: {e}") from None
    n = len(cols[0])
    if has_requests:
        if n or mids or fids or rids:
            raise InvalidInput("requests", "give either claims or requests, not both")
        return _from_requests(st.SettleBatchRequest.FromString(data).requests, settle)
    if n > MAX_BATCH:
        raise InvalidInput("claims.member", f"at most {MAX_BATCH} claims per batch, got {n}")
    for k, name in enumerate(_wire.INT_COLUMNS):
        size = len(cols[k])
        optional = k >= 5
        if size != n and not (optional and size == 0):
            raise InvalidInput(f"claims.{name}", f"has {size} values for {n} claims"
                               + (" (or leave it empty)" if optional else ""))
    for table, name in ((mids, "member_ids"), (fids, "facility_ids")):
        first = _wire.first_bad_id(table, convert.MAX_ID_LEN)
        for k in range(len(table) if first < 0 else first, len(table)):
            convert.check_id(table[k], f"claims.{name}[{k}]")
    if settle and len(rids) != n:
        raise InvalidInput("claims.request_ids", f"SettleBatch needs one request id per claim: "
                                                 f"{len(rids)} for {n} claims")
    if rids and len(rids) != n:
        raise InvalidInput("claims.request_ids", f"has {len(rids)} values for {n} claims "
                                                 "(or leave it empty)")
    b = Batch(n, mids, fids, rids, cols)
    if rids:
        first = _wire.first_bad_id(rids, convert.MAX_ID_LEN)
        for i in range(len(rids) if first < 0 else first, len(rids)):
            try:
                convert.check_id(rids[i], f"claims.request_ids[{i}]")
            except InvalidInput as e:
                b.refused[i] = e
    return b


def _from_requests(reqs, settle: bool) -> Batch:
    """The ``requests`` form: each SettleRequest validated as Settle does, into columns."""
    n = len(reqs)
    if n > MAX_BATCH:
        raise InvalidInput("requests", f"at most {MAX_BATCH} claims per batch, got {n}")
    mids: dict[str, int] = {}
    fids: dict[str, int] = {}
    cols = [zeros(n) for _ in _wire.INT_COLUMNS]
    chain_from: dict[int, str] = {}
    refused: dict[int, BaseException] = {}
    rids = []
    for i, req in enumerate(reqs):
        rids.append(req.request_id)
        try:
            call = convert.validate_settle(req, require_request_id=settle)
        except InvalidInput as e:
            refused[i] = InvalidInput(f"requests[{i}].{e.field}", e.problem)
            continue
        d, b = call.service_date, call.bill
        cols[0][i] = mids.setdefault(call.member_id, len(mids))
        cols[1][i] = fids.setdefault(call.facility_id, len(fids))
        cols[2][i] = convert.KIND_WIRE[call.kind]
        cols[3][i] = d.year * 10000 + d.month * 100 + d.day
        cols[4][i], cols[5][i] = b.total_fen, b.full_selfpay_fen
        cols[6][i], cols[7][i] = b.over_limit_fen, b.pre_selfpay_fen
        cols[8][i] = (call.use_account | call.home_bed_after_transfer << 1
                      | call.out_of_area_unfiled << 2 | call.childbirth << 3)
        r = call.referred_by_primary_on
        cols[9][i] = r.year * 10000 + r.month * 100 + r.day if r else 0
        if call.referral_from:
            chain_from[i] = call.referral_from
    return Batch(n, list(mids), list(fids), rids, cols, refused=refused, prefix="requests",
                 chain_from=chain_from)


def request_hash(batch: Batch, i: int) -> str:
    """``convert.request_hash`` of the SettleRequest claim ``i`` stands for."""
    c = batch.cols
    v = c[3][i]
    req = st.SettleRequest(
        request_id=batch.request_ids[i], member_id=batch.member_ids[c[0][i]],
        facility_id=batch.facility_ids[c[1][i]], kind=c[2][i],
        service_date=ty.Date(year=v // 10000, month=v // 100 % 100, day=v % 100),
        amounts=st.BillAmounts(total_fen=c[4][i], full_selfpay_fen=c[5][i] if c[5] else 0,
                               over_limit_fen=c[6][i] if c[6] else 0,
                               pre_selfpay_fen=c[7][i] if c[7] else 0))
    flags = c[8][i] if c[8] else 0
    req.use_personal_account = bool(flags & 1)
    req.home_bed_after_transfer = bool(flags & 2)
    req.out_of_area_unfiled = bool(flags & 4)
    req.childbirth = bool(flags & 8)
    r = c[9][i] if c[9] else 0
    if r:
        req.referred_by_primary_on.CopyFrom(ty.Date(year=r // 10000, month=r // 100 % 100,
                                                    day=r % 100))
    return hashlib.sha256(req.SerializeToString(deterministic=True)).hexdigest()


# --- evaluating -------------------------------------------------------------------------------

_BOUNDS: dict[tuple[int, str], list[tuple[int, object]]] = {}


def _policy_bounds(policies, region: str) -> list[tuple[int, object]]:
    """(first day as an ordinal, policy snapshot) of each stretch of one policy in force."""
    key = (id(policies), region)
    got = _BOUNDS.get(key)
    if got is None:
        days = set()
        for f in policies.files.get(region, ()):
            days.add(f.template.effective)
            days.update(f.change_dates)
        got = []
        for d in sorted(days):
            p = policies.policy_for(region, d)
            if not got or got[-1][1] is not p:
                got.append((d.toordinal(), p))
        if len(_BOUNDS) > 64:
            _BOUNDS.clear()
        _BOUNDS[key] = got
    return got


@dataclass
class Evaluated:
    codes: array                  # per claim: 0 accepted, else _wire.E_* (or E_KERNEL + status)
    out: array                    # kernel output rows, stride ``osz``
    osz: int
    policy: array                 # per claim: index into plans
    plans: list                   # fastpath.Plan per policy used
    layer_offset: array           # per plan: first index of its layers in the batch's table
    year: array


def evaluate(batch: Batch, policies, members: dict[str, MemberRecord | None],
             facilities: dict[str, FacilityRecord | None], accumulators_of,
             skip: list[bool] | None = None, cached: bool = False) -> Evaluated:
    """Settle every accepted claim of ``batch`` in order (nothing is stored). ``members`` and
    ``facilities`` by id (None: not registered); ``accumulators_of([(member_id, year), ...])``
    gives a list; claims with ``skip[i]`` are left out (replays, conflicts, refusals of the
    ledger). ``cached``: the member records come from the read cache, which hands out the same
    objects again (what they give the kernel is then kept, ``_MEMBER_ROWS``)."""
    n, nm, nf = batch.n, len(batch.member_ids), len(batch.facility_ids)
    codes = zeros(n)
    for i in batch.refused:
        codes[i] = _wire.E_REFUSED
    if skip is not None:
        for i, s in enumerate(skip):
            if s:
                codes[i] = _wire.E_REFUSED
    fidx = {fid: k for k, fid in enumerate(batch.facility_ids)}
    f_ok, f_level = zeros(nf), zeros(nf)
    for k, fid in enumerate(batch.facility_ids):
        f = facilities.get(fid)
        if f is not None:
            f_ok[k], f_level[k] = 1, _LEVEL_INDEX[convert.rule_level(f)]
    z = lambda: zeros(nm)  # noqa: E731
    m_ok, m_mask, m_since, m_since_ym, m_bstart, m_bend = z(), z(), z(), z(), z(), z()
    m_primary, m_other, m_region, balances = z(), z(), z(), z()
    regions: dict[str, int] = {}
    _wire.member_table([members.get(mid) for mid in batch.member_ids], fidx, regions,
                       IDENTITY_BIT, GROUP_BIT, FACT_BIT["RETIRED"],
                       FACT_BIT["MATERNITY_ELIGIBLE"], m_ok, m_mask, m_since, m_since_ym,
                       m_bstart, m_bend, m_primary, m_other, m_region, balances,
                       _MEMBER_ROWS if cached else {})
    plans: list = []
    plan_index: dict[int, int] = {}
    r_start, r_count, b_from, b_policy = array("q"), array("q"), array("q"), array("q")
    for region in regions:
        bounds = _policy_bounds(policies, region)
        r_start.append(len(b_from))
        r_count.append(len(bounds))
        for first, p in bounds:
            b_from.append(first)
            b_policy.append(plan_index.setdefault(id(p), len(plan_index)))
            if len(plans) < len(plan_index):
                plans.append(fastpath.plan_for(p))
    rows = zeros(n * C_SIZE)
    policy, year = zeros(n), zeros(n)
    _wire.build_rows(n, batch.cols, batch.chain, batch.referral, m_ok, m_mask, m_since,
                     m_bstart, m_bend, m_primary, m_other, m_region, f_ok, f_level,
                     _LEVEL_BITS, _FLAG_BITS, r_start, r_count or array("q", [0]),
                     b_from or array("q", [0]), b_policy or array("q", [0]), codes, rows,
                     policy, year)
    _wire.set_months(n, batch.cols[0], m_since_ym, codes, rows, batch.cols[3])
    offsets = array("q")
    total = 0
    for p in plans:
        offsets.append(total)
        total += p.cp.n_layers
    years = _wire.year_range(year, codes)
    osz = max((p.cp.out_size for p in plans), default=_kernel.O_LAYERS)
    out = zeros(n * osz)
    result = Evaluated(codes, out, osz, policy, plans, offsets or array("q", [0]), year)
    if not years:
        return result
    lo, hi = years
    if hi - lo + 1 > MAX_YEARS:
        raise InvalidInput(f"{batch.prefix}.service_date",
                           f"a batch may span at most {MAX_YEARS} years")
    n_years = hi - lo + 1
    slots, used = zeros(n), zeros(nm * n_years)
    _wire.assign_slots(n, batch.cols[0], year, codes, lo, n_years, slots, used)
    in_use = _wire.nonzero(used)
    mids = batch.member_ids
    opening = dict(zip(in_use, accumulators_of([(mids[s // n_years], lo + s % n_years)
                                                 for s in in_use])))
    pols = set(policy[i] for i in range(n) if codes[i] == 0) if len(plans) > 1 else {0}
    if len(pols) == 1:
        plan = plans[next(iter(pols))]
        cp = plan.cp
        ssz = cp.state_size
        state = cp.new_state(nm * n_years)
        for s, acc in opening.items():
            if acc.paid or acc.base:
                state[s * ssz:(s + 1) * ssz] = cp.state_of(acc)
        run_out = out if cp.out_size == osz else cp.new_out(n)
        _kernel.settle_batch(cp.kernel, rows, slots, state, balances, run_out, batch.cols[0])
        if run_out is not out:
            _restride(run_out, cp.out_size, out, osz, range(n))
        return result
    _settle_by_policy(batch, result, rows, slots, balances, opening, n_years, lo)
    return result


def _restride(src: array, ssz: int, dst: array, dsz: int, which) -> None:
    for i in which:
        dst[i * dsz:i * dsz + ssz] = src[i * ssz:(i + 1) * ssz]


def _settle_by_policy(batch, ev: Evaluated, rows, slots, balances, opening, n_years, lo):
    """The slow path of a batch spanning policies: runs of one policy, in order, with each
    member-year's accumulators carried from run to run by layer id."""
    n = batch.n
    accs: dict[int, Accumulators] = dict(opening)
    i = 0
    while i < n:
        if ev.codes[i]:
            i += 1
            continue
        p = ev.policy[i]
        run = [i]
        j = i + 1
        while j < n and (ev.codes[j] or ev.policy[j] == p):
            if not ev.codes[j]:
                run.append(j)
            j += 1
        plan = ev.plans[p]
        cp = plan.cp
        k = len(run)
        sub_rows = array("q")
        for x in run:
            sub_rows.extend(rows[x * C_SIZE:(x + 1) * C_SIZE])
        used = sorted({slots[x] for x in run})
        local = {s: t for t, s in enumerate(used)}
        sub_slots = array("q", [local[slots[x]] for x in run])
        state = cp.new_state(len(used))
        ssz = cp.state_size
        for s, t in local.items():
            acc = accs[s]
            state[t * ssz:(t + 1) * ssz] = cp.state_of(acc)
        sub_out = cp.new_out(k)
        _kernel.settle_batch(cp.kernel, sub_rows, sub_slots, state, balances, sub_out,
                             array("q", [batch.cols[0][x] for x in run]))
        for t, x in enumerate(run):
            ev.out[x * ev.osz:x * ev.osz + cp.out_size] = \
                sub_out[t * cp.out_size:(t + 1) * cp.out_size]
        for s, t in local.items():
            old = accs[s]
            paid, base = dict(old.paid), dict(old.base)
            for li, lid in enumerate(cp.layer_ids):
                paid[lid] = state[t * ssz + 2 * li]
                base[lid] = state[t * ssz + 2 * li + 1]
            accs[s] = Accumulators(old.year, paid, base)
        i = j


# --- errors and results -------------------------------------------------------------------------

def item_error(batch: Batch, codes: array, i: int, members) -> BaseException:
    """The exception a refused claim stands for (as the single call would raise it)."""
    code = codes[i]
    if code == _wire.E_REFUSED:
        return batch.refused[i]
    c = batch.cols
    p = f"{batch.prefix}.{{}}[{i}]" if batch.prefix == "claims" else f"requests[{i}].{{}}"
    mid = batch.member_ids[c[0][i]] if 0 <= c[0][i] < len(batch.member_ids) else ""
    fid = batch.facility_ids[c[1][i]] if 0 <= c[1][i] < len(batch.facility_ids) else ""
    E = _wire
    if code == E.E_MEMBER_INDEX:
        return InvalidInput(p.format("member"), f"is not an index into member_ids "
                                                f"({len(batch.member_ids)})")
    if code == E.E_FACILITY_INDEX:
        return InvalidInput(p.format("facility"), f"is not an index into facility_ids "
                                                  f"({len(batch.facility_ids)})")
    if code == E.E_KIND:
        return InvalidInput(p.format("kind"), "is required: CLAIM_KIND_INPATIENT or "
                                              "CLAIM_KIND_OUTPATIENT")
    if code == E.E_DATE:
        return InvalidInput(p.format("service_date"), f"is not a valid date: {c[3][i]}")
    if code == E.E_REFERRED_DATE:
        return InvalidInput(p.format("referred_by_primary_on"),
                            f"is not a valid date: {c[9][i]}")
    names = {E.E_TOTAL: "total_fen", E.E_FULL_SELFPAY: "full_selfpay_fen",
             E.E_OVER_LIMIT: "over_limit_fen", E.E_PRE_SELFPAY: "pre_selfpay_fen"}
    if code in names:
        return InvalidInput(p.format(names[code]), "must be within 0..MAX_FEN fen")
    if code == E.E_IN_SCOPE:
        return InvalidInput(p.format("total_fen"), "is less than full self-pay + over-limit "
                                                   "+ pre-self-pay")
    if code == E.E_FLAGS:
        return InvalidInput(p.format("flags"), "only bits 0..3 are defined")
    if code == E.E_INPATIENT_FLAG:
        return InvalidInput(p.format("flags"), "applies to INPATIENT claims only")
    if code == E.E_REFERRED_INPATIENT:
        return InvalidInput(p.format("referred_by_primary_on"),
                            "applies to OUTPATIENT claims only")
    if code == E.E_FACILITY_UNKNOWN:
        return NotFound(f"facility {fid!r} is not registered")
    if code == E.E_MEMBER_UNKNOWN:
        return NotFound(f"member {mid!r} is not registered")
    v = c[3][i]
    day = date(v // 10000, v // 100 % 100, v % 100)
    m = members.get(mid)
    if code == E.E_BEFORE_BENEFIT:
        return NotCovered("NOT_COVERED", f"members/{mid}", f"member {mid!r} is not covered on "
                          f"{day}: benefits start {m.benefit_start}")
    if code == E.E_AFTER_BENEFIT:
        return NotCovered("NOT_COVERED", f"members/{mid}", f"member {mid!r} is not covered on "
                          f"{day}: benefits ended {m.benefit_end}")
    if code == E.E_BEFORE_CONTINUOUS:
        return NotCovered("NOT_COVERED", f"members/{mid}", f"member {mid!r} is not covered on "
                          f"{day}: continuous contribution began {m.continuous_since}")
    if code == E.E_NO_POLICY:
        try:
            policies_error = NoPolicyInForce("date", f"no policy in force for {m.region!r} "
                                                     f"on {day}")
        except Exception:  # noqa: BLE001
            policies_error = NoPolicyInForce("date", "no policy in force")
        return policies_error
    if code >= E.E_KERNEL:
        status = code - E.E_KERNEL
        return InvalidInput(p.format("claim"), STATUS_TEXT.get(status, f"kernel status {status}"))
    return InvalidInput(p.format("claim"), f"refused (code {code})")


def error_message(i: int, e: BaseException) -> st.ItemError:
    """An ItemError as the single call's status would say it (server.errors)."""
    from server.errors import to_status
    code = code_of(e)
    out = st.ItemError(index=i, code=getattr(code_pb2, code.name) if code else code_pb2.INTERNAL)
    status = to_status(e) if code else None
    out.message = str(e) if status is None else status.details
    if isinstance(e, NoPolicyInForce):
        out.reason = "NO_POLICY_IN_FORCE"
    elif isinstance(e, InvalidInput):
        out.field = e.field
    elif isinstance(e, (NotCovered, ReferralReversed)):
        out.reason = e.kind
    return out


def encode(batch: Batch, ev: Evaluated, members, *, settlement_ids: list[str] | None = None,
           replayed: array | None = None, overrides: dict | None = None,
           errors: dict[int, BaseException] | None = None) -> bytes:
    """The SettleBatchResponse of an evaluated batch. ``overrides``: claims whose results come
    from the ledger (replays) as Settlement messages; ``errors``: refusals found after the
    evaluation (by the ledger)."""
    n = batch.n
    codes = ev.codes
    vals, counts, layer, amount, capr = _wire.gather_results(
        n, ev.out, ev.osz, codes, ev.policy,
        array("q", [p.cp.n_layers for p in ev.plans]) or array("q", [0]), ev.layer_offset,
        _wire.E_KERNEL)
    versions = [p.version for p in ev.plans]
    layer_ids = [lid for p in ev.plans for lid in p.cp.layer_ids]
    fund_codes = [f for p in ev.plans for f in p.cp.funds]
    policy = ev.policy
    errs: list[st.ItemError] = []
    status = zeros(n)
    errors = dict(errors or {})
    for i in _wire.nonzero(codes):
        if i not in errors and not (overrides and i in overrides):
            errors[i] = item_error(batch, codes, i, members)
    if errors or overrides:
        policy = array("q", policy)
        for i, e in errors.items():
            for v in vals:
                v[i] = 0
        if overrides:
            layer, amount, capr, counts = _splice(overrides, vals, policy, counts, layer,
                                                  amount, capr, versions, layer_ids, fund_codes)
        for i in sorted(errors):
            m = error_message(i, errors[i])
            errs.append(m)
            status[i] = m.code
            policy[i] = 0
            counts[i] = 0
    parts = [_wire.packed(1, status), b"".join(_wire.length_delimited(2, e.SerializeToString())
                                              for e in errs)]
    if settlement_ids is not None:
        parts.append(_wire.strings(3, settlement_ids))
        parts.append(_wire.packed(4, replayed))
    for k, v in enumerate(vals):
        parts.append(_wire.packed(5 + k, v))
    parts += [_wire.packed(13, policy), _wire.strings(14, versions), _wire.packed(15, counts),
              _wire.packed(16, layer), _wire.packed(17, amount), _wire.packed(18, capr),
              _wire.strings(19, layer_ids), _wire.strings(20, fund_codes)]
    return _wire.length_delimited(1, b"".join(parts))


def _splice(overrides, vals, policy, counts, layer, amount, capr, versions, layer_ids,
            fund_codes):
    """Put the stored results of replayed claims into the columns (rare: plain Python)."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    new_layer, new_amount, new_cap = array("q"), array("q"), array("q")
    counts = array("q", counts)
    for i in range(len(counts)):
        msg = overrides.get(i)
        if msg is None:
            a, b = starts[i], starts[i + 1]
            new_layer.extend(layer[a:b])
            new_amount.extend(amount[a:b])
            new_cap.extend(capr[a:b])
            continue
        b = msg.breakdown
        for v, x in zip(vals, (b.in_scope_fen, b.deductible_fen, msg.fund_total_fen,
                               msg.patient_total_fen, msg.account_paid_fen, msg.cash_fen,
                               msg.balance_after_fen, msg.chain_deductible_after_fen)):
            v[i] = x
        if msg.policy_version not in versions:
            versions.append(msg.policy_version)
        policy[i] = versions.index(msg.policy_version)
        counts[i] = len(msg.layers)
        for lp in msg.layers:
            layer_ids.append(lp.layer_id)
            fund_codes.append(lp.fund_code)
            new_layer.append(len(layer_ids) - 1)
            new_amount.append(lp.amount_fen)
            new_cap.append(lp.cap_remaining_fen if lp.HasField("cap_remaining_fen") else -1)
    return new_layer, new_amount, new_cap, counts


def outcomes(batch: Batch, ev: Evaluated, members: dict[str, MemberRecord | None],
             new: list[bool]) -> list[Outcome | None]:
    """The ledger outcome of every settled claim that is ``new``, None for the others: its
    deltas and its stored Settlement, encoded in C (``outcome`` is the same as a message)."""
    identity = array("q", [convert.IDENTITY_WIRE[m.identity] if m is not None else 0
                           for m in map(members.get, batch.member_ids)])
    plans = [(p.version, p.wire_layers, p.cp.layer_ids) for p in ev.plans]
    return _wire.stored_settlements(batch.n, batch.cols, ev.out, ev.osz, ev.codes, ev.policy,
                                    array("q", new), plans, batch.request_ids,
                                    batch.member_ids, batch.facility_ids, identity, Outcome)


def outcome(batch: Batch, ev: Evaluated, i: int, m: MemberRecord) -> Outcome:
    """The ledger outcome of accepted claim ``i`` built as a protobuf message: what
    ``outcomes`` encodes in C, and the reference tests/test_batch.py holds it to."""
    o, base = i * ev.osz, ev.out
    plan = ev.plans[ev.policy[i]]
    cp = plan.cp
    nl = cp.n_layers
    c = batch.cols
    v = c[3][i]
    flags = c[8][i] if c[8] else 0
    msg = ty.Settlement(
        request_id=batch.request_ids[i] if batch.request_ids else "",
        member_id=batch.member_ids[c[0][i]], facility_id=batch.facility_ids[c[1][i]],
        kind=c[2][i], service_date=ty.Date(year=v // 10000, month=v // 100 % 100, day=v % 100),
        breakdown=ty.Breakdown(total_fen=c[4][i], full_selfpay_fen=c[5][i] if c[5] else 0,
                               over_limit_fen=c[6][i] if c[6] else 0,
                               pre_selfpay_fen=c[7][i] if c[7] else 0,
                               in_scope_fen=base[o + _kernel.O_IN_SCOPE],
                               deductible_fen=base[o + _kernel.O_DEDUCTIBLE]),
        fund_total_fen=base[o + _kernel.O_FUND_TOTAL],
        patient_total_fen=base[o + _kernel.O_PATIENT_TOTAL],
        account_paid_fen=base[o + _kernel.O_ACCOUNT_PAID], cash_fen=base[o + _kernel.O_CASH],
        balance_after_fen=base[o + _kernel.O_BALANCE_AFTER], policy_version=plan.version,
        chain_deductible_after_fen=base[o + _kernel.O_CHAIN_AFTER],
        identity=convert.IDENTITY_WIRE[m.identity], childbirth=bool(flags & 8))
    applied = base[o + _kernel.O_APPLIED]
    deltas = {}
    funds: dict[str, list] = {}
    for li in range(nl):
        if not applied >> li & 1:
            continue
        lid, fund, code = plan.layers[li]
        amount = base[o + _kernel.O_LAYERS + 2 * li]
        cap = base[o + _kernel.O_LAYERS + 2 * li + 1]
        lp = msg.layers.add(layer_id=lid, fund=fund, fund_code=code, amount_fen=amount)
        if cap != _kernel.NO_VALUE:
            lp.cap_remaining_fen = cap
        added = base[o + _kernel.O_LAYERS + 2 * nl + li]
        if amount or added:
            deltas[lid] = (amount, added)
        if amount:
            funds.setdefault(code, [fund, 0])[1] += amount
    for code, (fund, amount) in funds.items():
        msg.funds.add(fund=fund, fund_code=code, amount_fen=amount)
    return Outcome(deltas=deltas, account_paid_fen=msg.account_paid_fen,
                   chain_deductible_after_fen=msg.chain_deductible_after_fen,
                   policy_version=plan.version, result=msg.SerializeToString(),
                   fund_total_fen=msg.fund_total_fen)


# --- the servicer's two methods -----------------------------------------------------------------

class BatchService:
    """PreSettleBatch and SettleBatch over a ``service.Core`` (ledger, policies)."""

    def __init__(self, core):
        self.core = core

    def _check_caller(self, batch: Batch) -> None:
        """With authentication on, every facility of the batch must be the caller's own."""
        from server import auth
        caller = auth.current()
        if caller is None or getattr(caller, "admin", False):
            return
        for k, fid in enumerate(batch.facility_ids):
            if fid != caller.facility_id:
                from server.ledger.base import Forbidden
                raise Forbidden(f"{caller} may act only as itself, not as "
                                f"{batch.prefix}.facility_ids[{k}] {fid!r}")

    def _chains(self, batch: Batch) -> None:
        """Referral chains of the requests form (resolved like Settle's, per item)."""
        chain_from = batch.chain_from
        if not chain_from:
            return
        batch.chain = zeros(batch.n)
        batch.referral = zeros(batch.n)
        for i, sid in chain_from.items():
            if i in batch.refused:
                continue
            call_member = batch.member_ids[batch.cols[0][i]]
            try:
                rec = self.core.ledger.get_settlement(sid)
                if rec.member_id != call_member:
                    raise InvalidInput("referral_from_settlement_id",
                                       f"settlement {rec.settlement_id!r} is another member's")
                if ty.Settlement.FromString(rec.result).kind != ty.CLAIM_KIND_INPATIENT:
                    raise InvalidInput("referral_from_settlement_id", f"settlement "
                                       f"{rec.settlement_id!r} is not an inpatient settlement")
                if rec.status != "SETTLED":
                    raise ReferralReversed(rec.settlement_id)
            except InvalidInput as e:
                batch.refused[i] = InvalidInput(f"requests[{i}].{e.field}", e.problem)
                continue
            except Exception as e:  # noqa: BLE001 — NotFound, NotCovered: that item's error
                if code_of(e) is None:
                    raise
                batch.refused[i] = e
                continue
            batch.chain[i] = rec.chain_deductible_after_fen
            batch.referral[i] = 1

    def pre_settle(self, request: RawBatch, context) -> bytes:
        batch = decode(request.data, settle=False)
        self._check_caller(batch)
        self._chains(batch)
        ledger = self.core.ledger.reads()
        members = dict(zip(batch.member_ids, ledger.members_of(batch.member_ids)))
        facilities = {}
        for fid in batch.facility_ids:
            try:
                facilities[fid] = ledger.get_facility(fid)
            except NotFound:
                facilities[fid] = None
        ev = evaluate(batch, self.core.policies, members, facilities, ledger.accumulators_of,
                      cached=self.core.ledger.local_reads)
        return encode(batch, ev, members)

    def settle(self, request: RawBatch, context) -> bytes:
        batch = decode(request.data, settle=True)
        self._check_caller(batch)
        self._chains(batch)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            from server.errors import DeadlinePassed
            raise DeadlinePassed("the call's deadline passed before it was settled")
        ledger = self.core.ledger
        c = batch.cols
        # A malformed claim is refused before its request id is looked at, as Settle does.
        codes = zeros(batch.n)
        for i in batch.refused:
            codes[i] = _wire.E_REFUSED
        _wire.validate_claims(batch.n, c, batch.referral, len(batch.member_ids),
                              len(batch.facility_ids), codes)
        for i in range(batch.n):
            if codes[i] and i not in batch.refused:
                batch.refused[i] = item_error(batch, codes, i, {})
        digests = _wire.request_digests(batch.n, c, batch.member_ids, batch.facility_ids,
                                        batch.request_ids, codes)
        chain_from = batch.chain_from
        items: list[BatchItem | None] = [
            None if codes[i] else BatchItem(batch.facility_ids[c[1][i]], batch.request_ids[i],
                                            digests[i], batch.member_ids[c[0][i]],
                                            c[3][i] // 10000, chain_from.get(i, ""))
            for i in range(batch.n)]
        box: dict = {}

        def run(state):
            # the facilities as the transaction reads them: a batch commits every few ms,
            # so the read cache, dropped on each commit, would miss them anyway
            present = {fid: state.facilities.get(fid) for fid in batch.facility_ids}
            # replays and conflicts are the ledger's; refusals found before keep their error
            skip = [not x for x in state.new]
            ev = evaluate(batch, self.core.policies, state.members, present,
                          lambda keys: [state.accumulators.get(k) or Accumulators(k[1])
                                        for k in keys], skip)
            box["ev"], box["members"] = ev, state.members
            return outcomes(batch, ev, state.members, state.new)

        results = ledger.settle_batch(items, run)
        ev = box.get("ev")
        members = box.get("members", {})
        if ev is None:   # nothing was new: evaluate for the shapes only
            ev = evaluate(batch, self.core.policies, {}, {},
                          lambda keys: [Accumulators(y) for _, y in keys], [True] * batch.n)
        sids = [""] * batch.n
        replayed = zeros(batch.n)
        overrides, errors = {}, {}
        for i, r in enumerate(results):
            if isinstance(r, SettleResult):
                sids[i] = r.record.settlement_id
                if not r.created:
                    replayed[i] = 1
                    overrides[i] = ty.Settlement.FromString(r.record.result)
            elif isinstance(r, BaseException):
                errors[i] = r
            elif i in batch.refused:
                errors[i] = batch.refused[i]
        for i in overrides:     # their numbers come from the stored reply (encode)
            ev.codes[i] = 0
            ev.out[i * ev.osz:(i + 1) * ev.osz] = zeros(ev.osz)
        return encode(batch, ev, members, settlement_ids=sids, replayed=replayed,
                      overrides=overrides, errors=errors)


def batch_handlers(servicer) -> dict:
    """The batch methods' handlers, for ``server.wire.add_settlement_service``: the two unary
    ones and their streams (one batch per message, answered in order, one at a time)."""
    svc = BatchService(servicer.core)
    from server.service import rpc
    raw = RawBatch.FromString

    def ident(b):
        return b

    def logged(name: str, fn):
        """``fn(request, context)`` as the servicer method ``name``: its errors mapped and one
        log line per call (for a stream: per batch) under that name."""
        def method(self, request, context):
            return fn(request, context)
        method.__name__ = method.__qualname__ = name
        return rpc(method).__get__(servicer)

    def unary(name: str, fn):
        return grpc.unary_unary_rpc_method_handler(
            logged(name, fn), request_deserializer=raw, response_serializer=ident)

    def stream(name: str, fn):
        one = logged(name, fn)

        def each(request_iterator, context):
            for request in request_iterator:
                # an error aborts the call: the stream ends with that batch's status
                yield one(request, context)
        return grpc.stream_stream_rpc_method_handler(
            each, request_deserializer=raw, response_serializer=ident)

    return {"PreSettleBatch": unary("PreSettleBatch", svc.pre_settle),
            "SettleBatch": unary("SettleBatch", svc.settle),
            "PreSettleBatchStream": stream("PreSettleBatchStream", svc.pre_settle),
            "SettleBatchStream": stream("SettleBatchStream", svc.settle)}
