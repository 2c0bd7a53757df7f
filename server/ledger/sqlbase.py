"""What the SQLite and PostgreSQL ledgers share: every statement and the contract's logic.

A backend supplies only how to run a unit of work (``_run``: a write transaction, a plain read or
a read-only snapshot, with its own locking and retries), the member row lock clause and the
conversion of dates, booleans, JSON and timestamps. Both therefore settle, reverse and verify by
the very same statements, and the contract tests hold them to the same behaviour.

Settle, in one write transaction (see ``base.Ledger.settle``):
  1. lock the member row (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite holds the database write
     lock from ``BEGIN IMMEDIATE``);
  2. look the (facility, request id) up: a replay returns the stored record (``Conflict`` when
     the body hash differs) — also done once before the transaction, without any lock, so that
     replays never queue; read the member-year's accumulators and the balance;
  3. call ``evaluate``; check its outcome (non-negative integer deltas, account paid within the
     balance);
  4. insert the journal row, add the deltas, debit the account with an account movement; commit.
A concurrent first use of the same request id (for another member: the same member's waits on
the lock) loses on the UNIQUE constraint; the backend retries the unit of work, whose step 2 then
finds the winner's row. A retried unit calls ``evaluate`` again, on the fresh state: it must be
pure (the service's is), and only the last call's outcome is committed.
"""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Iterator, Mapping

from engine.model import Accumulators
from server.ledger.base import (
    BatchItem, BatchState, BulkReads, Conflict, FacilityRecord, Forbidden, MemberRecord,
    MemberState, NotFound, Outcome,
    ReferralReversed, SettleResult, SettlementRecord, replay_or_conflict, resolve_repeats,
)
from server.ledger import schema
from server.ledger._journal import check_outcome, journal_rows

MEMBER_COLS = ("member_id, identity, continuous_since, retired, groups_json, maternity_eligible, "
               "primary_facility, other_facility, benefit_start, benefit_end, district, region, "
               "account_balance_fen, account_seq")
FACILITY_COLS = "facility_id, level, designated, district, name"
SETTLEMENT_COLS = ("settlement_id, facility_id, request_id, request_hash, member_id, year, status, "
                   "deltas, account_paid_fen, chain_deductible_after_fen, policy_version, result, "
                   "fund_total_fen, created_at, reversed_at")

Row = tuple


@dataclass(frozen=True)
class Audit:
    """Everything ``verify`` compares, read in one consistent snapshot (results left out)."""

    members: list[tuple[str, int, int]]                    # member id, balance, account seq
    accumulators: list[tuple[str, int, str, int, int]]     # member, year, layer, paid, base
    settlements: list[SettlementRecord]                    # with result=b""
    movements: list[tuple[str, int, str, int, str | None, int]]
    # ^ member, seq, kind, amount, settlement id, balance after


# json.dumps(obj, sort_keys=True) builds an encoder per call; one, made once, says the same
_SORTED_JSON = json.JSONEncoder(sort_keys=True).encode


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SqlLedger(BulkReads):
    """The contract over a DB-API cursor; subclasses implement the hooks below."""

    dialect: str = ""
    FOR_UPDATE: str = ""
    # settle looks a request id up before it takes the member's lock, so that a replay waits
    # for no lock; a backend whose writes are serialized anyway saves that query per call
    READ_REPLAY_FIRST: bool = True
    local_reads: bool = False

    # --- hooks ------------------------------------------------------------------------------
    def _run(self, fn: Callable[[Any], Any], mode: str = "write") -> Any:
        """Run ``fn(cursor)`` as a write transaction ("write"), autocommit reads ("read") or a
        read-only consistent snapshot ("snapshot"); retry what the backend knows to be
        transient. ``fn`` must be safe to run again."""
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql

    def enc_date(self, d: date | None) -> Any: return d
    def dec_date(self, v: Any) -> date | None: return v
    def enc_bool(self, b: bool) -> Any: return bool(b)
    def enc_json(self, obj: Any) -> Any: return _SORTED_JSON(obj)
    def dec_json(self, v: Any) -> Any: return v
    def enc_ts(self, t: datetime | None) -> Any: return t
    def dec_ts(self, v: Any) -> datetime | None: return v

    def enc_deltas(self, deltas: dict[str, tuple[int, int]]) -> Any:
        """The journal's deltas column (``check_outcome``'s sorted deltas)."""
        return self.enc_json({k: list(v) for k, v in deltas.items()})

    def enc_times(self, start: datetime, n: int) -> list:
        """``enc_ts`` of ``start`` plus 1, 2, … ``n`` microseconds (a batch's journal rows)."""
        return [self.enc_ts(start + k * _ONE_US) for k in range(1, n + 1)]

    # --- plumbing ---------------------------------------------------------------------------
    # What an INSERT that meets a journal key in use raises, where settle_batch inserts before
    # it looks (SqliteLedger); empty: it looks first.
    KEY_CLASH: tuple[type[BaseException], ...] = ()

    def _x(self, cur, sql: str, params: tuple = ()):
        cur.execute(self._sql(sql), params)
        return cur

    @staticmethod
    def _now() -> datetime:
        return datetime.now(timezone.utc)

    def _migrate(self) -> None:
        def create(cur):
            self._x(cur, schema.SCHEMA_VERSION_TABLE)
            self._x(cur, "INSERT INTO schema_version (id, version) VALUES (1, 0) "
                         "ON CONFLICT (id) DO NOTHING")
        self._run(create)

        def step(cur) -> bool:
            (v,) = self._x(cur, "SELECT version FROM schema_version WHERE id = 1"
                           + self.FOR_UPDATE).fetchone()
            if v > schema.VERSION:
                raise RuntimeError(f"the ledger database has schema version {v}, newer than "
                                   f"this code's {schema.VERSION}: upgrade the service")
            if v == schema.VERSION:
                return True
            for stmt in schema.statements(self.dialect, v):
                self._x(cur, stmt)
            self._x(cur, "UPDATE schema_version SET version = ? WHERE id = 1", (v + 1,))
            return False
        while not self._run(step):
            pass

    def schema_version(self) -> int:
        return self._run(lambda cur: self._x(
            cur, "SELECT version FROM schema_version WHERE id = 1").fetchone()[0], "read")

    # --- rows -------------------------------------------------------------------------------
    def _member(self, r: Row) -> MemberRecord:
        return MemberRecord(
            member_id=r[0], identity=r[1], continuous_since=self.dec_date(r[2]),
            retired=bool(r[3]), groups=frozenset(self.dec_json(r[4])),
            maternity_eligible=bool(r[5]), primary_facility=r[6], other_facility=r[7],
            benefit_start=self.dec_date(r[8]), benefit_end=self.dec_date(r[9]),
            district=r[10], region=r[11], account_balance_fen=int(r[12]))

    def _settlement(self, r: Row) -> SettlementRecord:
        deltas = {k: (int(v[0]), int(v[1])) for k, v in sorted(self.dec_json(r[7]).items())}
        return SettlementRecord(
            settlement_id=r[0], facility_id=r[1], request_id=r[2], request_hash=r[3],
            member_id=r[4], year=int(r[5]), status=r[6], deltas=deltas,
            account_paid_fen=int(r[8]), chain_deductible_after_fen=int(r[9]),
            policy_version=r[10], result=bytes(r[11]) if r[11] is not None else b"",
            fund_total_fen=int(r[12]), created_at=self.dec_ts(r[13]),
            reversed_at=self.dec_ts(r[14]))

    def _settlement_by_id(self, cur, settlement_id: str):
        r = self._x(cur, f"SELECT {SETTLEMENT_COLS} FROM settlements WHERE settlement_id = ?",
                    (settlement_id,)).fetchone()
        return None if r is None else self._settlement(r)

    def _by_request(self, cur, facility_id: str, request_id: str,
                    request_hash: str) -> SettleResult | None:
        r = self._x(cur, f"SELECT {SETTLEMENT_COLS} FROM settlements "
                         "WHERE facility_id = ? AND request_id = ?",
                    (facility_id, request_id)).fetchone()
        if r is None:
            return None
        found = replay_or_conflict(self._settlement(r), request_hash)
        if isinstance(found, Conflict):
            raise found
        return found

    def _lock_member(self, cur, member_id: str) -> Row:
        r = self._x(cur, f"SELECT {MEMBER_COLS} FROM members WHERE member_id = ?"
                    + self.FOR_UPDATE, (member_id,)).fetchone()
        if r is None:
            raise _no_member(member_id)
        return r

    def _move(self, cur, member_id: str, seq: int, kind: str, amount: int,
              settlement_id: str | None, balance_after: int, now: datetime) -> None:
        """Record account movement ``seq`` and make it the member's current balance."""
        self._x(cur, "INSERT INTO account_movements (member_id, seq, kind, amount_fen, "
                     "settlement_id, balance_after_fen, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (member_id, seq, kind, amount, settlement_id, balance_after, self.enc_ts(now)))
        self._x(cur, "UPDATE members SET account_balance_fen = ?, account_seq = ? "
                     "WHERE member_id = ?", (balance_after, seq, member_id))

    def _add(self, cur, member_id: str, year: int, deltas: Mapping[str, tuple[int, int]],
             sign: int) -> None:
        for layer, (paid, base) in deltas.items():
            self._x(cur, "INSERT INTO accumulators AS a (member_id, year, layer_id, paid_fen, "
                         "base_fen) VALUES (?, ?, ?, ?, ?) ON CONFLICT (member_id, year, layer_id) "
                         "DO UPDATE SET paid_fen = a.paid_fen + excluded.paid_fen, "
                         "base_fen = a.base_fen + excluded.base_fen",
                    (member_id, year, layer, sign * paid, sign * base))
        if sign < 0 and deltas:
            # Rows back at zero go, so that a reversal leaves the table as it found it.
            self._x(cur, "DELETE FROM accumulators WHERE member_id = ? AND year = ? "
                         "AND paid_fen = 0 AND base_fen = 0", (member_id, year))

    # --- registries -------------------------------------------------------------------------
    def upsert_member(self, m: MemberRecord, keep_balance: bool = False) -> MemberRecord:
        """Insert or replace a member; the member as stored. ``account_balance_fen`` is
        absolute: when it differs from the stored balance (or the member is new) a ``SET``
        account movement records it. ``keep_balance``: an existing member's stays as it is."""
        if not isinstance(m.member_id, str) or not m.member_id:
            raise ValueError("member_id must be a non-empty string")
        if not _is_int(m.account_balance_fen):
            raise ValueError("account_balance_fen must be an int")
        fields = (m.identity, self.enc_date(m.continuous_since), self.enc_bool(m.retired),
                  self.enc_json(sorted(m.groups)), self.enc_bool(m.maternity_eligible),
                  m.primary_facility, m.other_facility, self.enc_date(m.benefit_start),
                  self.enc_date(m.benefit_end), m.district, m.region)

        def body(cur):
            now = self._now()
            r = self._x(cur, "SELECT account_balance_fen, account_seq FROM members "
                             "WHERE member_id = ?" + self.FOR_UPDATE, (m.member_id,)).fetchone()
            if r is None:
                self._x(cur, "INSERT INTO members (member_id, identity, continuous_since, "
                             "retired, groups_json, maternity_eligible, primary_facility, "
                             "other_facility, benefit_start, benefit_end, district, region, "
                             "account_balance_fen, account_seq, updated_at) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                        (m.member_id, *fields, m.account_balance_fen, self.enc_ts(now)))
                balance, seq = None, 0
            else:
                self._x(cur, "UPDATE members SET identity = ?, continuous_since = ?, "
                             "retired = ?, groups_json = ?, maternity_eligible = ?, "
                             "primary_facility = ?, other_facility = ?, benefit_start = ?, "
                             "benefit_end = ?, district = ?, region = ?, updated_at = ? "
                             "WHERE member_id = ?",
                        (*fields, self.enc_ts(now), m.member_id))
                balance, seq = int(r[0]), int(r[1])
                if keep_balance:
                    return replace(m, account_balance_fen=balance)
            if balance != m.account_balance_fen:
                self._move(cur, m.member_id, seq + 1, "SET", m.account_balance_fen, None,
                           m.account_balance_fen, now)
            return m
        return self._run(body)

    def reads(self):
        """An object with ``get_member``, ``get_facility`` and ``accumulators`` for the reads
        of one call (the SQLite ledger answers them from its cache, checked once)."""
        return self

    def get_member(self, member_id: str) -> MemberRecord:
        r = self._run(lambda cur: self._x(
            cur, f"SELECT {MEMBER_COLS} FROM members WHERE member_id = ?",
            (member_id,)).fetchone(), "read")
        if r is None:
            raise _no_member(member_id)
        return self._member(r)

    def upsert_facility(self, f: FacilityRecord) -> None:
        if not isinstance(f.facility_id, str) or not f.facility_id:
            raise ValueError("facility_id must be a non-empty string")
        self._run(lambda cur: self._x(
            cur, "INSERT INTO facilities (facility_id, level, designated, district, name, "
                 "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (facility_id) DO UPDATE SET "
                 "level = excluded.level, designated = excluded.designated, "
                 "district = excluded.district, name = excluded.name, "
                 "updated_at = excluded.updated_at",
            (f.facility_id, f.level, self.enc_bool(f.designated), f.district, f.name,
             self.enc_ts(self._now()))))

    def get_facility(self, facility_id: str) -> FacilityRecord:
        return self._run(lambda cur: self._facility(cur, facility_id), "read")

    def _facility(self, cur, facility_id: str) -> FacilityRecord:
        r = self._x(cur, f"SELECT {FACILITY_COLS} FROM facilities WHERE facility_id = ?",
                    (facility_id,)).fetchone()
        if r is None:
            raise _no_facility(facility_id)
        return _facility_record(r)

    def _accumulators(self, cur, member_id: str, year: int) -> Accumulators:
        rows = self._x(cur, "SELECT layer_id, paid_fen, base_fen FROM accumulators "
                            "WHERE member_id = ? AND year = ? ORDER BY layer_id",
                       (member_id, year)).fetchall()
        return Accumulators(year, {r[0]: int(r[1]) for r in rows},
                            {r[0]: int(r[2]) for r in rows})

    def accumulators(self, member_id: str, year: int) -> Accumulators:
        return self._run(lambda cur: self._accumulators(cur, member_id, year), "read")

    # --- settlement -------------------------------------------------------------------------
    def settle(self, *, facility_id: str, request_id: str, request_hash: str, member_id: str,
               year: int, evaluate: Callable[[MemberState], Outcome],
               referral_from: str = "") -> SettleResult:
        # Replays need no lock: a committed key never changes its settlement.
        if self.READ_REPLAY_FIRST:
            found = self._run(lambda cur: self._by_request(cur, facility_id, request_id,
                                                           request_hash), "read")
            if found is not None:
                return found

        item = BatchItem(facility_id, request_id, request_hash, member_id, year, referral_from)

        def body(cur) -> SettleResult:
            # steps 1-4: a run of one settlement (the member's row locked first; a concurrent
            # first use of this key for another member loses, or wins, on the UNIQUE key)
            got = self.settle_run(cur, [item], [evaluate])[0]
            if isinstance(got, Exception):
                raise got
            return got
        return self._run(body)

    def _check_referral(self, cur, member_id: str, settlement_id: str) -> None:
        """Under the member's lock: the referring settlement still stands."""
        if self._x(cur, "SELECT 1 FROM settlements WHERE settlement_id = ? AND member_id = ? "
                        "AND status = 'SETTLED'", (settlement_id, member_id)).fetchone() is None:
            raise ReferralReversed(settlement_id)

    def settle_batch(self, items: list[BatchItem | None],
                     evaluate: Callable[[BatchState], list]) -> list:
        """``base.Ledger.settle_batch``: one unit of work (one transaction, on SQLite one
        savepoint of a group commit) for the whole batch."""
        def body(cur, look_up: bool) -> list:
            results: list = [None] * len(items)
            first: dict[tuple[str, str], int] = {}
            new = [False] * len(items)
            for i, it in enumerate(items):
                if it is None:
                    continue
                key = (it.facility_id, it.request_id)
                if key in first:                 # the same key earlier in this batch
                    results[i] = ("dup", first[key])
                    continue
                first[key] = i
            # keys already in the journal: few, usually
            used = self._settlements_by_keys(cur, first) if look_up else {}
            for key, i in first.items():
                rec = used.get(key)
                if rec is None:
                    new[i] = True
                else:
                    results[i] = replay_or_conflict(rec, items[i].request_hash)
            member_ids = sorted({it.member_id for i, it in enumerate(items) if new[i]})
            rows = self._members_in(cur, member_ids)
            members = {mid: self._member(rows[mid]) if mid in rows else None
                       for mid in member_ids}
            for i, it in enumerate(items):           # under the locks, as settle does
                if new[i] and it.referral_from and it.member_id in rows:
                    try:
                        self._check_referral(cur, it.member_id, it.referral_from)
                    except ReferralReversed as e:
                        new[i], results[i] = False, e
            facilities = self._facilities_in(
                cur, {it.facility_id for i, it in enumerate(items) if new[i]})
            # one query for the batch's member-years: one per member-year was a round trip
            # each on PostgreSQL
            acc = self._accumulators_in(cur, {(it.member_id, it.year)
                                              for i, it in enumerate(items)
                                              if new[i] and it.member_id in rows})
            outcomes = evaluate(BatchState(new, members, acc, facilities))
            now = self._now()
            balance = {mid: (m.account_balance_fen, int(rows[mid][13]))
                       for mid, m in members.items() if m is not None}
            n_new = sum(new)
            inserts, added, moves = journal_rows(
                outcomes, new, items, balance, new_settlement_ids(n_new),
                self.enc_times(now, n_new), now, _ONE_US, self.enc_deltas, results,
                SettlementRecord, SettleResult)
            if not look_up and len(inserts) < len(first):   # some were refused now (unit)
                unsettled.extend(key for key, i in first.items()
                                 if not isinstance(results[i], SettleResult))
            self._write_journal(cur, inserts, added, moves)
            resolve_repeats(items, results)      # later uses of a key of this batch
            return results

        unsettled: list[tuple[str, str]] = []

        def unit(cur) -> list:
            if not self.KEY_CLASH:
                return body(cur, True)
            # A batch's request ids are new but for the rare resent one, so the batch is
            # settled first and its keys looked up only where needed: the journal's unique key
            # refuses the INSERT of a key in use, and a claim refused now (a member no longer
            # covered…) may still be a replay, so its key is looked up. Either way the batch
            # is done again from its savepoint with every key looked up first. The 1000
            # lookups were 7 % of a batch's writer time.
            unsettled.clear()
            self._x(cur, "SAVEPOINT batch_keys")
            try:
                results = body(cur, False)
                redo = bool(unsettled) and self._any_used(cur, unsettled)
            except self.KEY_CLASH:
                redo = True
            if redo:
                self._x(cur, "ROLLBACK TO batch_keys")
                self._x(cur, "RELEASE batch_keys")
                return body(cur, True)
            self._x(cur, "RELEASE batch_keys")
            return results
        return self._run(unit)

    def _write_journal(self, cur, inserts: list, added: dict, moves: list) -> None:
        """Write what ``journal_rows`` made: journal rows, accumulator additions, account
        movements and the members' balances after them."""
        if inserts:
            cur.executemany(self._sql(
                f"INSERT INTO settlements ({SETTLEMENT_COLS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"), inserts)
        if added:
            cur.executemany(self._sql(
                "INSERT INTO accumulators AS a (member_id, year, layer_id, paid_fen, "
                "base_fen) VALUES (?, ?, ?, ?, ?) ON CONFLICT (member_id, year, layer_id) "
                "DO UPDATE SET paid_fen = a.paid_fen + excluded.paid_fen, "
                "base_fen = a.base_fen + excluded.base_fen"),
                [(*k, v[0], v[1]) for k, v in added.items()])
        if moves:
            cur.executemany(self._sql(
                "INSERT INTO account_movements (member_id, seq, kind, amount_fen, "
                "settlement_id, balance_after_fen, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"),
                moves)
            last = {m[0]: (m[5], m[1]) for m in moves}
            cur.executemany(self._sql(
                "UPDATE members SET account_balance_fen = ?, account_seq = ? "
                "WHERE member_id = ?"), [(b, q, mid) for mid, (b, q) in last.items()])

    def _in(self, column: str, ids: list) -> Iterator[tuple[str, tuple]]:
        """``column`` among ``ids`` as pieces of SQL and their parameters: ``IN (?, …)`` of
        at most 512 ids each (``_chunks``). PostgreSQL's ledger makes one array of them."""
        for chunk in _chunks(ids):
            yield f"{column} IN ({', '.join('?' * len(chunk))})", tuple(chunk)

    def _members_in(self, cur, member_ids) -> dict[str, Row]:
        """The rows of the registered ones of ``member_ids``, locked as ``_lock_member``
        locks one (in id order: two writers never wait on each other crosswise)."""
        rows = {}
        for cond, params in self._in("member_id", sorted(member_ids)):
            for r in self._x(cur, f"SELECT {MEMBER_COLS} FROM members WHERE {cond} "
                                  "ORDER BY member_id" + self.FOR_UPDATE, params).fetchall():
                rows[r[0]] = r
        return rows

    def settle_run(self, cur, items: list[BatchItem],
                   evaluates: list[Callable[[MemberState], Outcome]]) -> list:
        """``settle`` of each item in turn (``evaluates[i]`` its callback), inside the
        caller's write transaction, with a few statements for all of them: each item sees
        the writes of those before it, and gets what ``settle`` would return or raise,
        a ``SettleResult`` or the exception (then nothing of it is written). The SQLite
        ledger's committer settles the concurrent ``Settle`` calls of a group this way."""
        n = len(items)
        rows = self._members_in(cur, {it.member_id for it in items})
        used = self._settlements_by_keys(cur, {(it.facility_id, it.request_id)
                                               for it in items if it.member_id in rows})
        facilities = self._facilities_in(cur, {it.facility_id for it in items})
        accs = self._accumulators_in(cur, {(it.member_id, it.year) for it in items
                                           if it.member_id in rows})
        results: list = [None] * n
        outcomes: list = [None] * n
        new = [False] * n
        members: dict[str, MemberRecord] = {}   # as the items before left them
        balance: dict[str, tuple[int, int]] = {}   # balance and movement seq, before the run
        settled: dict[tuple[str, str], int] = {}   # key -> the item of this run that used it
        for i, it in enumerate(items):
            mid, key = it.member_id, (it.facility_id, it.request_id)
            row = rows.get(mid)
            if row is None:                      # settle's order of checks, step by step
                results[i] = _no_member(mid)
                continue
            if key in settled:
                results[i] = ("repeat", settled[key])
                continue
            if key in used:
                results[i] = replay_or_conflict(used[key], it.request_hash)
                continue
            m = members.get(mid)
            if m is None:
                m = members[mid] = self._member(row)
                balance[mid] = (m.account_balance_fen, int(row[13]))
            if it.referral_from:
                try:
                    self._check_referral(cur, mid, it.referral_from)
                except ReferralReversed as e:
                    results[i] = e
                    continue
            f = facilities.get(it.facility_id)
            if f is None:
                results[i] = _no_facility(it.facility_id)
                continue
            acc = accs[(mid, it.year)]
            try:            # the evaluation is pure: anything it raises is this item's refusal
                out = evaluates[i](MemberState(m, acc, m.account_balance_fen, f))
                deltas = check_outcome(out, m.account_balance_fen)
            except Exception as e:
                results[i] = e
                continue
            outcomes[i], new[i], settled[key] = out, True, i
            accs[(mid, it.year)] = _plus(acc, deltas)
            if out.account_paid_fen:
                members[mid] = replace(m, account_balance_fen=m.account_balance_fen
                                       - out.account_paid_fen)
        n_new = sum(new)
        now = self._now()
        inserts, added, moves = journal_rows(
            outcomes, new, items, balance, new_settlement_ids(n_new),
            self.enc_times(now, n_new), now, _ONE_US, self.enc_deltas, results,
            SettlementRecord, SettleResult)
        self._write_journal(cur, inserts, added, moves)
        return resolve_repeats(items, results)

    def _settlements_by_keys(self, cur, keys) -> dict[tuple[str, str], SettlementRecord]:
        """The journal's settlements under the (facility id, request id) ``keys``."""
        by_facility: dict[str, list[str]] = {}
        for fid, rid in keys:
            by_facility.setdefault(fid, []).append(rid)
        out = {}
        for fid, rids in by_facility.items():
            for cond, params in self._in("request_id", rids):
                for r in self._x(cur, f"SELECT {SETTLEMENT_COLS} FROM settlements "
                                      f"WHERE facility_id = ? AND {cond}",
                                 (fid, *params)).fetchall():
                    out[(r[1], r[2])] = self._settlement(r)
        return out

    def _facilities_in(self, cur, facility_ids) -> dict[str, FacilityRecord]:
        out = {}
        for cond, params in self._in("facility_id", sorted(facility_ids)):
            for r in self._x(cur, f"SELECT {FACILITY_COLS} FROM facilities WHERE {cond}",
                             params).fetchall():
                out[r[0]] = _facility_record(r)
        return out

    def _accumulators_in(self, cur, keys) -> dict[tuple[str, int], Accumulators]:
        """``_accumulators`` of each (member id, year) of ``keys``."""
        paid: dict[tuple[str, int], dict] = {k: {} for k in keys}
        base: dict[tuple[str, int], dict] = {k: {} for k in keys}
        for cond, params in self._in("member_id", sorted({mid for mid, _ in keys})):
            for r in self._x(cur, "SELECT member_id, year, layer_id, paid_fen, base_fen "
                                  f"FROM accumulators WHERE {cond} "
                                  "ORDER BY member_id, year, layer_id", params).fetchall():
                k = (r[0], int(r[1]))
                if k in paid:
                    paid[k][r[2]] = int(r[3])
                    base[k][r[2]] = int(r[4])
        return {k: Accumulators(k[1], paid[k], base[k]) for k in keys}

    def _any_used(self, cur, keys: list[tuple[str, str]]) -> bool:
        """Whether any of the (facility id, request id) keys is in the journal."""
        by_facility: dict[str, list[str]] = {}
        for fid, rid in keys:
            by_facility.setdefault(fid, []).append(rid)
        return any(self._x(cur, f"SELECT 1 FROM settlements WHERE facility_id = ? AND {cond} "
                                "LIMIT 1", (fid, *params)).fetchone()
                   for fid, rids in by_facility.items()
                   for cond, params in self._in("request_id", rids))

    def reverse(self, *, settlement_id: str, facility_id: str) -> SettlementRecord:
        def check(rec: SettlementRecord | None) -> SettlementRecord:
            if rec is None:
                raise NotFound(f"settlement {settlement_id!r} does not exist")
            if rec.facility_id != facility_id:
                raise Forbidden(f"settlement {settlement_id!r} belongs to another facility")
            return rec

        rec = check(self._run(lambda cur: self._settlement_by_id(cur, settlement_id), "read"))
        if rec.status == "REVERSED":
            return rec
        member_id = rec.member_id

        def body(cur) -> SettlementRecord:
            m = self._lock_member(cur, member_id)
            rec = check(self._settlement_by_id(cur, settlement_id))
            if rec.status == "REVERSED":
                return rec
            now = self._now()
            self._add(cur, member_id, rec.year, rec.deltas, -1)
            if rec.account_paid_fen:
                self._move(cur, member_id, int(m[13]) + 1, "REVERSE", rec.account_paid_fen,
                           settlement_id, int(m[12]) + rec.account_paid_fen, now)
            self._x(cur, "UPDATE settlements SET status = 'REVERSED', reversed_at = ? "
                         "WHERE settlement_id = ? AND member_id = ?",
                    (self.enc_ts(now), settlement_id, member_id))
            return rec._replace(status="REVERSED", reversed_at=now)
        return self._run(body)

    def get_settlement(self, settlement_id: str) -> SettlementRecord:
        rec = self._run(lambda cur: self._settlement_by_id(cur, settlement_id), "read")
        if rec is None:
            raise NotFound(f"settlement {settlement_id!r} does not exist")
        return rec

    def journal(self, member_id: str | None = None) -> Iterator[SettlementRecord]:
        """The settlements (of one member, or all) in the order they were made."""
        def read(cur):
            where, params = ("WHERE member_id = ? ", (member_id,)) if member_id is not None \
                else ("", ())
            return [self._settlement(r) for r in self._x(
                cur, f"SELECT {SETTLEMENT_COLS} FROM settlements {where}"
                     "ORDER BY created_at, settlement_id", params).fetchall()]
        return iter(self._run(read, "read"))

    # --- audit (server.ledger.verify) ---------------------------------------------------------
    def audit(self) -> Audit:
        """All rows ``verify`` needs, from one consistent snapshot of the database."""
        cols = SETTLEMENT_COLS.replace("result", "NULL")

        def read(cur) -> Audit:
            return Audit(
                members=[(r[0], int(r[1]), int(r[2])) for r in self._x(
                    cur, "SELECT member_id, account_balance_fen, account_seq FROM members "
                         "ORDER BY member_id").fetchall()],
                accumulators=[(r[0], int(r[1]), r[2], int(r[3]), int(r[4])) for r in self._x(
                    cur, "SELECT member_id, year, layer_id, paid_fen, base_fen "
                         "FROM accumulators ORDER BY member_id, year, layer_id").fetchall()],
                settlements=[self._settlement(r) for r in self._x(
                    cur, f"SELECT {cols} FROM settlements "
                         "ORDER BY member_id, created_at, settlement_id").fetchall()],
                movements=[(r[0], int(r[1]), r[2], int(r[3]), r[4], int(r[5])) for r in self._x(
                    cur, "SELECT member_id, seq, kind, amount_fen, settlement_id, "
                         "balance_after_fen FROM account_movements ORDER BY member_id, seq"
                    ).fetchall()])
        return self._run(read, "snapshot")

    # --- lifecycle --------------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


def _no_member(member_id: str) -> NotFound:
    return NotFound(f"member {member_id!r} is not registered")


def _no_facility(facility_id: str) -> NotFound:
    return NotFound(f"facility {facility_id!r} is not registered")


def _facility_record(r: Row) -> FacilityRecord:
    return FacilityRecord(facility_id=r[0], level=r[1], designated=bool(r[2]), district=r[3],
                          name=r[4])


def _plus(acc: Accumulators, deltas: Mapping[str, tuple[int, int]]) -> Accumulators:
    """``acc`` after a settlement's (checked) deltas, as ``_accumulators`` reads it back."""
    if not deltas:
        return acc
    paid, base = dict(acc.paid), dict(acc.base)
    for layer, (p, b) in deltas.items():
        paid[layer] = paid.get(layer, 0) + p
        base[layer] = base.get(layer, 0) + b
    return Accumulators(acc.year, dict(sorted(paid.items())), dict(sorted(base.items())))


def new_settlement_id() -> str:
    """32 hex digits: the time in µs, then 72 random bits. Ids made later sort later, so the
    journal's primary key grows at its end instead of at random places (fewer pages written
    per commit); uniqueness rests on the random part, as with a uuid4."""
    return new_settlement_ids(1)[0]


def new_settlement_ids(n: int) -> list[str]:
    """``n`` ids as new_settlement_id describes them, sharing one time and one read of the
    system's random source (a batch's ids: that read was 5 % of a durable batch)."""
    head = f"{time.time_ns() // 1000:014x}"[-14:]
    rnd = os.urandom(9 * n).hex()
    return [head + rnd[18 * k:18 * k + 18] for k in range(n)]


_ONE_US = timedelta(microseconds=1)


def _chunks(ids: list, size: int = 512):
    """``ids`` in lists of at most ``size`` for ``IN (?, …)``, each padded to a power of two
    by repeating its last id (the same test): a few statement texts, each compiled once
    (sqlite3's statement cache), where every batch's own lengths made new ones — a batch of
    24 facilities' claims compiled 24 lookups."""
    for k in range(0, len(ids), size):
        chunk = ids[k:k + size]
        yield chunk + chunk[-1:] * ((1 << (len(chunk) - 1).bit_length()) - len(chunk))


@functools.lru_cache(maxsize=None)
def qmark_to_format(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (the shared statements contain no literal % or ?)."""
    return sql.replace("%", "%%").replace("?", "%s")
