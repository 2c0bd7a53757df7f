"""PreSettleBatch and SettleBatch: the columnar codec, results equal to settling one by one,
per-claim refusals, one transaction per batch, idempotency per claim (also across Settle);
their streams: batches in order, a failing batch ends the stream."""
from __future__ import annotations

import random
import sqlite3
import tempfile
from array import array
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2
from hypothesis import given, settings
from hypothesis import strategies as hs

from benchmarks import batchload, workload
from reimburse.v1 import registry_pb2 as reg
from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from server import _wire
from server.ledger.memory import MemoryLedger
from server.ledger.verify import verify
from service_fixtures import running_server, sqlite_ledger


# --- the codec -----------------------------------------------------------------------------------

def _random_columns(rng: random.Random, n: int) -> st.ClaimColumns:
    c = st.ClaimColumns(member_ids=[f"M{k}" for k in range(rng.randrange(1, 5))] + ["成员"],
                        facility_ids=["H1", "H2"],
                        member=[rng.randrange(6) for _ in range(n)],
                        facility=[rng.randrange(3) for _ in range(n)],
                        kind=[rng.randrange(4) for _ in range(n)],
                        service_date=[rng.randrange(2**32) for _ in range(n)],
                        total_fen=[rng.randrange(-2**63, 2**63) for _ in range(n)],
                        request_ids=[f"r{k}" for k in range(n)] if rng.random() < 0.5 else [])
    for name in ("full_selfpay_fen", "over_limit_fen", "pre_selfpay_fen"):
        if rng.random() < 0.5:
            getattr(c, name).extend(rng.randrange(2**40) for _ in range(n))
    if rng.random() < 0.5:
        c.flags.extend(rng.randrange(16) for _ in range(n))
    return c


@pytest.mark.parametrize("seed", range(30))
def test_the_c_decoder_reads_what_upb_wrote(seed):
    rng = random.Random(seed)
    cols = _random_columns(rng, rng.randrange(0, 300))
    data = st.SettleBatchRequest(claims=cols).SerializeToString()
    if seed % 3 == 0:   # the same message in two parts: repeated fields concatenate
        half = st.ClaimColumns(member=cols.member[:3])
        data = (st.SettleBatchRequest(claims=half).SerializeToString()
                + st.SettleBatchRequest(claims=st.ClaimColumns(
                    member=cols.member[3:])).SerializeToString())
        cols = st.SettleBatchRequest.FromString(data).claims
    has_requests, mids, fids, rids, got = _wire.decode_batch(data)
    assert not has_requests
    assert (mids, fids, rids) == (list(cols.member_ids), list(cols.facility_ids),
                                  list(cols.request_ids))
    for k, name in enumerate(_wire.INT_COLUMNS):
        assert list(got[k]) == list(getattr(cols, name)), name


def test_the_c_decoder_reads_unpacked_repeated_fields_and_skips_unknown_ones():
    # field 7 (total_fen) unpacked twice, an unknown field 99 (varint), field 1 (member id)
    inner = b"\x38\x05" + b"\x38\x07" + b"\x98\x06\x01" + b"\x0a\x02M1"
    data = _wire.length_delimited(1, inner)
    _, mids, _, _, got = _wire.decode_batch(data)
    assert mids == ["M1"] and list(got[4]) == [5, 7]
    assert list(st.SettleBatchRequest.FromString(data).claims.total_fen) == [5, 7]


@pytest.mark.parametrize("bad", [b"\x0a\x05\x38", b"\x0a\x02\xff\xff", b"\x0a\x03\x0a\x01\xff",
                                 b"\x0f"])
def test_the_c_decoder_refuses_bad_bytes(bad):
    with pytest.raises(_wire.WireError):
        _wire.decode_batch(bad)


@pytest.mark.parametrize("seed", range(10))
def test_packed_columns_parse_back_in_upb(seed):
    rng = random.Random(seed)
    values = array("q", [rng.randrange(-2**63, 2**63) for _ in range(rng.randrange(0, 200))])
    msg = st.SettlementColumns.FromString(_wire.packed(7, values)
                                          + _wire.strings(19, ["a", "层"]))
    assert list(msg.fund_total_fen) == list(values)
    assert list(msg.layer_ids) == ["a", "层"]


# --- over the wire ---------------------------------------------------------------------------

@pytest.fixture(params=["memory", "sqlite"])
def srv(request, tmp_path):
    ledger = MemoryLedger() if request.param == "memory" else sqlite_ledger(tmp_path / "l.db")
    with running_server(ledger) as r:
        yield r


def _register(c, pop) -> None:
    for f in pop.facilities:
        c.call(c.registry.UpsertFacility, reg.UpsertFacilityRequest(facility=f))
    for m in pop.members:
        c.call(c.registry.UpsertMember, reg.UpsertMemberRequest(member=m))


def _claims(pop, n=300, members=12, seed=4) -> st.ClaimColumns:
    cols = batchload.batch_columns(pop, n, members, seed)
    cols.request_ids.extend(f"b{seed}-{i}" for i in range(n))
    return cols


def _single(cols: st.ClaimColumns, i: int) -> st.SettleRequest:
    v, flags = cols.service_date[i], cols.flags[i]
    return st.SettleRequest(
        request_id=cols.request_ids[i], member_id=cols.member_ids[cols.member[i]],
        facility_id=cols.facility_ids[cols.facility[i]], kind=cols.kind[i],
        service_date=ty.Date(year=v // 10000, month=v // 100 % 100, day=v % 100),
        amounts=st.BillAmounts(total_fen=cols.total_fen[i],
                               full_selfpay_fen=cols.full_selfpay_fen[i],
                               over_limit_fen=cols.over_limit_fen[i],
                               pre_selfpay_fen=cols.pre_selfpay_fen[i]),
        use_personal_account=bool(flags & 1), out_of_area_unfiled=bool(flags & 4))


def _row(res: st.SettlementColumns, i: int, start: int) -> tuple:
    layers = tuple((res.layer_ids[res.layer[k]], res.layer_amount_fen[k],
                    res.layer_cap_remaining_fen[k])
                   for k in range(start, start + res.layer_count[i]))
    return (res.code[i], res.in_scope_fen[i], res.deductible_fen[i], res.fund_total_fen[i],
            res.patient_total_fen[i], res.account_paid_fen[i], res.cash_fen[i],
            res.balance_after_fen[i], res.chain_deductible_after_fen[i], layers)


def _rows(res: st.SettlementColumns) -> list[tuple]:
    out, start = [], 0
    for i in range(len(res.code)):
        out.append(_row(res, i, start))
        start += res.layer_count[i]
    return out


def _from_settlement(s: ty.Settlement) -> tuple:
    b = s.breakdown
    return (0, b.in_scope_fen, b.deductible_fen, s.fund_total_fen, s.patient_total_fen,
            s.account_paid_fen, s.cash_fen, s.balance_after_fen, s.chain_deductible_after_fen,
            tuple((p.layer_id, p.amount_fen,
                   p.cap_remaining_fen if p.HasField("cap_remaining_fen") else -1)
                  for p in s.layers))


def test_a_batch_settles_exactly_as_the_same_claims_one_by_one(tmp_path):
    pop = workload.population(60, seed=3, prefix="B")
    cols = _claims(pop)
    with running_server(sqlite_ledger(tmp_path / "a.db")) as a, \
            running_server(MemoryLedger()) as b:
        _register(a.client, pop)
        _register(b.client, pop)
        req = st.SettleBatchRequest(claims=cols)
        pre = a.client.call(a.client.settlement.PreSettleBatch, req).results
        done = a.client.call(a.client.settlement.SettleBatch, req).results
        one_by_one = [_from_settlement(b.client.call(b.client.settlement.Settle,
                                                     _single(cols, i)).settlement)
                      for i in range(len(cols.member))]
        assert _rows(pre) == _rows(done) == one_by_one
        # the stored Settlement of a batch claim is the single call's, less accumulators_after
        c = a.client
        for i in (0, 7, len(cols.member) - 1):
            s = c.call(c.settlement.GetSettlement, st.GetSettlementRequest(
                settlement_id=done.settlement_ids[i])).settlement
            single = b.client.call(b.client.settlement.Settle, _single(cols, i)).settlement
            assert single.settlement_id != s.settlement_id
            single.ClearField("accumulators_after")
            single.settlement_id = s.settlement_id
            assert s == single
        assert verify(a.ledger) == []
        # the requests form gives the same results
        c2 = b.client
        again = c2.call(c2.settlement.PreSettleBatch, st.SettleBatchRequest(
            requests=[_single(cols, i) for i in range(5)])).results
        assert [r[0] for r in _rows(again)] == [0] * 5


def test_refused_claims_commit_nothing_and_the_others_commit_together(srv):
    c = srv.client
    pop = workload.population(10, seed=5, prefix="R")
    _register(c, pop)
    cols = _claims(pop, n=20, members=4, seed=6)
    cols.service_date[3] = 20180230                 # invalid date
    cols.member_ids.append("NOBODY")
    cols.member[5] = len(cols.member_ids) - 1       # unknown member
    cols.total_fen[8] = -1                          # negative amount
    cols.request_ids[11] = ""                       # missing request id
    res = c.call(c.settlement.SettleBatch, st.SettleBatchRequest(claims=cols)).results
    refused = {3: code_pb2.INVALID_ARGUMENT, 5: code_pb2.NOT_FOUND, 8: code_pb2.INVALID_ARGUMENT,
               11: code_pb2.INVALID_ARGUMENT}
    assert {i: res.code[i] for i in range(20) if res.code[i]} == refused
    assert [e.index for e in res.errors] == sorted(refused)
    assert res.errors[0].field == "claims.service_date[3]"
    assert "NOBODY" in res.errors[1].message
    assert all(bool(res.settlement_ids[i]) == (i not in refused) for i in range(20))
    journal = {r.request_id for r in srv.ledger.journal()}
    assert journal == {cols.request_ids[i] for i in range(20) if i not in refused}
    if hasattr(srv.ledger, "audit"):
        assert verify(srv.ledger) == []


def test_a_batch_is_idempotent_per_claim_also_across_settle(srv):
    c = srv.client
    pop = workload.population(10, seed=7, prefix="I")
    _register(c, pop)
    cols = _claims(pop, n=30, members=5, seed=8)
    first = c.call(c.settlement.SettleBatch, st.SettleBatchRequest(claims=cols)).results
    assert not any(first.replayed) and not any(first.code)
    again = c.call(c.settlement.SettleBatch, st.SettleBatchRequest(claims=cols)).results
    assert all(again.replayed) and list(again.settlement_ids) == list(first.settlement_ids)
    assert _rows(again) == _rows(first)
    # one claim of the batch, resent alone with Settle: the same settlement, replayed
    r = c.call(c.settlement.Settle, _single(cols, 4))
    assert r.replayed and r.settlement.settlement_id == first.settlement_ids[4]
    # a single Settle first, then the batch: that claim is a replay in the batch
    extra = _claims(pop, n=6, members=3, seed=9)
    single = c.call(c.settlement.Settle, _single(extra, 2))
    res = c.call(c.settlement.SettleBatch, st.SettleBatchRequest(claims=extra)).results
    assert list(res.replayed) == [i == 2 for i in range(6)]
    assert res.settlement_ids[2] == single.settlement.settlement_id
    # the same key with another body: ALREADY_EXISTS for that claim only
    extra.total_fen[0] += 1
    extra.request_ids.extend([])
    res = c.call(c.settlement.SettleBatch, st.SettleBatchRequest(claims=extra)).results
    assert res.code[0] == code_pb2.ALREADY_EXISTS and all(res.replayed[1:])
    # a key twice in one batch, same body: settled once, the second a replay of the first
    dup = _claims(pop, n=2, members=1, seed=10)
    for name in ("member", "facility", "kind", "service_date", "total_fen", "full_selfpay_fen",
                 "over_limit_fen", "pre_selfpay_fen", "flags"):
        getattr(dup, name)[1] = getattr(dup, name)[0]
    dup.request_ids[1] = dup.request_ids[0]
    res = c.call(c.settlement.SettleBatch, st.SettleBatchRequest(claims=dup)).results
    assert list(res.replayed) == [False, True]
    assert res.settlement_ids[0] == res.settlement_ids[1]


def test_a_batch_whose_commit_fails_commits_nothing_and_can_be_resent(tmp_path):
    ledger = sqlite_ledger(tmp_path / "l.db")
    with running_server(ledger) as srv:
        c = srv.client
        pop = workload.population(10, seed=11, prefix="F")
        _register(c, pop)
        cols = _claims(pop, n=50, members=5, seed=12)
        real = ledger._commit
        ledger._commit = lambda conn: (_ for _ in ()).throw(
            sqlite3.OperationalError("disk I/O error (injected)"))
        with pytest.raises(grpc.RpcError) as e:
            c.call(c.settlement.SettleBatch, st.SettleBatchRequest(claims=cols))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert list(ledger.journal()) == []
        ledger._commit = real
        res = c.call(c.settlement.SettleBatch, st.SettleBatchRequest(claims=cols)).results
        assert not any(res.code) and not any(res.replayed)
        assert len(list(ledger.journal())) == 50
        assert verify(ledger) == []


def _part(cols: st.ClaimColumns, a: int, b: int) -> st.SettleBatchRequest:
    """Claims a..b-1 of ``cols`` as a batch of their own (same id tables)."""
    out = st.ClaimColumns(member_ids=cols.member_ids, facility_ids=cols.facility_ids)
    for f in ("member", "facility", "kind", "service_date", "total_fen", "full_selfpay_fen",
              "over_limit_fen", "pre_selfpay_fen", "flags", "request_ids"):
        getattr(out, f).extend(getattr(cols, f)[a:b])
    return st.SettleBatchRequest(claims=out)


def test_a_stream_of_batches_is_the_batches_in_order(srv):
    """Each batch of a stream is answered as its own call would be, and later batches see the
    earlier ones: three parts streamed settle as the whole in one SettleBatch."""
    c = srv.client
    pop = workload.population(30, seed=13, prefix="S")
    _register(c, pop)
    cols = _claims(pop, n=240, members=6, seed=14)
    parts = [_part(cols, 0, 70), _part(cols, 70, 150), _part(cols, 150, 240)]
    pre = [r.results for r in c.settlement.PreSettleBatchStream(iter(parts), timeout=30)]
    assert [_rows(r) for r in pre] == [
        _rows(c.call(c.settlement.PreSettleBatch, p).results) for p in parts]
    done = [r.results for r in c.settlement.SettleBatchStream(iter(parts), timeout=30)]
    with running_server(MemoryLedger()) as other:
        _register(other.client, pop)
        whole = other.client.call(other.client.settlement.SettleBatch,
                                  st.SettleBatchRequest(claims=cols)).results
    assert sum((_rows(r) for r in done), []) == _rows(whole)
    assert not any(x for r in done for x in r.replayed)
    assert len(list(srv.ledger.journal())) == 240
    # the stream again: every claim a replay of its settlement, nothing settled twice
    again = [r.results for r in c.settlement.SettleBatchStream(iter(parts), timeout=30)]
    assert all(all(r.replayed) for r in again)
    assert [list(r.settlement_ids) for r in again] == [list(r.settlement_ids) for r in done]
    assert len(list(srv.ledger.journal())) == 240
    if hasattr(srv.ledger, "audit"):
        assert verify(srv.ledger) == []


@settings(max_examples=12, deadline=None, database=None)
@given(cuts=hs.lists(hs.integers(1, 119), max_size=6, unique=True))
def test_however_a_batch_is_cut_into_a_stream_the_ledger_ends_the_same(cuts):
    """Any cut of 120 claims into stream messages settles them as one SettleBatch does: the
    same results claim by claim, the same accumulators and balances."""
    pop = workload.population(12, seed=19, prefix="H")
    cols = _claims(pop, n=120, members=5, seed=20)
    bounds = [0, *sorted(cuts), 120]
    parts = [_part(cols, a, b) for a, b in zip(bounds, bounds[1:])]
    with tempfile.TemporaryDirectory() as d, \
            running_server(sqlite_ledger(Path(d) / "a.db")) as a, \
            running_server(MemoryLedger()) as b:
        _register(a.client, pop)
        _register(b.client, pop)
        streamed = [r.results for r in a.client.settlement.SettleBatchStream(iter(parts),
                                                                            timeout=30)]
        whole = b.client.call(b.client.settlement.SettleBatch,
                              st.SettleBatchRequest(claims=cols)).results
        assert sum((_rows(r) for r in streamed), []) == _rows(whole)
        for m in pop.members:
            assert a.ledger.get_member(m.member_id) == b.ledger.get_member(m.member_id)
            for year in (2018, 2019, 2020):
                assert a.ledger.accumulators(m.member_id, year) == \
                    b.ledger.accumulators(m.member_id, year)
        assert verify(a.ledger) == []


def test_a_failing_batch_ends_the_stream_and_the_batches_before_it_stand(srv):
    c = srv.client
    pop = workload.population(10, seed=15, prefix="E")
    _register(c, pop)
    cols = _claims(pop, n=30, members=3, seed=16)
    good, later = _part(cols, 0, 10), _part(cols, 20, 30)
    bad = _part(cols, 10, 20)
    del bad.claims.request_ids[3:]                   # SettleBatch needs one id per claim
    answered = []
    with pytest.raises(grpc.RpcError) as e:
        for r in c.settlement.SettleBatchStream(iter([good, bad, later]), timeout=30):
            answered.append(r.results)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request id" in e.value.details()
    assert len(answered) == 1 and not any(answered[0].code)
    journal = {r.request_id for r in srv.ledger.journal()}
    assert journal == set(good.claims.request_ids)
    # resending from the failed batch on settles the rest, the first batch stays as it was
    rest = [r.results for r in c.settlement.SettleBatchStream(iter([good, later]), timeout=30)]
    assert all(rest[0].replayed) and not any(rest[1].replayed)
    assert list(rest[0].settlement_ids) == list(answered[0].settlement_ids)


def test_a_batch_sees_a_member_changed_since_the_batch_before(srv):
    """What a member record gives a batch is kept between batches while the record is the
    cached one (server/_wire.pyx member_table): a registry change must show at once."""
    c = srv.client
    pop = workload.population(8, seed=17, prefix="U")
    _register(c, pop)
    cols = _claims(pop, n=12, members=3, seed=18)
    del cols.flags[:]                                # no account payments: balance_after = balance
    req = st.SettleBatchRequest(claims=cols)
    first = {cols.member[i]: i for i in reversed(range(12))}   # each member's first claim
    by_id = {m.member_id: m for m in pop.members}

    def balances():
        res = c.call(c.settlement.PreSettleBatch, req).results
        return {k: res.balance_after_fen[i] for k, i in first.items()}
    assert balances() == {k: by_id[cols.member_ids[k]].account_balance_fen for k in first}
    changed = by_id[cols.member_ids[cols.member[0]]]
    changed.account_balance_fen += 12_345
    c.call(c.registry.UpsertMember, reg.UpsertMemberRequest(member=changed))
    assert balances() == {k: by_id[cols.member_ids[k]].account_balance_fen for k in first}


def test_a_malformed_batch_is_invalid_argument(srv):
    c = srv.client
    bad = st.SettleBatchRequest(claims=st.ClaimColumns(member_ids=["M"], facility_ids=["H"],
                                                       member=[0, 0], facility=[0]))
    with pytest.raises(grpc.RpcError) as e:
        c.call(c.settlement.PreSettleBatch, bad)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "claims.facility" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        c.call(c.settlement.SettleBatch, st.SettleBatchRequest(claims=st.ClaimColumns(
            member_ids=["M"], facility_ids=["H"], member=[0], facility=[0], kind=[1],
            service_date=[20180101], total_fen=[1])))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request id" in e.value.details()


@pytest.mark.parametrize("seed", range(6))
def test_the_c_encoded_stored_settlements_are_what_upb_encodes(seed):
    """``batch.outcomes`` (C) against ``batch.outcome`` (a protobuf message, serialized by
    upb) for every settled claim of a batch: the same bytes and the same deltas. Heavy
    members reach the caps, so layers with and without a remaining cap both occur."""
    from engine.loader import store
    from engine.model import Accumulators
    from server import batch, convert
    pop = workload.population(300, seed=seed, prefix=f"E{seed}")
    cols = _claims(pop, n=1000, members=60, seed=seed)
    b = batch.decode(_wire.length_delimited(1, cols.SerializeToString()), settle=True)
    members = {m.member_id: convert.member_from_wire(m) for m in pop.members}
    facilities = {f.facility_id: convert.facility_from_wire(f) for f in pop.facilities}
    ev = batch.evaluate(b, store(), members, facilities,
                        lambda keys: [Accumulators(y) for _, y in keys])
    new = [i % 7 != 3 for i in range(b.n)]          # some claims are replays: no outcome
    got = batch.outcomes(b, ev, members, new)
    settled = capped = 0
    for i in range(b.n):
        ok = new[i] and ev.codes[i] == 0 and ev.out[i * ev.osz] == 0
        if not ok:
            assert got[i] is None
            continue
        want = batch.outcome(b, ev, i, members[b.member_ids[b.cols[0][i]]])
        assert type(got[i]) is type(want)              # the ledger's Outcome, made in C
        assert got[i].result == want.result, i
        assert got[i].deltas == want.deltas
        assert (got[i].account_paid_fen, got[i].chain_deductible_after_fen,
                got[i].policy_version, got[i].fund_total_fen) == \
               (want.account_paid_fen, want.chain_deductible_after_fen, want.policy_version,
                want.fund_total_fen)
        msg = ty.Settlement.FromString(got[i].result)
        settled += 1
        capped += any(lp.HasField("cap_remaining_fen") for lp in msg.layers)
    assert settled > 500 and capped > 0


@pytest.mark.parametrize("value", ["M1", "a b", "x" * 128, "x" * 129, "", " M1", "M1 ", "M\t1",
                                   "M\n1", "\u00e9\u4e2d", "M\u200b1", "M\u00a01", "\u3000M"])
def test_the_c_id_check_refuses_what_convert_check_id_refuses(value):
    from engine.errors import InvalidInput
    from server import convert
    try:
        convert.check_id(value, "f")
        refused = False
    except InvalidInput:
        refused = True
    assert (_wire.first_bad_id(["ok", value, "ok2"], convert.MAX_ID_LEN) == 1) is refused
    assert _wire.first_bad_id(["ok", "ok2"], convert.MAX_ID_LEN) == -1
