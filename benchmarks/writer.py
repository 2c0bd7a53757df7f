"""Where the SQLite ledger's one writer spends a durable batch: SQL statements and the rest.

    python -m benchmarks.writer                       # in process: 60 batches, one at a time
    python -m benchmarks.writer --settles 200         # in process: 200 groups of 16 Settles
    python -m benchmarks.writer --postgres postgresql://postgres@127.0.0.1:5432/test --batches 20
        # the batches on PostgreSQL (a scratch database, dropped afterwards): claims/s only
    python -m benchmarks.writer --serve -- --insecure --listen 127.0.0.1:50061 --database /tmp/w.db
        # a server (python -m server's arguments after --); drive it, e.g.
        #   python -m benchmarks.load --target 127.0.0.1:50061 --modes batch-settle \\
        #       --concurrency 2 --duration 8 --subprocess-client
        # and stop it (Ctrl-C, SIGTERM): the breakdown is printed then. It is the server
        # process's committer: batches, and Settle calls only with --writer-process off
        # (otherwise they commit in the settlement writer process, server.writer)

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


def _populate(ledger: SqliteLedger, members: int):
    """The synthetic population of ``members`` members (``benchmarks.workload``), registered."""
    from benchmarks import workload

    pop = workload.population(members, seed=5, prefix="P")
    workload.register_in(ledger, pop)
    return pop


def _settle_batches(ledger, members: int, batches: int, before_measure=lambda: None) -> float:
    """Seconds ``BatchService.settle`` took for ``batches`` 1000-claim batches of synthetic
    claims (every request id new) on ``ledger``, populated with ``members`` members, after three
    unmeasured ones; ``before_measure`` runs just before the clock starts."""
    from benchmarks import batchload
    from engine.loader import store
    from server import _wire, batch
    from server.service import Core

    class Context:
        def time_remaining(self):
            return None

    pop = _populate(ledger, members)
    service = batch.BatchService(Core(ledger, store()))
    inner = [batchload.batch_columns(pop, 1000, 100, 7 + v).SerializeToString()
             for v in range(8)]
    calls = [batch.RawBatch(_wire.length_delimited(1, inner[i % 8] + _wire.strings(
        13, [f"w-{i}-{k}" for k in range(1000)]))) for i in range(batches + 3)]
    for call in calls[:3]:
        service.settle(call, Context())
    before_measure()
    t = time.perf_counter()
    for call in calls[3:]:
        service.settle(call, Context())
    return time.perf_counter() - t


def in_process(members: int, batches: int) -> str:
    timings = Timings()
    instrument(timings)
    with tempfile.TemporaryDirectory() as d:
        ledger = SqliteLedger(Path(d) / "ledger.db")
        try:
            elapsed = _settle_batches(ledger, members, batches, timings.__init__)
        finally:
            ledger.close()
    return (f"{batches * 1000 / elapsed:,.0f} claims/s, {elapsed / batches * 1e3:.2f} ms a "
            f"batch in all\n" + timings.report())


def on_postgres(admin_url: str, members: int, batches: int) -> str:
    """The batches of ``in_process`` on a PostgreSQL ledger, in a scratch database made
    through ``admin_url`` and dropped afterwards (claims/s only: no statement timings)."""
    import secrets
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    from server.ledger.postgres import PostgresLedger
    u = urlsplit(admin_url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("--postgres must be on 127.0.0.1 (benchmarks stay on this machine)")
    name = f"reimburse_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            ledger = PostgresLedger(urlunsplit((u.scheme, u.netloc, "/" + name, u.query, "")))
            try:
                elapsed = _settle_batches(ledger, members, batches)
            finally:
                ledger.close()
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return (f"PostgreSQL: {batches * 1000 / elapsed:,.0f} claims/s, "
            f"{elapsed / batches * 1e3:.2f} ms a batch in all")


def settle_groups(members: int, groups: int, size: int = 16) -> str:
    """Groups of ``size`` single settlements (what concurrent ``Settle`` calls hand the
    committer) run by the committer's ``_run_group`` on this thread, with the evaluation the
    service gives them (``server.fastpath.settle_wire``): the writer's own time per settlement,
    without other threads."""
    from benchmarks import workload
    from engine.loader import store
    from server import _single, fastpath
    from server.ledger.base import BatchItem
    from server.ledger.sqlite import _Unit
    from server.service import Core

    with tempfile.TemporaryDirectory() as d:
        ledger = SqliteLedger(Path(d) / "ledger.db")
        try:
            pop = _populate(ledger, members)
            core = Core(ledger, store())
            reqs = []
            for i, claim in enumerate(workload.claims(pop, (groups + 3) * size, seed=6)):
                r = workload.settle_request(pop, claim)
                r.request_id = f"s-{i}"
                reqs.append(_single.parse_settle(r.SerializeToString()))

            def unit(req) -> _Unit:
                return _Unit(None, BatchItem(req[2], req[0], _single.request_digest(req), req[1],
                                             req[4].year),
                             lambda state: fastpath.settle_wire(core, req, state))

            batches = [[unit(r) for r in reqs[k:k + size]] for k in range(0, len(reqs), size)]
            commit = ledger._commit
            spent = [0.0]

            def timed_commit(c):
                t = time.perf_counter()
                commit(c)
                spent[0] += time.perf_counter() - t

            for g in batches[:3]:
                ledger._run_group(g)
            ledger._commit = timed_commit
            t, cpu = time.perf_counter(), time.thread_time()
            for g in batches[3:]:
                ledger._run_group(g)
            elapsed, cpu = time.perf_counter() - t, time.thread_time() - cpu
            refused = sum(u.error is not None for g in batches for u in g)
        finally:
            ledger.close()
    n = groups * size
    return (f"{groups} groups of {size} settlements: {elapsed / n * 1e6:.0f} µs a settlement "
            f"({(elapsed - spent[0]) / n * 1e6:.0f} µs without COMMIT), thread CPU "
            f"{cpu / n * 1e6:.0f} µs; {refused} refused")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(prog="python -m benchmarks.writer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true",
                    help="run python -m server with the arguments after --, instrumented")
    ap.add_argument("--members", type=int, default=20_000, help="in process (%(default)s)")
    ap.add_argument("--batches", type=int, default=60, help="in process (%(default)s)")
    ap.add_argument("--settles", type=int, metavar="GROUPS", default=0,
                    help="in process: GROUPS groups of 16 single settlements instead of batches")
    ap.add_argument("--postgres", metavar="ADMIN_URL",
                    help="in process: the batches on PostgreSQL, in a scratch database made "
                         "through ADMIN_URL (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.settles and not args.serve:
        print(settle_groups(args.members, args.settles))
        return 0
    if args.postgres and not args.serve:
        print(on_postgres(args.postgres, args.members, args.batches))
        return 0
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
