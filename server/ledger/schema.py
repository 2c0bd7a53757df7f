"""The ledger's tables, one definition for both databases, as an ordered list of migrations.

Each migration is a list of statements written once with type placeholders, rendered for SQLite
or PostgreSQL by ``statements(dialect, migration)``. A ledger applies, in order, every migration
newer than the version stored in ``schema_version`` (one row, ``id = 1``), each in its own
transaction together with the version bump; a database newer than this code is refused.
Migrations are append-only: never edit a released one, add the next.

Tables
  members            registry + the personal account: ``account_balance_fen`` (current balance)
                     and ``account_seq`` (number of the member's last account movement).
  facilities         registry.
  settlements        the journal: one row per settlement, never deleted; a reversal only sets
                     ``status = 'REVERSED'`` and ``reversed_at``. ``deltas`` is the JSON object
                     ``{layer id: [paid delta, base delta]}`` the settlement added.
                     ``UNIQUE (facility_id, request_id)`` is the idempotency key.
  accumulators       per member, year and layer: the sums of the deltas of SETTLED settlements.
                     A row whose paid and base both return to 0 on a reversal is deleted, so a
                     reversal restores the table exactly.
  account_movements  every change of a member's balance, numbered per member (1, 2, …) under the
                     member's row lock: ``SET`` (``upsert_member`` gave a new absolute balance:
                     ``amount_fen`` is that balance), ``SETTLE`` (``amount_fen = -account_paid``),
                     ``REVERSE`` (``+account_paid``), each with the ``balance_after_fen``. A
                     member's first movement is the ``SET`` of its registration. Replaying the
                     movements gives the balance, and each SETTLE/REVERSE must match the journal:
                     that is how ``verify`` checks balances whose opening amount comes from outside
                     (see ``server.ledger.verify``). Zero-amount settlements move nothing.

Scale-out (Citus, CockroachDB): every member-owned table leads with ``member_id`` and every
settle/reverse transaction touches only one member's rows (plus reads of the registries and the
idempotency key), under a ``SELECT … FOR UPDATE`` of the member row — no advisory or table locks.
On Citus, distribute ``members``, ``accumulators``, ``settlements`` and ``account_movements`` by
``member_id`` (colocated) and make ``facilities`` a reference table. Citus requires unique
constraints of distributed tables to contain the distribution column, so there the settlements
keys become ``PRIMARY KEY (member_id, settlement_id)`` and ``UNIQUE (member_id, facility_id,
request_id)``: the ledger's idempotency lookup by (facility, request id) still runs before the
insert, but two concurrent first uses of one request id for two *different* members (necessarily
different bodies) are then not caught by the database. CockroachDB runs this DDL as is.
"""
from __future__ import annotations

TYPES = {
    "sqlite": {"int": "INTEGER", "bool": "INTEGER", "date": "TEXT", "ts": "TEXT",
               "json": "TEXT", "bytes": "BLOB"},
    "postgres": {"int": "BIGINT", "bool": "BOOLEAN", "date": "DATE", "ts": "TIMESTAMPTZ",
                 "json": "JSONB", "bytes": "BYTEA"},
}

# Created before any migration runs; the single row holds the applied version.
SCHEMA_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
)"""

MIGRATIONS: list[tuple[str, list[str]]] = [
    ("members, facilities, settlement journal, accumulators, account movements", [
        """CREATE TABLE IF NOT EXISTS members (
            member_id TEXT PRIMARY KEY,
            identity TEXT NOT NULL,
            continuous_since {date} NOT NULL,
            retired {bool} NOT NULL,
            groups_json {json} NOT NULL,
            maternity_eligible {bool} NOT NULL,
            primary_facility TEXT,
            other_facility TEXT,
            benefit_start {date},
            benefit_end {date},
            district TEXT NOT NULL,
            region TEXT NOT NULL,
            account_balance_fen {int} NOT NULL,
            account_seq {int} NOT NULL,
            updated_at {ts} NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS facilities (
            facility_id TEXT PRIMARY KEY,
            level TEXT NOT NULL,
            designated {bool} NOT NULL,
            district TEXT NOT NULL,
            name TEXT NOT NULL,
            updated_at {ts} NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS settlements (
            settlement_id TEXT PRIMARY KEY,
            facility_id TEXT NOT NULL REFERENCES facilities (facility_id),
            request_id TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            member_id TEXT NOT NULL REFERENCES members (member_id),
            year INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('SETTLED', 'REVERSED')),
            deltas {json} NOT NULL,
            account_paid_fen {int} NOT NULL,
            chain_deductible_after_fen {int} NOT NULL,
            policy_version TEXT NOT NULL,
            fund_total_fen {int} NOT NULL,
            result {bytes} NOT NULL,
            created_at {ts} NOT NULL,
            reversed_at {ts},
            UNIQUE (facility_id, request_id)
        )""",
        "CREATE INDEX IF NOT EXISTS settlements_member ON settlements (member_id, year)",
        """CREATE TABLE IF NOT EXISTS accumulators (
            member_id TEXT NOT NULL REFERENCES members (member_id),
            year INTEGER NOT NULL,
            layer_id TEXT NOT NULL,
            paid_fen {int} NOT NULL,
            base_fen {int} NOT NULL,
            PRIMARY KEY (member_id, year, layer_id)
        )""",
        """CREATE TABLE IF NOT EXISTS account_movements (
            member_id TEXT NOT NULL REFERENCES members (member_id),
            seq {int} NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('SET', 'SETTLE', 'REVERSE')),
            amount_fen {int} NOT NULL,
            settlement_id TEXT,
            balance_after_fen {int} NOT NULL,
            created_at {ts} NOT NULL,
            PRIMARY KEY (member_id, seq)
        )""",
    ]),
]

VERSION = len(MIGRATIONS)

# Every table the ledger owns, children first (for truncation in tests and for audits).
TABLES = ("account_movements", "accumulators", "settlements", "members", "facilities")


def statements(dialect: str, index: int) -> list[str]:
    """The statements of migration ``index`` (0-based) rendered for ``dialect``."""
    types = TYPES[dialect]
    return [s.format(**types) for s in MIGRATIONS[index][1]]
