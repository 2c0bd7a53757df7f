"""The single-claim calls' C path (server._single, server.fastpath.*_wire) answers exactly as
the general path does, and leaves to it every request it does not fully understand.

- ``parse_settle`` never takes a request that ``convert.validate_settle`` refuses, reads what it
  reads, and declines nothing of the fast path's kind (else that path would never be used);
- ``request_digest`` is ``convert.request_hash``, whatever encoding the caller chose;
- the PreSettle reply and the Settle outcome are byte for byte the general path's, for random
  members, claims, facility levels and accumulators (tests/test_fastpath.py's cases);
- through the servicer, the same replies, replays across both paths, and the same log line.
"""
from __future__ import annotations

import random
from dataclasses import replace
from datetime import date, timedelta

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from engine.errors import InvalidInput
from engine.loader import store
from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from server import _single, convert, fastpath
from server.ledger.base import FacilityRecord, MemberState
from server.ledger.memory import MemoryLedger
from server.service import Core, SettlementServicer
from server.wire import varint
from test_fastpath import _case, fast_and_general

# _case draws NON_DESIGNATED too: a level-2 facility registered as not designated
DESIGNATED_LEVELS = ("LEVEL_1", "LEVEL_2", "LEVEL_3")

_IDS = hs.one_of(hs.sampled_from(["", "M1", "H3", "r-1", " M1", "M1 ", "M\n1", "医院",
                                  "x" * 128, "x" * 129, "\u2028", "a\u00a0"]),
                 hs.text(max_size=6))
_AMOUNT = hs.one_of(hs.integers(0, 10 ** 6), hs.sampled_from([-1, convert.MAX_FEN,
                                                              convert.MAX_FEN + 1]))


@hs.composite
def requests(draw) -> st.SettleRequest:
    """SettleRequests, valid or not, of the fast path's kind and of every other."""
    req = st.SettleRequest(request_id=draw(_IDS), member_id=draw(_IDS),
                           facility_id=draw(_IDS), kind=draw(hs.integers(-1, 3)))
    if draw(hs.integers(0, 9)):
        req.service_date.CopyFrom(ty.Date(year=draw(hs.integers(0, 10000)),
                                          month=draw(hs.integers(0, 13)),
                                          day=draw(hs.integers(0, 32))))
    bill = draw(hs.integers(0, 9))
    if bill == 0:
        req.line_items.items.add(charge_class=ty.CHARGE_CLASS_A, amount_fen=100)
    elif bill > 1:
        req.amounts.CopyFrom(st.BillAmounts(
            total_fen=draw(_AMOUNT), full_selfpay_fen=draw(_AMOUNT) if draw(hs.booleans()) else 0,
            over_limit_fen=draw(_AMOUNT) if draw(hs.booleans()) else 0,
            pre_selfpay_fen=draw(_AMOUNT) if draw(hs.booleans()) else 0))
    for name in ("home_bed_after_transfer", "out_of_area_unfiled", "childbirth",
                 "use_personal_account"):
        setattr(req, name, draw(hs.integers(0, 3)) == 0)
    extra = draw(hs.integers(0, 12))
    if extra == 0:
        req.referral_from_settlement_id = "S1"
    elif extra == 1:
        req.referred_by_primary_on.CopyFrom(ty.Date(year=2018, month=1, day=2))
    elif extra == 2:
        req.want_trace = True
    return req


def _validated(data: bytes):
    try:
        return convert.validate_settle(st.SettleRequest.FromString(data),
                                       require_request_id=False)
    except (DecodeError, InvalidInput):
        return None


def _fast_kind(req: st.SettleRequest) -> bool:
    known = st.SettleRequest()
    known.CopyFrom(req)
    known.DiscardUnknownFields()   # the digest would cover them: the general path's to answer
    return (req.WhichOneof("bill") == "amounts" and not req.referral_from_settlement_id
            and not req.HasField("referred_by_primary_on") and not req.want_trace
            and known.SerializeToString() == req.SerializeToString())


def _check_parse(data: bytes) -> tuple | None:
    got = _single.parse_settle(data)
    call = _validated(data)
    if got is not None:
        assert call is not None, "parse_settle took a request the general path refuses"
        rid, mid, fid, kind, day, total, fsp, olim, psp, flags = got
        assert (rid, mid, fid, convert.KIND_WIRE[call.kind], call.service_date) == \
            (call.request_id, call.member_id, call.facility_id, kind, day)
        b = call.bill
        assert (total, fsp, olim, psp) == (b.total_fen, b.full_selfpay_fen, b.over_limit_fen,
                                           b.pre_selfpay_fen)
        assert flags == (call.use_account * _single.F_USE_ACCOUNT
                         | call.home_bed_after_transfer * _single.F_HOME_BED
                         | call.out_of_area_unfiled * _single.F_OUT_OF_AREA
                         | call.childbirth * _single.F_CHILDBIRTH)
        assert _single.request_digest(got) == convert.request_hash(
            st.SettleRequest.FromString(data))
    elif call is not None:
        assert not _fast_kind(st.SettleRequest.FromString(data)), \
            "parse_settle declined a valid request of its kind"
    return got


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=requests())
def test_parse_settle_takes_exactly_the_valid_requests_of_its_kind(req):
    _check_parse(req.SerializeToString())


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = varint(number << 3 | wire)
    return key + (varint(len(payload)) + payload if wire == 2 else payload)


@settings(max_examples=1500, deadline=None)
@given(req=requests(), seed=hs.integers(0, 2 ** 32))
def test_any_encoding_of_a_request_reads_and_digests_as_upb_reads_it(req, seed):
    # what a caller's encoder may choose: any field order, explicit defaults (false, 0, ""),
    # a string field sent twice (the last counts), and bytes cut or flipped anywhere
    rng = random.Random(seed)
    parts = []
    for fd, value in req.ListFields():
        parts.append(req.__class__(**{fd.name: value}).SerializeToString())
    if rng.random() < 0.3:
        parts.append(_field(9, 0, b"\x00"))       # home_bed_after_transfer: false
    if rng.random() < 0.3:
        parts.append(_field(14, 0, b"\x00"))      # want_trace: false
    if rng.random() < 0.3:
        parts.insert(0, _field(2, 2, b"earlier"))  # member_id twice: the last one counts
    if rng.random() < 0.2:
        parts.append(_field(99, 0, b"\x01"))      # an unknown field
    rng.shuffle(parts)
    data = b"".join(parts)
    _check_parse(data)
    if data and rng.random() < 0.5:
        cut = bytearray(data[:rng.randrange(len(data) + 1)])
        if cut and rng.random() < 0.5:
            cut[rng.randrange(len(cut))] ^= 1 << rng.randrange(8)
        _check_parse(bytes(cut))


def test_plain_requests_of_its_kind_are_taken():
    req = st.SettleRequest(request_id="r1", member_id="M1", facility_id="H3",
                           kind=ty.CLAIM_KIND_OUTPATIENT,
                           service_date=ty.Date(year=2018, month=2, day=28),
                           amounts=st.BillAmounts(total_fen=10_000, pre_selfpay_fen=500),
                           use_personal_account=True)
    assert _check_parse(req.SerializeToString()) == (
        "r1", "M1", "H3", ty.CLAIM_KIND_OUTPATIENT, date(2018, 2, 28), 10_000, 0, 0, 500,
        _single.F_USE_ACCOUNT)
    req.service_date.day = 29                     # not a date of 2018
    assert _check_parse(req.SerializeToString()) is None
    assert _single.parse_settle(b"") is None


def test_the_last_want_trace_of_the_bytes_is_the_one_that_counts():
    # upb keeps a scalar's last occurrence: a trace asked for and then cleared is not asked for
    req = st.SettleRequest(request_id="r1", member_id="M1", facility_id="H3",
                           kind=ty.CLAIM_KIND_OUTPATIENT,
                           service_date=ty.Date(year=2018, month=2, day=28),
                           amounts=st.BillAmounts(total_fen=10_000))
    trace_on, trace_off = b"\x70\x01", b"\x70\x00"   # field 14, varint
    assert _check_parse(trace_on + req.SerializeToString() + trace_off) is not None
    assert _check_parse(trace_off + req.SerializeToString() + trace_on) is None


# --- the same numbers, the same bytes --------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_the_c_path_builds_the_general_paths_reply_and_outcome(seed):
    policies = store()
    core, general = fast_and_general(policies)
    rng = random.Random(seed)
    compared = 0
    for _ in range(600):
        m, req, acc, level, _chain = _case(rng, policies)
        req.ClearField("referral_from_settlement_id")
        data = req.SerializeToString()
        parsed = _single.parse_settle(data)
        if parsed is None:
            assert not _fast_kind(req)
            continue
        call = convert.validate_settle(req, require_request_id=True)
        facility = FacilityRecord(req.facility_id,
                                  level if level in DESIGNATED_LEVELS else "LEVEL_2",
                                  designated=level in DESIGNATED_LEVELS)
        state = MemberState(m, acc, m.account_balance_fen, facility)
        want, msg = general.evaluate(call, convert.rule_level(facility), 0, state)
        got = fastpath.settle_wire(core, parsed, state)
        assert got == want                         # every field, the stored bytes included
        msg.status = ty.SETTLEMENT_STATUS_PRE_SETTLED
        ctx = fastpath.claim_context(m, facility, acc, m.account_balance_fen)
        assert fastpath._wire_settle(core, parsed, ctx,
                                     True) == st.SettleResponse(settlement=msg).SerializeToString()
        compared += 1
    assert compared > 300


def test_what_the_c_path_leaves_to_the_general_one():
    policies = store()
    core = Core(MemoryLedger(), policies, "kernel")
    rng = random.Random(1)
    m, req, acc, level, _ = _case(rng, policies)
    req.ClearField("referral_from_settlement_id")
    req.ClearField("referred_by_primary_on")
    req.amounts.CopyFrom(st.BillAmounts(total_fen=1000))
    f = FacilityRecord(req.facility_id, "LEVEL_1")
    parsed = _single.parse_settle(req.SerializeToString())
    def wire(member):
        return fastpath._wire_settle(core, parsed, fastpath.claim_context(member, f, acc, 0), True)
    day, one = parsed[4], timedelta(days=1)
    assert m.continuous_since <= day and m.benefit_start is None and m.benefit_end is None
    assert wire(m) is not None
    # not covered (service.check_covered): the contribution run or the benefit period, to the day
    assert wire(replace(m, continuous_since=day + one)) is None
    assert wire(replace(m, continuous_since=day)) is not None
    assert wire(replace(m, benefit_start=day + one)) is None
    assert wire(replace(m, benefit_start=day)) is not None
    assert wire(replace(m, benefit_end=day - one)) is None
    assert wire(replace(m, benefit_end=day)) is not None
    assert wire(replace(m, region="nowhere")) is None   # no policy
    assert fastpath.pre_settle_wire(core, parsed) is None   # nobody registered in this ledger


# --- through the servicer --------------------------------------------------------------------

class _Ctx:
    def time_remaining(self):
        return None

    def peer(self):
        return "ipv4:127.0.0.1:1"

    def abort(self, code, details):
        raise RuntimeError(code, details)

    def abort_with_status(self, status):
        raise RuntimeError(status.code, status.details)


def _bytes(reply) -> bytes:
    """A servicer's reply as the server sends it (server.wire: bytes pass as they are)."""
    return reply if isinstance(reply, bytes) else reply.SerializeToString()


def _servicer():
    from benchmarks import workload
    ledger = MemoryLedger()
    pop = workload.population(60, seed=3, prefix="S")
    workload.register_in(ledger, pop)
    reqs = [workload.settle_request(pop, c, f"r{i}")
            for i, c in enumerate(workload.claims(pop, 300, seed=4))]
    return SettlementServicer(Core(ledger, store(), "kernel")), ledger, reqs


def test_the_servicer_answers_the_bytes_of_the_general_path_and_replays_across_paths():
    fast, ledger, reqs = _servicer()
    general, ledger2, _ = _servicer()
    general.core.fast = False
    ctx = _Ctx()
    for i, req in enumerate(reqs):
        data = req.SerializeToString()
        pre = fast.PreSettleWire(data, ctx)
        assert pre == _bytes(general.PreSettleWire(data, ctx))
        a = st.SettleResponse.FromString(_bytes(fast.SettleWire(data, ctx)))
        b = st.SettleResponse.FromString(_bytes(general.SettleWire(data, ctx)))
        assert a.settlement.settlement_id and b.settlement.settlement_id
        a.settlement.settlement_id = b.settlement.settlement_id = ""
        assert a == b and not a.replayed
        p = st.SettleResponse.FromString(pre).settlement
        assert (p.fund_total_fen, list(p.layers)) == (a.settlement.fund_total_fen,
                                                      list(a.settlement.layers))
    assert list(ledger.journal()) and len(list(ledger.journal())) == len(reqs)
    # a resent request is a replay whichever path settled it first (one digest)
    for req in reqs[:20]:
        data = req.SerializeToString()
        assert st.SettleResponse.FromString(_bytes(general.SettleWire(data, ctx))).replayed
    fast.core.fast = False
    for req in reqs[:20]:
        assert st.SettleResponse.FromString(_bytes(fast.SettleWire(req.SerializeToString(),
                                                                   ctx))).replayed


def test_both_paths_write_the_same_log_line(caplog):
    fast, _, reqs = _servicer()
    general, _, _ = _servicer()
    general.core.fast = False
    ctx = _Ctx()
    data = reqs[0].SerializeToString()
    with caplog.at_level("INFO", logger="reimburse.rpc"):
        fast.PreSettleWire(data, ctx)
        general.PreSettleWire(data, ctx)
        fast.SettleWire(data, ctx)
        general.SettleWire(data, ctx)
    lines = [dict(r.msg) for r in caplog.records if isinstance(r.msg, dict)]
    for line in lines:
        line.pop("latency_ms")
    assert len(lines) == 4
    assert lines[0] == lines[1] == {
        "event": "rpc", "method": "PreSettle", "request_id": "r0",
        "member_id": reqs[0].member_id, "facility_id": reqs[0].facility_id, "code": "OK"}
    assert lines[2] == lines[3] == {**lines[0], "method": "Settle"}


def test_refusals_are_the_general_paths():
    fast, _, reqs = _servicer()
    ctx = _Ctx()
    req = st.SettleRequest()
    req.CopyFrom(reqs[0])
    req.member_id = "nobody"
    with pytest.raises(RuntimeError) as e:
        fast.PreSettleWire(req.SerializeToString(), ctx)
    assert e.value.args[0].name == "NOT_FOUND" and "nobody" in e.value.args[1]
    req.CopyFrom(reqs[0])
    req.request_id = ""
    with pytest.raises(RuntimeError) as e:
        fast.SettleWire(req.SerializeToString(), ctx)
    assert e.value.args[0].name == "INVALID_ARGUMENT" and "request_id" in e.value.args[1]
    with pytest.raises(RuntimeError) as e:
        fast.PreSettleWire(b"\x0a\x05ab", ctx)
    assert e.value.args[0].name == "INVALID_ARGUMENT"
