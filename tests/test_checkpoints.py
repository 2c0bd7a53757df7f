"""WAL checkpoints of the SQLite ledger run on a thread of their own, not inside the committer's
COMMIT: a group's callers do not wait while SQLite copies the WAL into the database file."""
from __future__ import annotations

import sqlite3
import struct
import threading
import time

import pytest

from ledger_fixtures import YEAR, facility, member, paying
from server.ledger.sqlite import SqliteLedger
from server.ledger.verify import verify

BIG_PAGES = 1300   # one commit past SQLite's automatic checkpoint (1000 pages by default)


def _wal_frames(ledger: SqliteLedger) -> tuple[int, int]:
    """(frames in the WAL, frames of them copied into the database) from the WAL index
    (https://www.sqlite.org/walformat.html 2.1: mxFrame at byte 16, nBackfill at byte 96)."""
    with open(ledger.path + "-shm", "rb") as f:
        head = f.read(100)
    return struct.unpack_from("=I", head, 16)[0], struct.unpack_from("=I", head, 96)[0]


def _write_pages(ledger: SqliteLedger, pages: int, prefix: str = "BIG") -> None:
    """One unit of work writing more than ``pages`` pages: as many facilities, each with a
    name of most of a page."""
    ledger._run(lambda cur: cur.executemany(
        "INSERT INTO facilities (facility_id, level, designated, district, name, updated_at) "
        "VALUES (?, 'LEVEL_2', 1, 'd', ?, 't')",
        [(f"{prefix}{k}", "x" * 3500) for k in range(pages)]))


def _reopened_holds(path, settlements: int) -> None:
    """What was committed is in the file, whoever copied it there: a new ledger on it finds
    every settlement, and the ledger's invariants hold."""
    reopened = SqliteLedger(path)
    try:
        assert len(list(reopened.journal())) == settlements
        assert verify(reopened) == []
    finally:
        reopened.close()


def _until(cond, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.fixture
def held_checkpointer(monkeypatch):
    """The checkpointer waits until the test sets the returned event, or the ledger closes."""
    gate = threading.Event()
    run = SqliteLedger._checkpoint_loop

    def held(self):
        while not gate.wait(0.01):
            if self._closing.is_set():
                return
        run(self)
    monkeypatch.setattr(SqliteLedger, "_checkpoint_loop", held)
    yield gate
    gate.set()


def test_the_committer_leaves_checkpoints_to_the_checkpointer(tmp_path, held_checkpointer):
    gate = held_checkpointer
    ledger = SqliteLedger(tmp_path / "ledger.db")
    try:
        _write_pages(ledger, BIG_PAGES)
        frames, copied = _wal_frames(ledger)
        # SQLite's automatic checkpoint in the COMMIT would have copied them all by now
        assert frames > BIG_PAGES and copied < frames
        gate.set()
        # then the checkpointer copies them (or the WAL has started over once they were)
        assert _until(lambda: _wal_frames(ledger)[1] == _wal_frames(ledger)[0])
        assert ledger.checkpoints >= 1
    finally:
        gate.set()
        ledger.close()


def test_settlements_and_reads_are_unchanged_while_checkpoints_run(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.db")
    try:
        ledger.upsert_facility(facility("F1"))
        for k in range(20):
            ledger.upsert_member(member(f"M{k}", balance=1000))
        _write_pages(ledger, BIG_PAGES)
        for r in range(5):
            for k in range(20):
                ledger.settle(facility_id="F1", request_id=f"r{r}-{k}", request_hash="h",
                              member_id=f"M{k}", year=YEAR,
                              evaluate=paying(70, 10**6, account=30))
        assert _until(lambda: ledger.checkpoints >= 1)
        assert len(list(ledger.journal())) == 100
        assert ledger.accumulators("M3", YEAR).paid_of("T1") == 5 * 70
        assert ledger.get_member("M3").account_balance_fen == 1000 - 5 * 30
        assert verify(ledger) == []
    finally:
        ledger.close()
    _reopened_holds(tmp_path / "ledger.db", 100)


def test_close_stops_the_checkpointer(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.db")
    ledger.upsert_facility(facility("F1"))
    assert _until(lambda: ledger.checkpoints >= 1)
    checkpointer = ledger._checkpointer
    assert checkpointer is not None and checkpointer.is_alive()
    ledger.close()
    assert not checkpointer.is_alive()


def test_a_failing_checkpoint_loses_nothing(tmp_path, monkeypatch):
    """A checkpoint that fails (here: every one) leaves the commits in the WAL, where every
    reader finds them; the committer's own automatic checkpoint remains the backstop."""
    real_connect = SqliteLedger._connect

    class Refusing(sqlite3.Connection):
        def execute(self, sql, *args):
            if "wal_checkpoint" in sql:
                raise sqlite3.OperationalError("disk I/O error")
            return super().execute(sql, *args)

    def connect(self, factory=sqlite3.Connection):
        on_checkpointer = threading.current_thread().name.startswith("ledger-checkpoint-")
        return real_connect(self, Refusing if on_checkpointer else factory)
    monkeypatch.setattr(SqliteLedger, "_connect", connect)
    ledger = SqliteLedger(tmp_path / "ledger.db")
    try:
        ledger.upsert_facility(facility("F1"))
        ledger.upsert_member(member("M1", balance=100))
        for k in range(10):
            ledger.settle(facility_id="F1", request_id=f"r{k}", request_hash="h",
                          member_id="M1", year=YEAR, evaluate=paying(70, 10**6, account=5))
        assert _until(lambda: ledger.checkpoint_errors >= 1)
        assert ledger.checkpoints == 0
        assert ledger.accumulators("M1", YEAR).paid_of("T1") == 700
        assert ledger.get_member("M1").account_balance_fen == 50
    finally:
        ledger.close()
    monkeypatch.undo()
    _reopened_holds(tmp_path / "ledger.db", 10)


def test_the_committers_backstop_bounds_the_wal(tmp_path, monkeypatch, held_checkpointer):
    """A passive checkpoint never catches up with a committer that is always writing, and the
    WAL starts over only once it is all copied: the committer's own checkpoint past
    CHECKPOINT_BACKSTOP pages copies what is left, so the file stops growing there. The
    checkpointer is held here, so that the committer's checkpoint alone is seen (the
    checkpointer's, running at the same moment, would only make it wait for a commit)."""
    from server.ledger import sqlite as sqlite_ledger
    backstop, unit_pages = 200, 50
    monkeypatch.setattr(sqlite_ledger, "CHECKPOINT_BACKSTOP", backstop)
    ledger = SqliteLedger(tmp_path / "ledger.db")
    try:
        for k in range(120):              # 6,000 pages, one commit after another
            _write_pages(ledger, unit_pages, prefix=f"U{k}-")
        page = ledger._run(lambda cur: cur.execute("PRAGMA page_size").fetchone()[0], "read")
        wal_pages = (tmp_path / "ledger.db-wal").stat().st_size // (page + 24)
        # SQLite's default (1,000) or no backstop at all would leave a longer WAL
        assert wal_pages <= backstop + 2 * unit_pages
        assert ledger._run(lambda cur: cur.execute(
            "SELECT count(*) FROM facilities").fetchone()[0], "read") == 120 * unit_pages
    finally:
        ledger.close()
