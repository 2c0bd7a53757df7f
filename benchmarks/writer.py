"""Where the SQLite ledger's one writer spends a durable batch: SQL statements and the rest.

    python -m benchmarks.writer                       # in process: 60 batches, one at a time
    python -m benchmarks.writer --serve -- --insecure --listen 127.0.0.1:50061 --database /tmp/w.db
        # a server (python -m server's arguments after --); drive it, e.g.
        #   python -m benchmarks.load --target 127.0.0.1:50061 --modes batch-settle \\
        #       --concurrency 2 --duration 8 --subprocess-client
        # and stop it (Ctrl-C, SIGTERM): the breakdown is printed then

The committer thread's groups that wrote journal rows are timed, and within them every
statement its connection runs (by its first words), the COMMIT and the fetching of rows;
"Python and waits" is the rest of the group's time. In process, ``BatchService.settle`` runs 1000-claim batches of
synthetic claims (``benchmarks.batchload``, every request id new) on a fresh ledger of
``--members`` members, one at a time, after three unmeasured ones. The timers add a few
microseconds per statement; compare figures of the same mode.
"""
from __future__ import annotations

import argparse
import collections
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

from server.ledger.sqlite import SqliteLedger

JOURNAL = "INSERT INTO settlements"


class Timings:
    """Seconds by statement, summed over the committer's groups that wrote journal rows."""

    def __init__(self) -> None:
        self.groups = 0
        self.total: collections.Counter = collections.Counter()
        self._now: collections.Counter = collections.Counter()   # the group being run

    def add(self, key: str, seconds: float) -> None:
        self._now[key] += seconds

    def group_done(self, seconds: float) -> None:
        if any(k.endswith(JOURNAL) for k in self._now):
            self.groups += 1
            self.total.update(self._now)
            self.total["group"] += seconds
        self._now = collections.Counter()

    def report(self) -> str:
        n = max(1, self.groups)
        sql = sum(v for k, v in self.total.items() if k != "group")
        lines = [f"{self.groups} groups with journal rows; ms per group:",
                 f"  {self.total['group'] / n * 1e3:7.2f}  the group"]
        for k, v in sorted(self.total.items(), key=lambda kv: -kv[1]):
            if k != "group" and v / n >= 1e-5:
                lines.append(f"  {v / n * 1e3:7.2f}  {k}")
        lines.append(f"  {(self.total['group'] - sql) / n * 1e3:7.2f}  Python and waits")
        return "\n".join(lines)


def _words(sql: str) -> str:
    return " ".join(sql.split()[:3])


def instrument(timings: Timings) -> None:
    """Time the committer's groups and its connection's statements (SqliteLedger patched)."""
    def timed(kind: str, call):
        def run(self, sql, *args):
            t = time.perf_counter()
            try:
                return call(self, sql, *args)
            finally:
                timings.add(f"{kind} {_words(sql)}", time.perf_counter() - t)
        return run

    class Cursor(sqlite3.Cursor):
        execute = timed("execute", sqlite3.Cursor.execute)
        executemany = timed("executemany", sqlite3.Cursor.executemany)

        def fetchall(self):   # the rows of a query are stepped through here
            t = time.perf_counter()
            try:
                return super().fetchall()
            finally:
                timings.add("fetchall", time.perf_counter() - t)

    class Connection(sqlite3.Connection):
        execute = timed("execute", sqlite3.Connection.execute)

        def cursor(self, factory=Cursor):
            return super().cursor(factory)

    connect = SqliteLedger._connect

    def _connect(self):
        if threading.current_thread() is not self._committer:
            return connect(self)
        return connect(self, factory=Connection)

    run_group = SqliteLedger._run_group

    def _run_group(self, group):
        t = time.perf_counter()
        try:
            return run_group(self, group)
        finally:
            timings.group_done(time.perf_counter() - t)

    SqliteLedger._connect = _connect
    SqliteLedger._run_group = _run_group


def in_process(members: int, batches: int) -> str:
    from benchmarks import batchload, workload
    from engine.loader import store
    from server import _wire, batch, convert
    from server.service import Core

    class Context:
        def time_remaining(self):
            return None

    timings = Timings()
    instrument(timings)
    with tempfile.TemporaryDirectory() as d:
        ledger = SqliteLedger(Path(d) / "ledger.db")
        try:
            pop = workload.population(members, seed=5, prefix="P")
            for f in pop.facilities:
                ledger.upsert_facility(convert.facility_from_wire(f))
            for m in pop.members:
                ledger.upsert_member(convert.member_from_wire(m))
            service = batch.BatchService(Core(ledger, store()))
            inner = [batchload.batch_columns(pop, 1000, 100, 7 + v).SerializeToString()
                     for v in range(8)]
            calls = [batch.RawBatch(_wire.length_delimited(1, inner[i % 8] + _wire.strings(
                13, [f"w-{i}-{k}" for k in range(1000)]))) for i in range(batches + 3)]
            for call in calls[:3]:
                service.settle(call, Context())
            timings.__init__()
            t = time.perf_counter()
            for call in calls[3:]:
                service.settle(call, Context())
            elapsed = time.perf_counter() - t
        finally:
            ledger.close()
    return (f"{batches * 1000 / elapsed:,.0f} claims/s, {elapsed / batches * 1e3:.2f} ms a "
            f"batch in all\n" + timings.report())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(prog="python -m benchmarks.writer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true",
                    help="run python -m server with the arguments after --, instrumented")
    ap.add_argument("--members", type=int, default=20_000, help="in process (%(default)s)")
    ap.add_argument("--batches", type=int, default=60, help="in process (%(default)s)")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not args.serve:
        print(in_process(args.members, args.batches))
        return 0
    from server.app import serve
    timings = Timings()
    instrument(timings)
    try:
        return serve(server_args)
    finally:
        print(timings.report(), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
