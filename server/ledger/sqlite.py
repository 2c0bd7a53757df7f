"""The embedded ledger: one SQLite file in WAL mode (the service's default database).

Durability: ``journal_mode=WAL`` with ``synchronous=FULL`` (every commit is fsynced before it
returns), foreign keys on. The schema is created and migrated on open (``server.ledger.schema``).

Writes: group commit. Every write unit of work (a settlement, a reversal, an upsert) is handed
to one committer thread per ledger, which runs whatever units are waiting — up to
``group_max`` of them, having waited up to ``group_wait_us`` for more to arrive — in ONE
transaction (``BEGIN IMMEDIATE``: the database write lock, which also orders the writers of
other processes, waiting up to ``busy_timeout``) and commits them with one fsync. Settlements
that follow each other in the group run together (``SqlLedger.settle_run``: each as ``settle``
would run it after the ones before, but with a few statements for all of them); any other unit
runs in its own ``SAVEPOINT``, and so does such a run of settlements when the group holds
other units too. A settlement or unit that refuses (an unknown member, a reused request id, a
failing evaluation) writes nothing, or is rolled back to its savepoint, and its caller alone
gets the error. A failure of the transaction itself (``BEGIN``, a statement, ``COMMIT``: a full
disk, an I/O error, a lock not obtained) rolls the whole group back and every caller of the
group gets ``LedgerUnavailable``:
none of the group is half-applied, and resending is safe (settlements are keyed by request id).
Units of one group run one after another on one connection, each seeing the writes of those
before it, so the state a ``settle`` reads is still the state it commits over. ``settle_many``
queues several settlements at once, for one group: the settlement writer process
(``server.writer``), where the server's ``Settle`` calls commit, hands on its callers' claims so.

Checkpoints: a thread of their own copies the committed WAL into the database file
(``_checkpoint_loop``: a PASSIVE checkpoint after commits, at most every
``CHECKPOINT_PAUSE_S``), so that no group waits inside its COMMIT for SQLite's automatic
checkpoint; the committer's connection checkpoints itself only past ``CHECKPOINT_BACKSTOP``
pages of WAL, which copies what the thread has not yet and lets the WAL start over. A
checkpoint copies what is already durable in the WAL: one that fails loses nothing, and the
next one (or the backstop) copies it.

Reads run in parallel on pooled connections (WAL snapshots). Registry records and accumulators
read outside a transaction are cached, and the cache is dropped whenever anything committed, in
this process or another. What tells: the header of the WAL index, the ``-shm`` file that every
connection to the database maps (https://www.sqlite.org/walformat.html: its change counter
``iChange`` and ``mxFrame`` move with every commit), read through a mapping of our own: a memory
read per call instead of a query. A connection kept open for the ledger's life keeps that file
in place. Where it cannot be mapped, ``PRAGMA data_version`` of a connection per thread that
never writes says it instead.
"""
from __future__ import annotations

import collections
import json
import mmap
import os
import sqlite3
import threading
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from typing import Any, Callable, Iterator

from engine.model import Accumulators
from server.ledger._journal import deltas_text
from server.ledger.base import (
    BatchItem, BulkReads, FacilityRecord, LedgerUnavailable, MemberRecord, MemberState, Outcome,
    SettleResult,
)
from server.ledger.sqlbase import SqlLedger

CACHE_MAX = 200_000   # entries; the cache is simply dropped when it grows past this
CHECKPOINT_PAUSE_S = 0.05    # the checkpointer's rest after each checkpoint
CHECKPOINT_BACKSTOP = 4096   # WAL pages past which the committer checkpoints itself
WAL_INDEX_HEADER = 48  # bytes: the first copy of the wal-index header (walformat.html 2.1)


class _Unit:
    """One write unit of work waiting for the committer: ``fn(cursor)``, or a settlement
    (``item``, ``evaluate``) that the committer settles with its group's others."""

    __slots__ = ("fn", "item", "evaluate", "done", "result", "error", "ok")

    def __init__(self, fn: Callable[[Any], Any] | None, item: BatchItem | None = None,
                 evaluate: Callable[[MemberState], Outcome] | None = None):
        self.fn, self.item, self.evaluate = fn, item, evaluate
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.ok = False


class SqliteLedger(SqlLedger):
    dialect = "sqlite"
    FOR_UPDATE = ""   # BEGIN IMMEDIATE already holds the database's write lock
    READ_REPLAY_FIRST = False   # every write waits for the committer: replays are found there
    local_reads = True   # from this process's cache or the local file (base.Ledger)
    KEY_CLASH = (sqlite3.IntegrityError,)   # settle_batch inserts, then looks if refused

    def __init__(self, path: str | os.PathLike, *, busy_timeout_ms: int = 30_000,
                 group_max: int = 256, group_wait_us: int = 0, cache: bool = True) -> None:
        self.path = os.fspath(path)
        if not self.path or self.path == ":memory:" or self.path.startswith("file::memory:"):
            raise ValueError("SqliteLedger needs a file path (use MemoryLedger for tests "
                             "without a database)")
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._busy_ms = int(busy_timeout_ms)
        self.group_max = max(1, int(group_max))
        self.group_wait_s = max(0, int(group_wait_us)) / 1e6
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        # group commit
        self._queue: collections.deque[_Unit] = collections.deque()
        self._cv = threading.Condition(threading.Lock())
        self._stopping = False
        self._wconn: sqlite3.Connection | None = None
        self.groups_committed = 0      # statistics: transactions and units committed
        self.units_committed = 0
        self._committer = threading.Thread(target=self._commit_loop, daemon=True,
                                           name=f"ledger-commit-{os.path.basename(self.path)}")
        self._committer.start()
        # WAL checkpoints, off the committer's path (``_checkpoint_loop``)
        self._committed = threading.Event()
        self._closing = threading.Event()   # ends the checkpointer's rest at once
        self._checkpointer: threading.Thread | None = None
        self.checkpoints = 0           # statistics: checkpoints run, and failed
        self.checkpoint_errors = 0
        # read cache, validated by data_version of connections that never write (one per
        # thread: a shared one behind a lock made a convoy of the threads serving calls)
        self._cache_on = cache
        self._local = threading.local()
        self._watches: list[sqlite3.Connection] = []
        self._watch_lock = threading.Lock()
        self._cache_gen = 0              # the cache's epoch: bumped whenever it is dropped
        self._cache: dict[tuple, Any] = {}
        self._anchor: sqlite3.Connection | None = None
        self._shm: mmap.mmap | None = None
        self._shm_seen = b""
        try:
            self._migrate()
            self._map_wal_index()
            # started once the database is in WAL mode (the migration's commit did that)
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, daemon=True,
                name=f"ledger-checkpoint-{os.path.basename(self.path)}")
            self._checkpointer.start()
        except BaseException:
            self.close()
            raise

    # --- connections ------------------------------------------------------------------------
    def _connect(self, factory: type = sqlite3.Connection) -> sqlite3.Connection:
        # factory: benchmarks.writer times the committer's statements through its own class
        c = sqlite3.connect(self.path, timeout=self._busy_ms / 1000, isolation_level=None,
                            check_same_thread=False, factory=factory)
        try:
            mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"cannot put {self.path} in WAL mode ({mode})")
            c.execute("PRAGMA synchronous=FULL")
            c.execute("PRAGMA foreign_keys=ON")
            c.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        except BaseException:
            c.close()
            raise
        return c

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._pool_lock:
            if self._closed:
                raise RuntimeError("the ledger is closed")
            c = self._idle.pop() if self._idle else None
        if c is None:
            c = self._connect()
        try:
            yield c
        finally:
            if c.in_transaction:   # never hand on a connection inside a transaction
                c.rollback()
            with self._pool_lock:
                if self._closed:
                    c.close()
                else:
                    self._idle.append(c)

    def _run(self, fn: Callable[[Any], Any], mode: str = "write") -> Any:
        if mode == "read":
            with self._connection() as c:
                return fn(c.cursor())
        if mode == "write":
            return self._submit(fn)
        with self._connection() as c:   # snapshot: a deferred read transaction
            return self._transaction(c, "BEGIN", fn)

    @staticmethod
    def _transaction(c: sqlite3.Connection, begin: str, fn: Callable[[Any], Any]) -> Any:
        c.execute(begin)
        try:
            out = fn(c.cursor())
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        return out

    # --- group commit -----------------------------------------------------------------------
    def settle(self, *, facility_id: str, request_id: str, request_hash: str, member_id: str,
               year: int, evaluate: Callable[[MemberState], Outcome],
               referral_from: str = "") -> SettleResult:
        # A unit that the committer settles together with the other settlements of its group
        # (SqlLedger.settle_run): a few statements for all of them instead of a dozen each.
        return self._submit(None, BatchItem(facility_id, request_id, request_hash, member_id,
                                            year, referral_from), evaluate)

    def settle_many(self, items: list[BatchItem],
                    evaluates: list[Callable[[MemberState], Outcome]]) -> list:
        """``settle`` of each item (``evaluates[i]`` its callback), queued together so that
        they commit in one group, in this order, each seeing the writes of those before it:
        per item its ``SettleResult`` or the exception ``settle`` would raise. The settlement
        writer process (``server.writer``) hands on its callers' claims this way."""
        units = [_Unit(None, it, ev) for it, ev in zip(items, evaluates, strict=True)]
        with self._cv:
            if self._stopping:
                raise RuntimeError("the ledger is closed")
            self._queue.extend(units)
            self._cv.notify()
        for unit in units:
            unit.done.wait()
        return [unit.result if unit.error is None else unit.error for unit in units]

    def _submit(self, fn: Callable[[Any], Any] | None, item: BatchItem | None = None,
                evaluate: Callable[[MemberState], Outcome] | None = None) -> Any:
        """Run ``fn(cursor)`` in the committer's next group; return its result once committed."""
        unit = _Unit(fn, item, evaluate)
        with self._cv:
            if self._stopping:
                raise RuntimeError("the ledger is closed")
            self._queue.append(unit)
            self._cv.notify()
        unit.done.wait()
        if unit.error is not None:
            raise unit.error
        return unit.result

    def _commit_loop(self) -> None:
        queue, cv = self._queue, self._cv
        while True:
            with cv:
                while not queue and not self._stopping:
                    cv.wait()
                if not queue:
                    return
                if self.group_wait_s and len(queue) < self.group_max:
                    cv.wait_for(lambda: len(queue) >= self.group_max or self._stopping,
                                self.group_wait_s)
                group = [queue.popleft() for _ in range(min(len(queue), self.group_max))]
            try:
                self._run_group(group)
            finally:
                for unit in group:
                    unit.done.set()

    def _run_group(self, group: list[_Unit]) -> None:
        """One transaction for the group; see the module docstring for who gets which error."""
        try:
            if self._wconn is None:
                self._wconn = self._connect()
                self._wconn.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_BACKSTOP}")
            c = self._wconn
            cur = c.cursor()
            c.execute("BEGIN IMMEDIATE")
            for run, fn in self._runs(group):
                single = len(run) == len(group)
                if not single:
                    c.execute("SAVEPOINT unit")
                try:
                    got = fn(cur)
                except sqlite3.Error:
                    raise                          # the database failed: the whole group does
                except Exception as e:             # this unit refused: undo it alone
                    for unit in run:
                        unit.error = e
                    if single:
                        c.execute("ROLLBACK")
                        return
                    c.execute("ROLLBACK TO unit")
                    c.execute("RELEASE unit")
                    continue
                if not single:
                    c.execute("RELEASE unit")
                for unit, r in zip(run, got):
                    if isinstance(r, Exception) and unit.item is not None:
                        unit.error = r             # settle_run: this settlement refused
                    else:
                        unit.result, unit.ok = r, True
            self._commit(c)
            self._committed.set()
            self.groups_committed += 1
            self.units_committed += sum(u.ok for u in group)
        except BaseException as e:
            c = self._wconn
            try:
                if c is not None and c.in_transaction:
                    c.execute("ROLLBACK")
            except sqlite3.Error:              # a broken connection: start afresh next time
                try:
                    c.close()
                finally:
                    self._wconn = None
            failed = LedgerUnavailable(
                f"the ledger could not commit ({type(e).__name__}: {e}); nothing of this "
                "call was committed, resend it")
            failed.__cause__ = e
            for unit in group:
                if unit.error is None or unit.ok:
                    unit.ok = False
                    unit.result = None
                    unit.error = failed
            if not isinstance(e, Exception):
                raise

    def _runs(self, group: list[_Unit]) -> Iterator[tuple[list[_Unit], Callable[[Any], list]]]:
        """The group's units in order as its committer runs them: consecutive settlements
        together (``settle_run``), any other unit alone; each run with the function of a
        cursor that returns its units' results (a settlement's: its result or exception)."""
        i, n = 0, len(group)
        while i < n:
            if group[i].item is None:
                yield group[i:i + 1], lambda cur, fn=group[i].fn: [fn(cur)]
                i += 1
                continue
            j = i
            while j < n and group[j].item is not None:
                j += 1
            run = group[i:j]
            yield run, lambda cur, run=run: self.settle_run(
                cur, [u.item for u in run], [u.evaluate for u in run])
            i = j

    def _checkpoint_loop(self) -> None:
        """Copy committed WAL frames into the database file, after commits, at most every
        ``CHECKPOINT_PAUSE_S``. SQLite's own checkpoint would run inside a COMMIT every 1000
        pages, and every unit of the group would wait through its writes and fsync of the
        database file; a PASSIVE checkpoint on another connection waits for no writer or
        reader and blocks none. The committer's connection keeps SQLite's automatic
        checkpoint at ``CHECKPOINT_BACKSTOP`` pages: under a steady load the committer writes
        on while a passive checkpoint runs, so this one never finds the WAL all copied, and
        SQLite starts the WAL over only then. The committer's own checkpoint copies the few
        frames left (and everything, should this thread fail)."""
        c = None
        while True:
            self._committed.wait()
            if self._closing.is_set():
                break
            self._committed.clear()
            try:
                if c is None:
                    c = self._connect()
                c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self.checkpoints += 1
            except sqlite3.Error:       # the frames stay in the WAL; a new connection next time
                self.checkpoint_errors += 1
                if c is not None:
                    c.close()
                    c = None
            if self._closing.wait(CHECKPOINT_PAUSE_S):
                break
        if c is not None:
            c.close()

    def _commit(self, c: sqlite3.Connection) -> None:
        """COMMIT the group (one fsync). A separate method so that tests can make it fail."""
        c.execute("COMMIT")

    # --- cached reads -----------------------------------------------------------------------
    def _map_wal_index(self) -> None:
        """Map the WAL index header read-only (the module docstring), or leave ``_shm`` None."""
        self._anchor = self._connect()
        self._anchor.execute("SELECT version FROM schema_version").fetchone()  # opens the index
        try:
            fd = os.open(self.path + "-shm", os.O_RDONLY)
        except OSError:
            return
        try:
            if os.fstat(fd).st_size >= WAL_INDEX_HEADER:
                self._shm = mmap.mmap(fd, WAL_INDEX_HEADER, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            self._shm = None
        finally:
            os.close(fd)

    def _cache_valid(self) -> int:
        """The cache's epoch, after dropping the cache if anything was committed (by any
        connection, in any process) since this thread last looked.

        Each thread asks its own watching connection: its ``data_version`` changes when
        another connection commits. A thread that sees a change drops the cache and bumps the
        epoch; an entry read after a check is stored only while the epoch is still the one
        that check returned. So an entry read before a commit is either never stored or
        dropped by the first check after that commit, whichever thread makes it."""
        if self._closed:
            raise RuntimeError("the ledger is closed")
        shm = self._shm
        if shm is not None:
            # A header read while a writer changes it may be torn: then it differs from the
            # one seen, and the cache is dropped once more than needed, never kept too long.
            header = shm[:WAL_INDEX_HEADER]
            if header != self._shm_seen or len(self._cache) > CACHE_MAX:
                with self._watch_lock:
                    self._shm_seen = header
                    self._cache = {}
                    self._cache_gen += 1
            return self._cache_gen
        loc = self._local
        c = getattr(loc, "watch", None)
        if c is None:
            with self._watch_lock:
                if self._closed:
                    raise RuntimeError("the ledger is closed")
                c = loc.watch = self._connect()
                loc.seen = None
                self._watches.append(c)
        version = c.execute("PRAGMA data_version").fetchone()[0]
        if version != loc.seen or len(self._cache) > CACHE_MAX:
            loc.seen = version
            with self._watch_lock:
                self._cache = {}
                self._cache_gen += 1
        return self._cache_gen

    def _cached(self, key: tuple, load: Callable[[], Any]) -> Any:
        if not self._cache_on:
            return load()
        gen = self._cache_valid()
        cache = self._cache
        got = cache.get(key)
        if got is None:
            got = load()                  # read after the version: never older than it
            if self._cache_gen == gen:
                cache[key] = got
        return got

    def reads(self) -> "_Reads":
        return _Reads(self) if self._cache_on else self

    def derived(self, key: tuple, build: Callable[[], Any]) -> Any:
        # BulkReads.derived over the cache, checked once here (a call's single lookup needs
        # no _Reads)
        return self._cached(key, build)

    def get_member(self, member_id: str) -> MemberRecord:
        return self._cached(("m", member_id), lambda: SqlLedger.get_member(self, member_id))

    def get_facility(self, facility_id: str) -> FacilityRecord:
        return self._cached(("f", facility_id),
                            lambda: SqlLedger.get_facility(self, facility_id))

    def accumulators(self, member_id: str, year: int) -> Accumulators:
        return self._cached(("a", member_id, year),
                            lambda: SqlLedger.accumulators(self, member_id, year))

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._committer.is_alive() and threading.current_thread() is not self._committer:
            self._committer.join()
        self._closing.set()
        self._committed.set()
        if self._checkpointer is not None and self._checkpointer.is_alive():
            self._checkpointer.join()
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()
        with self._watch_lock:
            self._shm = None   # a reader still holding the mapping may finish with it
            for c in (self._wconn, *self._watches, self._anchor):
                if c is not None:
                    c.close()
            self._wconn = self._anchor = None
            self._watches = []

    # --- types --------------------------------------------------------------------------------
    def enc_date(self, d: date | None) -> Any:
        return None if d is None else d.isoformat()

    def dec_date(self, v: Any) -> date | None:
        return None if v is None else date.fromisoformat(v)

    def enc_bool(self, b: bool) -> Any:
        return 1 if b else 0

    def dec_json(self, v: Any) -> Any:
        return json.loads(v)

    # enc_json's text (keys already sorted, ints), without an encoder call per settlement
    enc_deltas = staticmethod(deltas_text)

    def enc_ts(self, t: datetime | None) -> Any:
        return None if t is None else t.isoformat(timespec="microseconds")

    def enc_times(self, start: datetime, n: int) -> list:
        # enc_ts's text, the microseconds written into it rather than isoformat per row
        # (1 µs each, twice a settled claim); past the second's end, enc_ts itself
        text = self.enc_ts(start)
        head, tail, us = text[:20], text[26:], start.microsecond
        return [f"{head}{us + k:06d}{tail}" if us + k < 1_000_000
                else self.enc_ts(start + timedelta(microseconds=k)) for k in range(1, n + 1)]

    def dec_ts(self, v: Any) -> datetime | None:
        return None if v is None else datetime.fromisoformat(v)


class _Reads(BulkReads):
    """One call's registry and accumulator reads: the cache checked once, at the start."""

    __slots__ = ("ledger", "gen", "cache")

    def __init__(self, ledger: SqliteLedger):
        self.ledger = ledger
        self.gen = ledger._cache_valid()
        self.cache = ledger._cache

    def _get(self, key: tuple, load: Callable[[], Any]) -> Any:
        got = self.cache.get(key)
        if got is None:
            got = load()
            if self.ledger._cache_gen == self.gen:
                self.cache[key] = got
        return got

    def get_member(self, member_id: str) -> MemberRecord:
        return self._get(("m", member_id), lambda: SqlLedger.get_member(self.ledger, member_id))

    def get_facility(self, facility_id: str) -> FacilityRecord:
        return self._get(("f", facility_id),
                         lambda: SqlLedger.get_facility(self.ledger, facility_id))

    def accumulators(self, member_id: str, year: int) -> Accumulators:
        return self._get(("a", member_id, year),
                         lambda: SqlLedger.accumulators(self.ledger, member_id, year))

    def derived(self, key: tuple, build: Callable[[], Any]) -> Any:
        return self._get(key, build)   # stored under a read's rule: while the epoch is ours

    def members_of(self, member_ids) -> list[MemberRecord | None]:
        cache = self.cache
        out = [cache.get(("m", mid)) for mid in member_ids]
        # records are always true: a None is a miss, read (and cached) one by one
        return out if all(out) else BulkReads.members_of(self, member_ids)

    def accumulators_of(self, keys) -> list[Accumulators]:
        cache = self.cache
        out = [cache.get(("a", *key)) for key in keys]
        return out if all(out) else BulkReads.accumulators_of(self, keys)
