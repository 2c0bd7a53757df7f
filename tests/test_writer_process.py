"""The settlement writer process (server.writer): Settle committed by a process of its own gives
what the server's own ledger gives, and its failures lose nothing and hide nothing."""
from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from collections import OrderedDict
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest

import server.scenarios
from engine.errors import InvalidInput, NoPolicyInForce, PolicyFileError
from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from server.client import Client
from server.errors import DeadlinePassed, NotCovered
from server.ledger.base import (
    BatchItem, Conflict, LedgerUnavailable, NotFound, Outcome, ReferralReversed, SettlementRecord,
    SettleResult,
)
from server.ledger.sqlite import SqliteLedger
from server.ledger.verify import verify
from server import writer as writer_mod
from server.service import SettleJob
from server.writer import SettlementWriter, _answer
from service_fixtures import (
    ServerProcess, accumulators, add_facility, add_member, d, golden_files, inpatient,
    process_exited,
)


def writer_pid(p: ServerProcess) -> int:
    return p.wait_for(lambda r: r.get("event") == "writer process started", 10)["pid"]


def wait_exited(pid: int, timeout: float = 10) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process_exited(pid):
            return True
        time.sleep(0.02)
    return False


def register(c: Client) -> None:
    add_facility(c, "H1", ty.FACILITY_LEVEL_1)
    add_facility(c, "H3", ty.FACILITY_LEVEL_3)
    add_facility(c, "P1", ty.FACILITY_LEVEL_1)
    add_member(c, "M1", account_balance_fen=300_000, primary_facility_id="P1")
    add_member(c, "M2", identity=ty.IDENTITY_RESIDENT, primary_facility_id="P1")
    add_member(c, "ENDED", benefit_end="2018-02-28")


def outpatient(rid: str, member: str, total: int, **kw) -> st.SettleRequest:
    return st.SettleRequest(request_id=rid, member_id=member, facility_id="P1",
                            kind=ty.CLAIM_KIND_OUTPATIENT, service_date=d("2018-04-02"),
                            amounts=st.BillAmounts(total_fen=total), **kw)


def itemized(rid: str, member: str) -> st.SettleRequest:
    return st.SettleRequest(
        request_id=rid, member_id=member, facility_id="H3", kind=ty.CLAIM_KIND_INPATIENT,
        service_date=d("2018-05-10"), line_items=st.LineItems(items=[
            st.LineItem(charge_class=ty.CHARGE_CLASS_A, amount_fen=1_200_000),
            st.LineItem(charge_class=ty.CHARGE_CLASS_B, amount_fen=300_000,
                        selfpay_ratio_bp=1000),
            st.LineItem(charge_class=ty.CHARGE_CLASS_C, amount_fen=50_000)]))


# Every kind of Settle: the C path, the general path (line items, a trace, a referral), replays,
# a clash, and each refusal. "REF:<rid>" is filled in with the settlement id of <rid>.
SCRIPT: list[st.SettleRequest | tuple] = [
    inpatient("r1", "M1", "H3", 800_000),
    inpatient("r1", "M1", "H3", 800_000),                       # a replay
    inpatient("r1", "M1", "H3", 800_001),                       # the key with another body
    outpatient("r2", "M1", 45_000, use_personal_account=True),
    itemized("r3", "M1"),
    inpatient("r4", "M2", "H1", 6_000_000, day="2018-06-01", want_trace=True),
    ("REF:r4", inpatient("r5", "M2", "H3", 9_000_000, day="2018-07-01")),
    inpatient("r6", "M2", "H3", 30_000_000, day="2018-09-01"),  # to the caps
    inpatient("r7", "M2", "H3", 20_000_000, day="2018-10-01"),
    inpatient("r8", "NOBODY", "H3", 100_000),
    inpatient("r9", "M1", "NOWHERE", 100_000),
    inpatient("r10", "ENDED", "H3", 100_000),
    inpatient("r11", "M1", "H3", 100_000, day="1990-01-01"),    # before any policy
    inpatient("r12", "M1", "H3", -5),                           # refused at the boundary
]


def run_script(target: str) -> list:
    """Each call's reply (settlement ids replaced by their order of appearance) or error."""
    ids: dict[str, str] = {}
    by_request: dict[str, str] = {}
    out = []
    with Client(target) as c:
        register(c)
        for step in SCRIPT:
            if isinstance(step, tuple):
                ref, template = step
                req = st.SettleRequest()
                req.CopyFrom(template)
                req.referral_from_settlement_id = by_request[ref.removeprefix("REF:")]
            else:
                req = step
            try:
                reply = c.call(c.settlement.Settle, req)
            except grpc.RpcError as e:
                details = e.details()
                for sid, name in ids.items():
                    details = details.replace(sid, name)
                out.append((req.request_id, e.code(), details))
                continue
            sid = reply.settlement.settlement_id
            ids.setdefault(sid, f"S{len(ids)}")
            by_request.setdefault(req.request_id, sid)
            reply.settlement.settlement_id = ids[sid]
            out.append((req.request_id, reply.SerializeToString(deterministic=True)))
        for m in ("M1", "M2"):
            out.append((m, accumulators(c, m).SerializeToString(deterministic=True)))
    return out


def test_settle_through_the_writer_process_equals_settle_in_the_server(tmp_path):
    got = {}
    for mode in ("on", "off"):
        p = ServerProcess(str(tmp_path / f"{mode}.db"), "--writer-process", mode)
        try:
            started = [r for r in p.records() if r.get("event") == "writer process started"]
            got[mode] = run_script(p.target)
            if mode == "on":
                assert writer_pid(p)
            else:
                assert started == []
        finally:
            assert p.stop() == 0
    assert got["on"] == got["off"]
    outcomes = [x[1] if len(x) == 3 else "OK" for x in got["on"]]
    # the script reaches every kind of answer it means to
    assert outcomes == ["OK", "OK", grpc.StatusCode.ALREADY_EXISTS, "OK", "OK", "OK", "OK",
                        "OK", "OK", grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND,
                        grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.INVALID_ARGUMENT, "OK", "OK"]
    replay = st.SettleResponse.FromString(got["on"][1][1])
    assert replay.replayed and replay.settlement.settlement_id == "S0"
    assert replay.settlement.fund_total_fen > 0


def test_golden_scenarios_through_the_writer_process(tmp_path, capsys):
    p = ServerProcess(str(tmp_path / "golden.db"))
    try:
        assert writer_pid(p)
        files = [str(f) for f in golden_files()]
        assert server.scenarios.main(["--target", p.target, "--insecure", "--check",
                                      *files]) == 0
    finally:
        assert p.stop() == 0


def test_concurrent_settles_through_the_writer_commit_each_once(tmp_path):
    db = str(tmp_path / "c.db")
    p = ServerProcess(db)
    try:
        with Client(p.target) as c:
            register(c)
            for k in range(8):
                add_member(c, f"C{k}", account_balance_fen=50_000, primary_facility_id="P1")
        replies: dict[str, st.SettleResponse] = {}
        errors: list = []

        def send(k: int) -> None:
            with Client(p.target) as c:
                for i in range(25):
                    rid = f"c{k}-{i}"
                    req = outpatient(rid, f"C{k % 8}", 3_000 + 97 * i, use_personal_account=True)
                    try:
                        replies[rid] = c.call(c.settlement.Settle, req)
                        # every call twice: the second is the first's reply, replayed
                        again = c.call(c.settlement.Settle, req)
                        assert again.replayed and again.settlement == replies[rid].settlement
                    except Exception as e:   # noqa: BLE001 — collected, asserted below
                        errors.append(e)
        threads = [threading.Thread(target=send, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        assert len(replies) == 16 * 25
        assert len({r.settlement.settlement_id for r in replies.values()}) == 16 * 25
    finally:
        assert p.stop() == 0
    ledger = SqliteLedger(db)
    try:
        journal = list(ledger.journal())
        assert sorted(r.request_id for r in journal) == sorted(replies)
        assert verify(ledger) == []
        # the accounts paid what the replies say, never below zero
        for k in range(8):
            paid = sum(r.settlement.account_paid_fen for rid, r in replies.items()
                       if int(rid[1:].split("-")[0]) % 8 == k)
            assert ledger.get_member(f"C{k}").account_balance_fen == 50_000 - paid >= 0
    finally:
        ledger.close()


def test_a_writer_that_dies_fails_the_call_then_the_server_settles(tmp_path):
    db = str(tmp_path / "w.db")
    p = ServerProcess(db)
    try:
        pid = writer_pid(p)
        with Client(p.target) as c:
            register(c)
            first = c.call(c.settlement.Settle, inpatient("k1", "M1", "H3", 500_000))
            os.kill(pid, signal.SIGKILL)
            assert wait_exited(pid)
            with pytest.raises(grpc.RpcError) as e:
                c.call(c.settlement.Settle, inpatient("k2", "M1", "H3", 600_000))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "resend" in e.value.details()
            lost = p.wait_for(lambda r: r.get("event") == "writer process lost")
            assert lost["pid"] == pid and lost["level"] == "ERROR"
            # resent: it had not committed, so it settles now, in the server's own ledger
            again = c.call(c.settlement.Settle, inpatient("k2", "M1", "H3", 600_000))
            assert not again.replayed
            replay = c.call(c.settlement.Settle, inpatient("k1", "M1", "H3", 500_000))
            assert replay.replayed and replay.settlement == first.settlement
    finally:
        assert p.stop() == 0
    ledger = SqliteLedger(db)
    try:
        assert sorted(r.request_id for r in ledger.journal()) == ["k1", "k2"]
        assert verify(ledger) == []
    finally:
        ledger.close()


def test_the_writer_ends_with_the_server_however_the_server_ends(tmp_path):
    p = ServerProcess(str(tmp_path / "a.db"))
    pid = writer_pid(p)
    assert not process_exited(pid)
    assert p.stop() == 0                       # drained, then the writer closed and reaped
    assert wait_exited(pid, 5)
    assert not Path(f"/proc/{pid}").exists()
    p = ServerProcess(str(tmp_path / "b.db"))
    pid = writer_pid(p)
    p.proc.kill()                              # SIGKILL: the server cannot tell it
    p.proc.wait(10)
    assert wait_exited(pid, 10)


def test_without_sqlite_or_when_off_there_is_no_writer():
    p = ServerProcess("memory://")
    try:
        with Client(p.target) as c:
            register(c)
            c.call(c.settlement.Settle, inpatient("m1", "M1", "H3", 500_000))
        assert not [r for r in p.records() if r.get("event") == "writer process started"]
    finally:
        assert p.stop() == 0


ERRORS = [InvalidInput("claim.total", "must be >= 0"), NoPolicyInForce("service_date", "x"),
          PolicyFileError("a.yaml", "layers[0]", "bad"), NotCovered("ended", "M1", "ended"),
          ReferralReversed("S9"), NotFound("member 'M'"), Conflict("request id 'r'"),
          LedgerUnavailable("disk"), DeadlinePassed("late")]


@pytest.mark.parametrize("e", ERRORS, ids=lambda e: type(e).__name__)
def test_every_refusal_arrives_from_the_writer_as_itself(e):
    ok, back = pickle.loads(pickle.dumps(_answer(e)))
    assert not ok
    assert type(back) is type(e) and str(back) == str(e) and vars(back) == vars(e)


def test_an_exception_that_cannot_travel_arrives_as_a_runtime_error_naming_it():
    class Odd(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a}/{b}")
    ok, back = pickle.loads(pickle.dumps(_answer(Odd(1, 2))))
    assert not ok and type(back) is RuntimeError and str(back) == "Odd: 1/2"


def _record(created_at, reversed_at=None, deltas=None) -> SettlementRecord:
    return SettlementRecord(
        "S20181002000001", "H3", "r-1", "ab" * 32, "M1", 2018, "SETTLED",
        {"inpatient_tier1": (7765578, 9000000), "x": (0, 1)} if deltas is None else deltas,
        120, 140000, "jiangmen/2018-01-01#f43d", b"\x0a\x02ok" * 90, 15482933, created_at,
        reversed_at)


UTC8 = timezone(timedelta(hours=8))
REQ = ("r-1", "M1", "H3", 1, date(2018, 9, 30), 19095190, 321936, 0, 1376414, 5)
PLAIN = [   # what a Settle of the C path sends and gets back: written as plain values
    SettleJob(BatchItem("H3", "r-1", "ab" * 32, "M1", 2018), REQ, b"\x0a\x03r-1"),
    SettleJob(BatchItem("H3", "r-2", "cd" * 32, "M1", 2018, "S1"), REQ, b""),
    (True, SettleResult(_record(datetime(2026, 12, 7, 18, 30, 0, 123456, UTC8)), True)),
    (True, SettleResult(_record(datetime(2026, 12, 7, 10, 30, 1, 5),
                                datetime(2026, 12, 8, 1, 2, 3, 999999)), False)),
    (True, SettleResult(_record(None), True)),
]
PICKLED = [  # anything else: pickled as before
    SettleJob(BatchItem("H3", "r-1", "ab" * 32, "M1", 2018), None, b"", chain_fen=0,
              call=("a", "validated", "call")),
    SettleJob(BatchItem("H3", "r-1", "ab" * 32, "M1", 2018), REQ, b"", chain_fen=7),
    (True, SettleResult(_record(None, deltas=OrderedDict(a=(1, 2))), True)),
    (False, Conflict("request id 'r'")),
    b"ready",
]


@pytest.mark.parametrize("msg", PLAIN + PICKLED, ids=lambda m: type(m).__name__)
def test_a_message_between_the_processes_arrives_as_sent(msg):
    body = writer_mod._encode(msg)
    assert body[:1] == (b"M" if any(msg is m for m in PLAIN) else b"P")
    back = writer_mod._decode(body)
    assert type(back) is type(msg)
    if isinstance(msg, tuple) and msg and msg[0] is False:
        assert type(back[1]) is type(msg[1]) and str(back[1]) == str(msg[1])
    else:
        assert back == msg
    if type(msg) is SettleJob and msg.req is not None:
        assert type(back.item) is BatchItem and type(back.req[4]) is date
    if type(msg) is tuple and msg[0] is True:
        rec = back[1].record
        assert type(rec) is SettlementRecord
        assert rec.created_at == msg[1].record.created_at
        if rec.created_at is not None:
            assert rec.created_at.utcoffset() == msg[1].record.created_at.utcoffset()


def test_a_writer_without_a_free_channel_leaves_the_call_to_the_server():
    w = SettlementWriter(pid=0, channels=[])
    assert w.settle(object()) is None


def test_settle_many_settles_in_one_group_each_as_settle_would(tmp_path):
    ledger = SqliteLedger(str(tmp_path / "m.db"))
    try:
        from server.ledger.base import FacilityRecord, MemberRecord
        from datetime import date
        ledger.upsert_facility(FacilityRecord("H3", "LEVEL_3"))
        ledger.upsert_member(MemberRecord("M1", "EMPLOYEE", date(2010, 1, 1),
                                          account_balance_fen=1_000))
        out = Outcome(deltas={"l": (5, 7)}, account_paid_fen=300, chain_deductible_after_fen=0,
                      policy_version="v", result=b"r")
        items = [BatchItem("H3", "a", "h", "M1", 2018), BatchItem("H3", "b", "h", "NOBODY", 2018),
                 BatchItem("H3", "a", "h", "M1", 2018), BatchItem("H3", "c", "h", "M1", 2018)]
        before = ledger.groups_committed
        got = ledger.settle_many(items, [lambda s: out] * 4)
        assert ledger.groups_committed == before + 1
        assert isinstance(got[0], SettleResult) and got[0].created
        assert isinstance(got[1], NotFound)
        assert got[2].record == got[0].record and not got[2].created   # the run's own replay
        assert isinstance(got[3], SettleResult) and got[3].created
        assert ledger.get_member("M1").account_balance_fen == 1_000 - 2 * 300
        assert ledger.accumulators("M1", 2018).paid == {"l": 10}
    finally:
        ledger.close()
