"""The SQLite ledger's read cache: a read after a commit sees it, whoever committed.

The cache is checked once per call (``reads()``) against the WAL index header mapped from the
``-shm`` file, or, where that cannot be mapped, ``PRAGMA data_version``; both are tested.
"""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from ledger_fixtures import YEAR, facility, member, paying
from server.ledger.sqlite import SqliteLedger


@pytest.fixture(params=["wal-index", "data_version"])
def ledger(request, tmp_path):
    lg = SqliteLedger(tmp_path / "l.db")
    if request.param == "data_version":
        lg._shm = None
    else:
        assert lg._shm is not None, "the WAL index header could not be mapped"
    lg.upsert_facility(facility("F1"))
    lg.upsert_member(member("M1", balance=500))
    yield lg
    lg.close()


def _balance(lg) -> int:
    return lg.reads().get_member("M1").account_balance_fen


def _derived_balance(lg) -> int:
    # a value derived from reads (server.fastpath's claim context), kept in the same cache
    return lg.derived(("balance", "M1"), lambda: lg.get_member("M1").account_balance_fen)


def _reads_derived_balance(lg) -> int:
    r = lg.reads()
    return r.derived(("balance", "M1"), lambda: r.get_member("M1").account_balance_fen)


def test_a_settlement_committed_here_is_seen_by_the_next_call(ledger):
    assert _balance(ledger) == 500 and ledger.reads().accumulators("M1", YEAR).paid == {}
    ledger.settle(facility_id="F1", request_id="r1", request_hash="h1", member_id="M1",
                  year=YEAR, evaluate=paying(70, cap=1000, account=30))
    assert _balance(ledger) == 470
    assert ledger.reads().accumulators("M1", YEAR).paid == {"T1": 70}


def test_a_write_of_another_connection_is_seen_by_the_next_call(ledger, tmp_path):
    assert _balance(ledger) == 500
    c = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    c.execute("UPDATE members SET account_balance_fen = 123 WHERE member_id = 'M1'")
    c.close()
    assert _balance(ledger) == 123


def test_a_commit_of_another_process_is_seen_by_the_next_call(ledger, tmp_path):
    assert _balance(ledger) == 500
    subprocess.run([sys.executable, "-c", (
        "import sys; sys.path[:0] = ['tests']\n"
        "from ledger_fixtures import YEAR, paying\n"
        "from server.ledger.sqlite import SqliteLedger\n"
        f"lg = SqliteLedger({str(tmp_path / 'l.db')!r})\n"
        "lg.settle(facility_id='F1', request_id='p1', request_hash='h', member_id='M1',\n"
        "          year=YEAR, evaluate=paying(40, cap=1000, account=25))\n"
        "lg.close()\n")], check=True, cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    assert _balance(ledger) == 475
    assert ledger.reads().accumulators("M1", YEAR).paid == {"T1": 40}


def test_a_derived_value_is_dropped_with_the_reads_it_came_from(ledger):
    assert _derived_balance(ledger) == _reads_derived_balance(ledger) == 500
    assert ("balance", "M1") in ledger._cache        # kept: the next call derives nothing
    ledger.settle(facility_id="F1", request_id="r1", request_hash="h1", member_id="M1",
                  year=YEAR, evaluate=paying(70, cap=1000, account=30))
    assert _derived_balance(ledger) == 470
    ledger.settle(facility_id="F1", request_id="r2", request_hash="h2", member_id="M1",
                  year=YEAR, evaluate=paying(70, cap=1000, account=30))
    assert _reads_derived_balance(ledger) == 440


@pytest.mark.parametrize("read", [_balance, _derived_balance, _reads_derived_balance])
def test_reads_racing_commits_never_keep_a_stale_balance(ledger, read):
    """Threads read while settlements commit; after the last commit every read is current."""
    stop = threading.Event()
    seen: list[int] = []
    last: list[int] = []

    def reader():
        while not stop.is_set():
            seen.append(read(ledger))
            time.sleep(0)   # a call's network wait: spinning readers would starve the committer
        last.append(read(ledger))   # after the last commit, whatever this thread cached
    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for k in range(40):
        ledger.settle(facility_id="F1", request_id=f"r{k}", request_hash=f"h{k}",
                      member_id="M1", year=YEAR, evaluate=paying(10, cap=10_000, account=5))
        assert _balance(ledger) == 500 - 5 * (k + 1)
    stop.set()
    for t in threads:
        t.join()
    # (a reader need not have read between the last commit and the stop: its last read did)
    assert seen and min(seen) >= 500 - 5 * 40
    assert last == [500 - 5 * 40] * len(threads)
