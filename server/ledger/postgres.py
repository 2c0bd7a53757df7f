"""The shared ledger: PostgreSQL through psycopg 3 and a connection pool.

Several service processes may run on one database. A settlement or reversal is one transaction
(READ COMMITTED) that locks the member's row with ``SELECT … FOR UPDATE`` before reading the
member-year state, so concurrent settlements of one member queue on that row, those of different
members never wait for each other. No advisory locks, no table locks, no transaction touching two
members: the same SQL runs on Citus (distribution column ``member_id``) and CockroachDB (see
``server.ledger.schema``). Idempotency rests on ``UNIQUE (facility_id, request_id)``: the loser of
a race for one key gets a unique violation, and the retry finds and compares the winner's row.

Serialization failures, deadlocks, unique-violation races and broken connections are retried a
bounded number of times (every unit of work is safe to repeat: settle is keyed, reverse and the
upserts are idempotent, ``evaluate`` is pure). The schema is created if missing.
"""
from __future__ import annotations

import random
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import psycopg
from psycopg import errors
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from server.ledger.sqlbase import SETTLEMENT_COLS, SqlLedger, qmark_to_format

TRANSIENT = (errors.SerializationFailure, errors.DeadlockDetected, errors.UniqueViolation)


class PostgresLedger(SqlLedger):
    dialect = "postgres"
    FOR_UPDATE = " FOR UPDATE"

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 16,
                 timeout: float = 30.0, attempts: int = 10, connect_timeout: float = 10.0):
        self.url = url
        self.attempts = attempts
        self._pool = ConnectionPool(
            url, min_size=min_size, max_size=max_size, timeout=timeout, open=False,
            kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout))},
            check=ConnectionPool.check_connection, name="reimburse-ledger")
        self._pool.open()
        try:
            self._pool.wait(timeout=connect_timeout)
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    def _sql(self, sql: str) -> str:
        return qmark_to_format(sql)

    def _in(self, column: str, ids: list) -> Iterator[tuple[str, tuple]]:
        # One array parameter: one statement text whatever the number of ids, which psycopg
        # prepares once, where each length of IN list was a text to parse and plan again
        # (docs/performance.md, 2026-12-07 third pass, "PostgreSQL batches").
        if ids:
            yield f"{column} = ANY(?)", (list(ids),)

    def _write_journal(self, cur, inserts: list, added: dict, moves: list) -> None:
        # a batch's journal rows by COPY: one stream, where executemany sent a statement each
        if inserts:
            with cur.copy(f"COPY settlements ({SETTLEMENT_COLS}) FROM STDIN") as copy:
                for row in inserts:
                    copy.write_row(row)
        super()._write_journal(cur, [], added, moves)

    def _settlements_by_keys(self, cur, keys) -> dict:
        # all the keys in one statement, joined to the journal's unique key: a statement per
        # facility was a round trip each
        keys = list(keys)
        if not keys:
            return {}
        cols = ", ".join(f"s.{c}" for c in SETTLEMENT_COLS.split(", "))
        rows = self._x(cur, f"SELECT {cols} FROM unnest(?::text[], ?::text[]) AS k (f, r) "
                            "JOIN settlements s ON s.facility_id = k.f AND s.request_id = k.r",
                       ([f for f, _ in keys], [r for _, r in keys])).fetchall()
        return {(r[1], r[2]): self._settlement(r) for r in rows}

    def _run(self, fn: Callable[[Any], Any], mode: str = "write") -> Any:
        for attempt in range(1, self.attempts + 1):
            conn = None
            try:
                with self._pool.connection() as conn:
                    if mode == "read":
                        return fn(conn.cursor())
                    with conn.transaction():
                        cur = conn.cursor()
                        if mode == "snapshot":
                            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, "
                                        "READ ONLY")
                        return fn(cur)
            except TRANSIENT:
                if attempt == self.attempts:
                    raise
            except psycopg.OperationalError:
                # A connection that broke mid-call (server restart, network): the pool drops
                # it; try again on a fresh one. Anything else is not ours to retry.
                if conn is None or not conn.broken or attempt == self.attempts:
                    raise
            time.sleep(random.uniform(0, min(0.2, 0.002 * 2 ** attempt)))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._pool.close()

    # --- types (dates, booleans and timestamps are native) ---------------------------------
    def enc_json(self, obj: Any) -> Any:
        return Jsonb(obj)

    def dec_ts(self, v: datetime | None) -> datetime | None:
        return None if v is None else v.astimezone(timezone.utc)
