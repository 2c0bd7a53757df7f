"""Crash safety: SIGKILL the server mid-load, restart it, and account for every settlement.

Clients settle (and reverse some of what they settled) from several threads at several members
of one server process; once enough are acknowledged the process is killed with SIGKILL while
calls are in flight. After a restart on the same database (SQLite file, PostgreSQL database):

- every settlement the client saw acknowledged is in the journal, returned by GetSettlement
  exactly as acknowledged (and REVERSED when its reversal was acknowledged);
- the journal holds nothing the clients did not send (no phantom settlement), and a request
  whose reply was lost is found by resending it (a replay) or settled then, never twice;
- nothing is half-applied: the accumulators equal a replay of the journal and every account
  balance its movements (``server.ledger.verify``, also as the operator's command, exit 0).

Two kill/restart rounds per backend; each round's load is bounded in calls and time.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from server.client import Client
from server.ledger.base import open_ledger
from server.ledger.verify import verify
from service_fixtures import (
    DURABLE_BACKENDS, ROOT, ServerProcess, add_facility, add_member, database_for, d, inpatient,
)

MEMBERS = [f"M{i}" for i in range(4)]
THREADS = 6
CALLS_PER_THREAD = 400       # an upper bound: the kill comes long before
ACKS_BEFORE_KILL = 40        # per round
ROUND_TIMEOUT_S = 30


class Load:
    """Settle and reverse from several threads; record what the server acknowledged."""

    def __init__(self, target: str, round_: int):
        self.target, self.round = target, round_
        self.lock = threading.Lock()
        self.acked: dict[str, st.SettleRequest] = {}          # request id -> request
        self.replies: dict[str, object] = {}                    # request id -> Settlement
        self.in_doubt: dict[str, st.SettleRequest] = {}       # sent, no reply
        self.reversed: set[str] = set()                        # settlement ids
        self.reverse_in_doubt: set[str] = set()
        self.errors: list[str] = []
        self.stop = threading.Event()

    def request(self, t: int, i: int) -> st.SettleRequest:
        member = MEMBERS[(t + i) % len(MEMBERS)]
        rid = f"k{self.round}-t{t}-{i}"
        if i % 4 == 3:
            return st.SettleRequest(request_id=rid, member_id=member, facility_id="P1",
                                    kind=ty.CLAIM_KIND_OUTPATIENT, service_date=d("2018-05-02"),
                                    amounts=st.BillAmounts(total_fen=5_000 + i),
                                    use_personal_account=True)
        return inpatient(rid, member, "H3" if i % 2 else "H1", 150_000 + 7_919 * i,
                         day="2018-04-01", use_personal_account=i % 3 == 0)

    def worker(self, t: int) -> None:
        with Client(self.target, timeout=10) as c:
            for i in range(CALLS_PER_THREAD):
                if self.stop.is_set():
                    return
                req = self.request(t, i)
                try:
                    s = c.call(c.settlement.Settle, req).settlement
                except grpc.RpcError as e:
                    with self.lock:
                        self.in_doubt[req.request_id] = req
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                        grpc.StatusCode.DEADLINE_EXCEEDED):
                        self.errors.append(f"{req.request_id}: {e.code().name} {e.details()}")
                    return  # the server is gone
                with self.lock:
                    self.acked[req.request_id] = req
                    self.replies[req.request_id] = s
                if i % 5 == 4:  # reverse every fifth settlement it made
                    try:
                        c.call(c.settlement.Reverse, st.ReverseRequest(
                            settlement_id=s.settlement_id, facility_id=req.facility_id))
                    except grpc.RpcError:
                        with self.lock:
                            self.reverse_in_doubt.add(s.settlement_id)
                        return
                    with self.lock:
                        self.reversed.add(s.settlement_id)

    def run_and_kill(self, server: ServerProcess) -> None:
        threads = [threading.Thread(target=self.worker, args=(t,)) for t in range(THREADS)]
        for th in threads:
            th.start()
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while len(self.acked) < ACKS_BEFORE_KILL and time.monotonic() < deadline:
            time.sleep(0.005)
        server.proc.send_signal(signal.SIGKILL)     # mid-load: calls are in flight
        server.proc.wait(10)
        for th in threads:
            th.join(30)
        self.stop.set()


def check_after_restart(target: str, load: Load, db: str) -> None:
    with Client(target) as c:
        for rid, req in load.acked.items():
            sent = load.replies[rid]
            got = c.call(c.settlement.GetSettlement,
                         st.GetSettlementRequest(settlement_id=sent.settlement_id)).settlement
            want = ty.Settlement()
            want.CopyFrom(sent)
            if sent.settlement_id in load.reversed:
                want.status = ty.SETTLEMENT_STATUS_REVERSED
            elif sent.settlement_id in load.reverse_in_doubt:
                want.status = got.status   # either outcome is whole
            assert got == want, rid
    ledger = open_ledger(db)
    try:
        journal = {r.request_id: r for r in ledger.journal()}
        for rid, sent in load.replies.items():
            assert journal[rid].settlement_id == sent.settlement_id
        assert verify(ledger) == []
    finally:
        ledger.close()
    r = subprocess.run([sys.executable, "-m", "server.ledger.verify", "--database", db],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify: clean" in r.stdout


def resend_in_doubt(target: str, load: Load) -> None:
    """A lost reply is recovered by resending: a replay if it committed, else settled now."""
    with Client(target) as c:
        for rid, req in load.in_doubt.items():
            reply = c.call(c.settlement.Settle, req)
            assert reply.settlement.request_id == rid


@pytest.mark.parametrize("kind", DURABLE_BACKENDS)
def test_sigkill_mid_load_loses_nothing_acknowledged_and_half_applies_nothing(kind, request,
                                                                              tmp_path):
    db = database_for(kind, request, tmp_path)
    p = ServerProcess(db)
    try:
        with Client(p.target) as c:
            add_facility(c, "H1", ty.FACILITY_LEVEL_1)
            add_facility(c, "H3", ty.FACILITY_LEVEL_3)
            add_facility(c, "P1", ty.FACILITY_LEVEL_1)
            for m in MEMBERS:
                add_member(c, m, account_balance_fen=5_000_000, primary_facility_id="P1")
        all_acked: dict[str, object] = {}
        all_in_doubt: set[str] = set()
        for round_ in range(2):
            load = Load(p.target, round_)
            load.run_and_kill(p)
            assert not load.errors, load.errors
            assert len(load.acked) >= ACKS_BEFORE_KILL
            assert load.in_doubt, "the kill should have cut calls in flight"
            all_acked.update(load.replies)
            all_in_doubt |= set(load.in_doubt)
            p = ServerProcess(db)                      # restart on the same database
            check_after_restart(p.target, load, db)
            # no phantom: the journal holds only what was sent (acknowledged or in doubt)
            assert {r.request_id for r in _journal(db)} <= set(all_acked) | all_in_doubt
            resend_in_doubt(p.target, load)
            after = _journal(db)
            assert len(after) == len({r.request_id for r in after})   # never settled twice
            assert {r.request_id for r in after} >= set(load.in_doubt)
            assert not _verify(db)
        # the earlier rounds' settlements are all still there
        journal = {r.request_id for r in _journal(db)}
        assert set(all_acked) <= journal
    finally:
        if p.proc.poll() is None:
            assert p.stop() == 0


def _journal(db: str) -> list:
    ledger = open_ledger(db)
    try:
        return list(ledger.journal())
    finally:
        ledger.close()


def _verify(db: str) -> list[str]:
    ledger = open_ledger(db)
    try:
        return verify(ledger)
    finally:
        ledger.close()
