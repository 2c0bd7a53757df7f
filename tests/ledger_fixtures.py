"""Fixtures and helpers of the ledger contract tests: every test runs against both backends.

``backend`` is parametrised over SQLite (a file in the test's tmp dir) and PostgreSQL (a scratch
database ``reimburse_test_<random>`` created through the ``test`` database on 127.0.0.1:5432 for
the session and dropped at its end; every test starts with its tables dropped). Without a
reachable server the PostgreSQL half is skipped, with the reason, unless ``CI`` is set: then it
fails. ``REIMBURSE_TEST_PG`` overrides the admin URL.

Import in a test module with ``from ledger_fixtures import *``.
"""
from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from datetime import date
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from server.ledger.base import FacilityRecord, MemberRecord, MemberState, Outcome
from server.ledger.schema import TABLES
from server.ledger.sqlbase import qmark_to_format

PG_ADMIN_URL = os.environ.get("REIMBURSE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
YEAR = 2024

__all__ = ["pg_database", "backend", "Backend", "member", "facility", "paying", "dump",
           "money", "PG_ADMIN_URL", "YEAR", "hammer_process"]


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def pg_database():
    """The URL of a scratch PostgreSQL database, dropped after the session."""
    import psycopg
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        reason = f"PostgreSQL unreachable at {urlsplit(PG_ADMIN_URL).hostname}: {e}".strip()
        if _ci():
            pytest.fail(f"{reason} — CI is set, so the PostgreSQL backend is required")
        pytest.skip(reason)
    name = f"reimburse_test_{secrets.token_hex(6)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    u = urlsplit(PG_ADMIN_URL)
    try:
        yield urlunsplit((u.scheme, u.netloc, "/" + name, u.query, u.fragment))
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


class Backend:
    """One database of one kind: open ledgers on it, run raw SQL (``?`` placeholders)."""

    def __init__(self, kind: str, url: str):
        self.kind, self.url = kind, url
        self._open: list = []

    def open(self, **kw):
        if self.kind == "sqlite":
            from server.ledger.sqlite import SqliteLedger
            ledger = SqliteLedger(self.url, **kw)
        else:
            from server.ledger.postgres import PostgresLedger
            ledger = PostgresLedger(self.url, **kw)
        self._open.append(ledger)
        return ledger

    def raw(self, sql: str, params: tuple = ()) -> list[tuple]:
        if self.kind == "sqlite":
            c = sqlite3.connect(self.url, isolation_level=None)
            try:
                return c.execute(sql, params).fetchall()
            finally:
                c.close()
        import psycopg
        with psycopg.connect(self.url, autocommit=True) as c:
            cur = c.execute(qmark_to_format(sql), params)
            return cur.fetchall() if cur.description else []

    def reset(self) -> None:
        self.raw(f"DROP TABLE IF EXISTS {', '.join((*TABLES, 'schema_version'))} CASCADE")

    def close_all(self) -> None:
        for ledger in self._open:
            ledger.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request, tmp_path: Path):
    if request.param == "sqlite":
        b = Backend("sqlite", str(tmp_path / "ledger.db"))
    else:
        b = Backend("postgres", request.getfixturevalue("pg_database"))
        b.reset()
    try:
        yield b
    finally:
        b.close_all()


# --- data -------------------------------------------------------------------------------------
def member(member_id: str = "M1", balance: int = 0, **kw) -> MemberRecord:
    kw.setdefault("identity", "EMPLOYEE")
    kw.setdefault("continuous_since", date(2010, 1, 1))
    return MemberRecord(member_id=member_id, account_balance_fen=balance, **kw)


def facility(facility_id: str = "F1", **kw) -> FacilityRecord:
    kw.setdefault("level", "LEVEL_2")
    return FacilityRecord(facility_id=facility_id, **kw)


def paying(want: int, cap: int, layer: str = "T1", account: int = 0, calls: list | None = None,
           delay: float = 0.0):
    """An evaluation paying ``min(want, cap - paid so far)`` of ``layer`` from the state it is
    given (base grows by ``want``), and ``account`` fen from the account when it holds that."""
    def evaluate(state: MemberState) -> Outcome:
        if calls is not None:
            calls.append(state)
        if delay:
            threading.Event().wait(delay)   # widen the window a missing lock would leave open
        pay = max(0, min(want, cap - state.accumulators.paid_of(layer)))
        acct = account if state.balance_fen >= account else 0
        return Outcome(deltas={layer: (pay, want)}, account_paid_fen=acct,
                       chain_deductible_after_fen=want, policy_version="test-1",
                       result=f"pay={pay}".encode(), fund_total_fen=pay)
    return evaluate


def dump(b: Backend) -> dict[str, list[tuple]]:
    """Every row of every ledger table, ordered: the whole database state."""
    keys = {"members": "member_id", "facilities": "facility_id", "settlements": "settlement_id",
            "accumulators": "member_id, year, layer_id", "account_movements": "member_id, seq"}
    return {t: b.raw(f"SELECT * FROM {t} ORDER BY {keys[t]}") for t in TABLES}


def money(b: Backend) -> tuple[list[tuple], list[tuple]]:
    """The derived state a reversal must restore: accumulator rows and account balances."""
    return (b.raw("SELECT member_id, year, layer_id, paid_fen, base_fen FROM accumulators "
                  "ORDER BY member_id, year, layer_id"),
            b.raw("SELECT member_id, account_balance_fen FROM members ORDER BY member_id"))


# --- a process hammering one member (spawned by the concurrency test) --------------------------
def hammer_process(kind: str, url: str, tag: str, n: int, want: int, cap: int, account: int,
                   barrier, results) -> None:
    from concurrent.futures import ThreadPoolExecutor
    b = Backend(kind, url)
    ledger = b.open(**({"max_size": 8} if kind == "postgres" else {}))
    try:
        evaluate = paying(want, cap, account=account, delay=0.001)

        def one(i: int):
            r = ledger.settle(facility_id="F1", request_id=f"{tag}-{i}", request_hash="h",
                              member_id="M1", year=YEAR, evaluate=evaluate)
            return r.record.deltas.get("T1", (0, 0))[0]
        barrier.wait(timeout=60)
        with ThreadPoolExecutor(8) as pool:
            results.put((tag, list(pool.map(one, range(n)))))
    except BaseException as e:  # report to the parent rather than dying silently
        results.put((tag, repr(e)))
    finally:
        ledger.close()
