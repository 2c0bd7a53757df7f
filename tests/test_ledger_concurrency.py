"""Concurrent settlements of one member never exceed a cap, on SQLite and PostgreSQL.

The evaluation pays ``min(want, cap - paid so far)`` from the state the ledger hands it and
takes a millisecond doing so: if two settlements could read the same accumulators, both would
pay from the same headroom and the total would pass the cap.
"""
from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ledger_fixtures import *  # noqa: F401,F403  (fixtures: backend, pg_database)
from ledger_fixtures import YEAR, facility, hammer_process, member, paying
from server.ledger.verify import verify

# 60 requests want 4,200: the cap binds after 29 of them. The account (30 fen, 3 a settlement)
# runs dry after 10, so that the numbering of account movements, which would also refuse a
# second writer, does not hide a missing member lock from the cap check.
WANT, CAP, ACCOUNT = 70, 2_000, 3


def _setup(ledger, balance: int = 30):
    ledger.upsert_facility(facility("F1"))
    ledger.upsert_member(member("M1", balance=balance))


def _check(ledger, pays: list[int], balance: int) -> None:
    assert sum(pays) == CAP                                   # exactly the cap, never more
    assert ledger.accumulators("M1", YEAR).paid == {"T1": CAP}
    journal = list(ledger.journal("M1"))
    assert len(journal) == len(pays)
    assert sum(r.deltas["T1"][0] for r in journal) == CAP
    assert sum(r.deltas["T1"][1] for r in journal) == WANT * len(pays)
    spent = sum(r.account_paid_fen for r in journal)
    assert spent == balance - balance % ACCOUNT               # the account never overdrawn
    assert ledger.get_member("M1").account_balance_fen == balance - spent >= 0
    # every settlement saw the state its predecessor committed: paid is a running sum
    seen = sorted(r.deltas["T1"][0] for r in journal)
    assert seen.count(WANT) == CAP // WANT and seen[-1] == WANT
    assert verify(ledger) == []


@pytest.mark.timeout(60)
def test_sixty_threads_on_one_member_pay_exactly_the_cap(backend):
    ledger = backend.open(**({"max_size": 20} if backend.kind == "postgres" else {}))
    _setup(ledger)
    evaluate = paying(WANT, CAP, account=ACCOUNT, delay=0.001)
    start = threading.Barrier(60)

    def one(i: int) -> int:
        start.wait()
        r = ledger.settle(facility_id="F1", request_id=f"t{i}", request_hash="h",
                          member_id="M1", year=YEAR, evaluate=evaluate)
        assert r.created
        return r.record.deltas.get("T1", (0, 0))[0]
    with ThreadPoolExecutor(60) as pool:
        pays = list(pool.map(one, range(60)))
    _check(ledger, pays, balance=30)


@pytest.mark.timeout(60)
def test_one_request_id_raced_by_many_threads_settles_once(backend):
    """Same key and body from 30 threads, spread over 30 members so that no member lock
    serialises them: the UNIQUE key decides, every caller gets the winner's record."""
    ledger = backend.open(**({"max_size": 20} if backend.kind == "postgres" else {}))
    _setup(ledger)
    for i in range(30):
        ledger.upsert_member(member(f"R{i}"))
    start = threading.Barrier(30)

    def one(i: int):
        start.wait()
        return ledger.settle(facility_id="F1", request_id="same", request_hash="h",
                             member_id=f"R{i}", year=YEAR, evaluate=paying(10, 100, delay=0.002))
    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(one, range(30)))
    assert sum(r.created for r in results) == 1
    assert all(r.record == results[0].record for r in results)
    assert len(list(ledger.journal())) == 1
    assert verify(ledger) == []


@pytest.mark.timeout(90)
def test_several_processes_on_one_member_pay_exactly_the_cap(backend):
    """Three processes (as three service instances on one database), 20 settlements each."""
    _setup(backend.open())
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=hammer_process,
                         args=(backend.kind, backend.url, f"p{k}", 20, WANT, CAP, ACCOUNT,
                               barrier, results)) for k in range(3)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=80) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
    assert all(isinstance(v, list) for v in got.values()), got
    pays = [x for v in got.values() for x in v]
    assert len(pays) == 60
    _check(backend.open(), pays, balance=30)
