"""Group commit in the SQLite ledger: concurrent settlements share one transaction and one fsync,
and a failure of that transaction fails every settlement of the group, none half-applied."""
from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from ledger_fixtures import YEAR, facility, member, paying
from reimburse.v1 import types_pb2 as ty
from server.ledger.base import LedgerUnavailable
from server.ledger.sqlite import SqliteLedger
from server.ledger.verify import verify
from service_fixtures import add_facility, add_member, inpatient, running_server

N = 12


def _ledger(tmp_path) -> SqliteLedger:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    ledger.upsert_facility(facility("F1"))
    for k in range(N):
        ledger.upsert_member(member(f"M{k}", balance=100))
    return ledger


def _queue_behind_a_held_unit(ledger: SqliteLedger, n: int, submit):
    """Hold the committer in a first unit until ``n`` more units wait, then let it go:
    those ``n`` then make one group. Returns the futures of the ``n``."""
    held, go = threading.Event(), threading.Event()

    def blocking(state):
        held.set()
        assert go.wait(10)
        return paying(1, 10**9)(state)

    pool = ThreadPoolExecutor(n + 1)
    first = pool.submit(ledger.settle, facility_id="F1", request_id="first", request_hash="h",
                        member_id="M0", year=YEAR, evaluate=blocking)
    assert held.wait(10)
    futures = [pool.submit(submit, k) for k in range(n)]
    end = time.monotonic() + 10
    while len(ledger._queue) < n and time.monotonic() < end:
        time.sleep(0.001)
    assert len(ledger._queue) == n
    go.set()
    first.result(10)
    pool.shutdown(wait=False)
    return futures


def _settle(ledger, k: int, tag: str = "r", evaluate=None):
    return ledger.settle(facility_id="F1", request_id=f"{tag}{k}", request_hash="h",
                         member_id=f"M{k}", year=YEAR,
                         evaluate=evaluate or paying(70, 1000, account=30))


def test_concurrent_settlements_share_one_transaction(tmp_path):
    ledger = _ledger(tmp_path)
    try:
        before = ledger.groups_committed
        futures = _queue_behind_a_held_unit(ledger, N, lambda k: _settle(ledger, k))
        results = [f.result(10) for f in futures]
        assert all(r.created for r in results)
        # the held unit's transaction, then ONE transaction (one fsync) for all N
        assert ledger.groups_committed - before == 2
        assert len(list(ledger.journal())) == N + 1
        assert verify(ledger) == []
    finally:
        ledger.close()


def test_a_failed_commit_fails_every_settlement_of_the_group_and_applies_none(tmp_path):
    ledger = _ledger(tmp_path)
    try:
        real_commit = ledger._commit
        commits = []

        def failing_commit(c):
            commits.append(1)
            if len(commits) == 2:              # the group after the held unit's
                raise sqlite3.OperationalError("disk I/O error (injected)")
            real_commit(c)

        # in place before the held unit goes: the committer takes the next group at once
        ledger._commit = failing_commit
        futures = _queue_behind_a_held_unit(ledger, N, lambda k: _settle(ledger, k))
        errors = []
        for f in futures:
            with pytest.raises(LedgerUnavailable) as e:
                f.result(10)
            errors.append(e.value)
        assert len(errors) == N and "disk I/O error" in str(errors[0])
        # none of the group is there: no journal row, no accumulator, no account movement
        assert [r.request_id for r in ledger.journal()] == ["first"]
        for k in range(1, N):
            assert ledger.accumulators(f"M{k}", YEAR).paid == {}
            assert ledger.get_member(f"M{k}").account_balance_fen == 100
        assert verify(ledger) == []
        # resending the same requests settles each exactly once
        with ThreadPoolExecutor(N) as pool:
            again = list(pool.map(lambda k: _settle(ledger, k), range(N)))
        assert all(r.created for r in again)
        assert {r.request_id for r in ledger.journal()} == {"first", *(f"r{k}" for k in range(N))}
        assert ledger.get_member("M1").account_balance_fen == 70
        assert verify(ledger) == []
    finally:
        ledger.close()


def test_one_refused_settlement_does_not_fail_the_others_of_its_group(tmp_path):
    ledger = _ledger(tmp_path)
    try:
        def refusing(state):
            raise ValueError("this one's evaluation fails")

        def submit(k):
            return _settle(ledger, k, evaluate=refusing if k == 3 else None)

        futures = _queue_behind_a_held_unit(ledger, N, submit)
        for k, f in enumerate(futures):
            if k == 3:
                with pytest.raises(ValueError):
                    f.result(10)
            else:
                assert f.result(10).created
        assert len(list(ledger.journal())) == N   # the held one + N - 1
        assert ledger.accumulators("M3", YEAR).paid == {}
        assert verify(ledger) == []
    finally:
        ledger.close()


def test_a_settle_whose_commit_failed_is_unavailable_on_the_wire_and_resending_works(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.db")
    with running_server(ledger) as srv:
        c = srv.client
        add_facility(c, "H1", ty.FACILITY_LEVEL_1)
        add_member(c, "M")
        real = ledger._commit
        ledger._commit = lambda conn: (_ for _ in ()).throw(
            sqlite3.OperationalError("database or disk is full (injected)"))
        req = inpatient("r1", "M", "H1", 300_000)
        with pytest.raises(grpc.RpcError) as e:
            c.call(c.settlement.Settle, req)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "resend" in e.value.details()
        ledger._commit = real
        r = c.call(c.settlement.Settle, req)
        assert not r.replayed and r.settlement.settlement_id
        assert len(list(ledger.journal())) == 1
