"""An in-memory ledger: the fake for unit tests of the service (same contract as ``base``).

Nothing is durable. Thread-safe: one lock per member serialises settlements and reversals of
that member, as the real ledgers' row locks do; a global lock guards the dictionaries and the
idempotency index.
"""
from __future__ import annotations

import threading
import uuid
from collections import defaultdict
from dataclasses import replace
from datetime import datetime, timezone
from typing import Callable, Iterator

from engine.model import Accumulators
from server.ledger.base import (
    BulkReads, Conflict, FacilityRecord, Forbidden, MemberRecord, MemberState, NotFound, Outcome,
    ReferralReversed, SettleResult, SettlementRecord, replay_or_conflict, resolve_repeats,
)


class MemoryLedger(BulkReads):
    local_reads = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._member_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._members: dict[str, MemberRecord] = {}
        self._facilities: dict[str, FacilityRecord] = {}
        self._acc: dict[tuple[str, int], tuple[dict[str, int], dict[str, int]]] = {}
        self._journal: dict[str, SettlementRecord] = {}     # settlement id -> record, in order
        self._by_request: dict[tuple[str, str], str] = {}   # (facility, request id) -> id

    def _member_lock(self, member_id: str) -> threading.Lock:
        with self._lock:
            return self._member_locks[member_id]

    # --- registries -----------------------------------------------------------------------
    def upsert_member(self, m: MemberRecord, keep_balance: bool = False) -> MemberRecord:
        with self._member_lock(m.member_id), self._lock:
            old = self._members.get(m.member_id)
            if keep_balance and old is not None:
                m = replace(m, account_balance_fen=old.account_balance_fen)
            self._members[m.member_id] = m
            return m

    def reads(self):
        return self

    def get_member(self, member_id: str) -> MemberRecord:
        with self._lock:
            try:
                return self._members[member_id]
            except KeyError:
                raise NotFound(f"member {member_id!r} is not registered") from None

    def upsert_facility(self, f: FacilityRecord) -> None:
        with self._lock:
            self._facilities[f.facility_id] = f

    def get_facility(self, facility_id: str) -> FacilityRecord:
        with self._lock:
            try:
                return self._facilities[facility_id]
            except KeyError:
                raise NotFound(f"facility {facility_id!r} is not registered") from None

    def accumulators(self, member_id: str, year: int) -> Accumulators:
        with self._lock:
            paid, base = self._acc.get((member_id, year), ({}, {}))
            return Accumulators(year, dict(paid), dict(base))

    # --- settlement -----------------------------------------------------------------------
    def _existing(self, facility_id: str, request_id: str,
                  request_hash: str) -> SettleResult | None:
        sid = self._by_request.get((facility_id, request_id))
        if sid is None:
            return None
        found = replay_or_conflict(self._journal[sid], request_hash)
        if isinstance(found, Conflict):
            raise found
        return found

    def settle(self, *, facility_id: str, request_id: str, request_hash: str, member_id: str,
               year: int, evaluate: Callable[[MemberState], Outcome],
               referral_from: str = "") -> SettleResult:
        with self._member_lock(member_id):
            with self._lock:
                found = self._existing(facility_id, request_id, request_hash)
                if found is not None:
                    return found
                if member_id not in self._members:
                    raise NotFound(f"member {member_id!r} is not registered")
                if referral_from:
                    self._check_referral(member_id, referral_from)
                facility = self._facilities.get(facility_id)
                if facility is None:
                    raise NotFound(f"facility {facility_id!r} is not registered")
                member = self._members[member_id]
                paid, base = self._acc.get((member_id, year), ({}, {}))
                state = MemberState(member, Accumulators(year, dict(paid), dict(base)),
                                    member.account_balance_fen, facility)
            out = evaluate(state)  # outside the global lock: other members proceed meanwhile
            with self._lock:
                # The same key may have been taken meanwhile through another member's lock.
                found = self._existing(facility_id, request_id, request_hash)
                if found is not None:
                    return found
                rec = SettlementRecord(
                    settlement_id=uuid.uuid4().hex, facility_id=facility_id,
                    request_id=request_id, request_hash=request_hash, member_id=member_id,
                    year=year, status="SETTLED", deltas=dict(out.deltas),
                    account_paid_fen=out.account_paid_fen,
                    chain_deductible_after_fen=out.chain_deductible_after_fen,
                    policy_version=out.policy_version, result=out.result,
                    fund_total_fen=out.fund_total_fen, created_at=datetime.now(timezone.utc))
                self._apply(member_id, year, out.deltas, +1)
                self._members[member_id] = replace(
                    member, account_balance_fen=member.account_balance_fen - out.account_paid_fen)
                self._journal[rec.settlement_id] = rec
                self._by_request[(facility_id, request_id)] = rec.settlement_id
                return SettleResult(rec, created=True)

    def _check_referral(self, member_id: str, settlement_id: str) -> None:
        """Under the member's lock (a reversal takes it too): the referring settlement stands."""
        rec = self._journal.get(settlement_id)
        if rec is None or rec.member_id != member_id or rec.status != "SETTLED":
            raise ReferralReversed(settlement_id)

    def settle_batch(self, items, evaluate):
        """``base.Ledger.settle_batch``: the members' locks in id order, then as ``settle``."""
        from server.ledger.base import BatchState
        from server.ledger._journal import check_outcome
        mids = sorted({it.member_id for it in items if it is not None})
        locks = [self._member_lock(mid) for mid in mids]
        for lock in locks:
            lock.acquire()
        try:
            with self._lock:
                results: list = [None] * len(items)
                new = [False] * len(items)
                seen: dict = {}
                for i, it in enumerate(items):
                    if it is None:
                        continue
                    key = (it.facility_id, it.request_id)
                    if key in seen:
                        results[i] = ("dup", seen[key])
                        continue
                    seen[key] = i
                    try:
                        found = self._existing(it.facility_id, it.request_id, it.request_hash)
                    except Conflict as e:
                        results[i] = e
                        continue
                    if found is not None:
                        results[i] = found
                        continue
                    try:
                        if it.referral_from and it.member_id in self._members:
                            self._check_referral(it.member_id, it.referral_from)
                        new[i] = True
                    except ReferralReversed as e:
                        results[i] = e
                members = {it.member_id: self._members.get(it.member_id)
                           for i, it in enumerate(items) if new[i]}
                acc = {}
                for i, it in enumerate(items):
                    if new[i] and members[it.member_id] is not None:
                        paid, base = self._acc.get((it.member_id, it.year), ({}, {}))
                        acc[(it.member_id, it.year)] = Accumulators(it.year, dict(paid),
                                                                    dict(base))
                facilities = {it.facility_id: self._facilities[it.facility_id]
                              for i, it in enumerate(items)
                              if new[i] and it.facility_id in self._facilities}
            outcomes = evaluate(BatchState(new, members, acc, facilities))
            with self._lock:
                checked = {}
                balance = {mid: m.account_balance_fen for mid, m in members.items()
                           if m is not None}
                for i, out in enumerate(outcomes):      # check everything before applying
                    if new[i] and out is not None and not isinstance(out, BaseException):
                        mid = items[i].member_id
                        checked[i] = check_outcome(out, balance[mid])
                        balance[mid] -= out.account_paid_fen
                for i, out in enumerate(outcomes):
                    if not new[i]:
                        continue
                    if i not in checked:
                        results[i] = out
                        continue
                    it = items[i]
                    rec = SettlementRecord(
                        settlement_id=uuid.uuid4().hex, facility_id=it.facility_id,
                        request_id=it.request_id, request_hash=it.request_hash,
                        member_id=it.member_id, year=it.year, status="SETTLED",
                        deltas=checked[i], account_paid_fen=out.account_paid_fen,
                        chain_deductible_after_fen=out.chain_deductible_after_fen,
                        policy_version=out.policy_version, result=bytes(out.result),
                        fund_total_fen=out.fund_total_fen, created_at=datetime.now(timezone.utc))
                    self._apply(it.member_id, it.year, checked[i], +1)
                    m = self._members[it.member_id]
                    self._members[it.member_id] = replace(
                        m, account_balance_fen=m.account_balance_fen - out.account_paid_fen)
                    self._journal[rec.settlement_id] = rec
                    self._by_request[(it.facility_id, it.request_id)] = rec.settlement_id
                    results[i] = SettleResult(rec, created=True)
                resolve_repeats(items, results)
                return results
        finally:
            for lock in reversed(locks):
                lock.release()

    def _apply(self, member_id: str, year: int, deltas, sign: int) -> None:
        paid, base = self._acc.setdefault((member_id, year), ({}, {}))
        for layer, (dp, db) in deltas.items():
            paid[layer] = paid.get(layer, 0) + sign * dp
            base[layer] = base.get(layer, 0) + sign * db

    def reverse(self, *, settlement_id: str, facility_id: str) -> SettlementRecord:
        with self._lock:
            rec = self._journal.get(settlement_id)
        if rec is None:
            raise NotFound(f"settlement {settlement_id!r} does not exist")
        if rec.facility_id != facility_id:
            raise Forbidden(f"settlement {settlement_id!r} belongs to another facility")
        with self._member_lock(rec.member_id), self._lock:
            rec = self._journal[settlement_id]
            if rec.status == "REVERSED":
                return rec
            self._apply(rec.member_id, rec.year, rec.deltas, -1)
            m = self._members[rec.member_id]
            self._members[rec.member_id] = replace(
                m, account_balance_fen=m.account_balance_fen + rec.account_paid_fen)
            rec = rec._replace(status="REVERSED", reversed_at=datetime.now(timezone.utc))
            self._journal[settlement_id] = rec
            return rec

    def get_settlement(self, settlement_id: str) -> SettlementRecord:
        with self._lock:
            try:
                return self._journal[settlement_id]
            except KeyError:
                raise NotFound(f"settlement {settlement_id!r} does not exist") from None

    def journal(self, member_id: str | None = None) -> Iterator[SettlementRecord]:
        with self._lock:
            recs = list(self._journal.values())
        return iter([r for r in recs if member_id is None or r.member_id == member_id])

    def close(self) -> None:
        pass
