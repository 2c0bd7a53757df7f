"""The SQLite committer settles a group's settlements together (``SqlLedger.settle_run``):
each must get exactly what ``settle`` (a run of one, in a transaction of its own) gives it,
one after the other, and leave the same ledger behind. ``settle``'s order of checks, on every
backend, is the last test's."""
from __future__ import annotations

import ast

from hypothesis import HealthCheck, given, settings, strategies as hs

import pytest

from ledger_fixtures import *  # noqa: F401,F403  (fixtures: backend, pg_database)
from ledger_fixtures import YEAR, facility, member, paying
from server.ledger.base import (
    BatchItem, Conflict, MemberState, NotFound, Outcome, ReferralReversed, SettleResult,
)
from server.ledger.sqlbase import SqlLedger
from server.ledger.sqlite import SqliteLedger, _Unit
from server.ledger.verify import verify

MEMBERS = ("M0", "M1", "M2", "MX")       # MX is not registered
FACILITIES = ("F0", "F1", "FX")          # FX is not registered


def _evaluate(body: tuple):
    """A pure evaluation of the claim ``body`` (member, facility, request id, variant) that
    shows in its result everything it was given, so that a settlement that saw another state
    than it would have alone differs. Variant 2 refuses; variant 3 pays more from the account
    than it holds (the ledger's own check refuses it)."""
    mid, fid, rid, variant = body

    def evaluate(state: MemberState) -> Outcome:
        if variant == 2:
            raise ValueError(f"claim {rid} of {mid} refused")
        acc = state.accumulators
        layer = "T1" if variant == 0 else "T2"
        want = 40 + 25 * int(rid[1:]) + 7 * MEMBERS.index(mid)
        pay = max(0, min(want, 150 - acc.paid_of(layer)))
        account = state.balance_fen + 1 if variant == 3 else min(30, state.balance_fen)
        seen = (sorted(acc.paid.items()), sorted(acc.base.items()), state.balance_fen,
                state.member.account_balance_fen, state.facility.facility_id,
                state.facility.level)
        return Outcome(deltas={layer: (pay, want)}, account_paid_fen=account,
                       chain_deductible_after_fen=want, policy_version="test-1",
                       result=repr(seen).encode(), fund_total_fen=pay)
    return evaluate


def _item(body: tuple) -> BatchItem:
    mid, fid, rid, variant = body
    return BatchItem(fid, rid, f"hash-{mid}-{variant}", mid, YEAR)


def _ledger(path, balances) -> SqliteLedger:
    ledger = SqliteLedger(path)
    ledger.upsert_facility(facility("F0"))
    ledger.upsert_facility(facility("F1", level="LEVEL_3"))
    for mid, balance in zip(MEMBERS[:3], balances):
        ledger.upsert_member(member(mid, balance=balance))
    return ledger


def _outcome(r, ids: dict) -> tuple:
    """A result without what differs between two ledgers by design (ids, times); a
    settlement id as the claim that made it."""
    if isinstance(r, BaseException):
        text = str(r)
        for sid, label in ids.items():
            text = text.replace(sid, label)
        return type(r).__name__, text
    rec = r.record
    return (r.created, ids[rec.settlement_id], rec.facility_id, rec.request_id,
            rec.request_hash, rec.member_id, rec.status, dict(rec.deltas), rec.account_paid_fen,
            rec.chain_deductible_after_fen, rec.result, rec.fund_total_fen)


def _state(ledger: SqliteLedger, ids: dict) -> tuple:
    a = ledger.audit()
    return (a.members, a.accumulators,
            sorted((ids[s.settlement_id], s.request_id, s.member_id, s.status, s.deltas,
                    s.account_paid_fen) for s in a.settlements),
            [(m, q, k, amount, sid and ids[sid], after) for m, q, k, amount, sid, after
             in a.movements])


def _ids(results) -> dict:
    """settlement id -> the claim of the group that created it."""
    return {r.record.settlement_id: f"c{i}" for i, r in enumerate(results)
            if isinstance(r, SettleResult) and r.created}


bodies = hs.tuples(hs.sampled_from(MEMBERS), hs.sampled_from(FACILITIES),
                   hs.sampled_from(("r0", "r1", "r2", "r3")), hs.integers(0, 3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(claims=hs.lists(bodies, min_size=1, max_size=14),
       balances=hs.tuples(*[hs.integers(0, 80)] * 3),
       earlier=hs.lists(bodies, max_size=3))
def test_a_group_settled_together_is_each_settled_in_turn(tmp_path_factory, claims, balances,
                                                          earlier):
    d = tmp_path_factory.mktemp("run")
    together, alone = _ledger(d / "a.db", balances), _ledger(d / "b.db", balances)
    try:
        # claims settled before the group (replays and conflicts of the journal), alike
        for body in earlier:
            for ledger in (together, alone):
                try:
                    SqlLedger.settle(ledger, **_item(body)._asdict(), evaluate=_evaluate(body))
                except Exception:   # noqa: BLE001 — refused alike; compared below
                    pass
        units = [_Unit(None, _item(b), _evaluate(b)) for b in claims]
        together._run_group(units)             # as the committer runs a group
        got = [u.error if u.error is not None else u.result for u in units]
        want = []
        for body in claims:                      # settle's own unit of work, one at a time
            try:
                want.append(SqlLedger.settle(alone, **_item(body)._asdict(),
                                             evaluate=_evaluate(body)))
            except Exception as e:   # noqa: BLE001 — the refusal is the result compared
                want.append(e)
        ids_got, ids_want = _ids(got), _ids(want)
        earlier_got = {r.settlement_id: f"e{k}" for k, r in enumerate(together.journal())
                       if r.settlement_id not in ids_got}
        earlier_want = {r.settlement_id: f"e{k}" for k, r in enumerate(alone.journal())
                        if r.settlement_id not in ids_want}
        ids_got.update(earlier_got)
        ids_want.update(earlier_want)
        assert [_outcome(r, ids_got) for r in got] == [_outcome(r, ids_want) for r in want]
        assert _state(together, ids_got) == _state(alone, ids_want)
        assert verify(together) == []
    finally:
        together.close()
        alone.close()


def _unit(mid: str, rid: str, variant: int = 0) -> _Unit:
    body = (mid, "F0", rid, variant)
    return _Unit(None, _item(body), _evaluate(body))


def test_other_units_of_a_group_split_its_settlements_into_runs_that_see_them(tmp_path):
    ledger = _ledger(tmp_path / "l.db", (50, 50, 50))
    try:
        def top_up(cur):
            # a registry write between two settlements of M0: the second sees its balance
            ledger._x(cur, "UPDATE members SET account_balance_fen = 500 WHERE member_id = 'M0'")
            return "topped up"

        group = [_unit("M0", "r0"), _unit("M1", "r1"), _Unit(top_up), _unit("M0", "r2")]
        assert [len(run) for run, _ in ledger._runs(group)] == [2, 1, 1]
        ledger._run_group(group)
        assert [u.error for u in group] == [None] * 4
        assert group[2].result == "topped up"
        # M0 paid 30 of its 50 in the first run; the third run saw the 500 set between them
        seen_balance = ast.literal_eval(group[3].result.record.result.decode())[2]
        assert seen_balance == 500
        assert ledger.get_member("M0").account_balance_fen == 470
    finally:
        ledger.close()


def test_a_run_that_fails_unexpectedly_fails_its_settlements_alone(tmp_path):
    ledger = _ledger(tmp_path / "l.db", (50, 50, 50))
    try:
        def write_fails(*a):
            raise RuntimeError("journal write failed (injected)")

        def rename(cur):
            ledger._x(cur, "UPDATE facilities SET name = 'renamed' WHERE facility_id = 'F1'")
            return "renamed"

        group = [_unit("M0", "r0"), _unit("M1", "r1"), _Unit(rename)]
        ledger._write_journal = write_fails
        ledger._run_group(group)
        assert [type(u.error) for u in group[:2]] == [RuntimeError, RuntimeError]
        assert group[2].error is None and group[2].result == "renamed"
        assert list(ledger.journal()) == []
        assert ledger.get_facility("F1").name == "renamed"   # the rest of the group committed
        assert ledger.get_member("M0").account_balance_fen == 50
        assert verify(ledger) == []
    finally:
        ledger.close()


def test_settle_checks_member_then_key_then_referral_then_facility(backend):
    ledger = backend.open()
    ledger.upsert_facility(facility("F0"))
    ledger.upsert_member(member("M0", balance=100))
    ledger.upsert_member(member("M1", balance=100))

    def refusing(state):
        raise ValueError("evaluation refused")

    def settle(mid, fid, rid, h, evaluate=paying(50, 1000), referral=""):
        return ledger.settle(facility_id=fid, request_id=rid, request_hash=h, member_id=mid,
                             year=YEAR, evaluate=evaluate, referral_from=referral)

    first = settle("M0", "F0", "r1", "h1", evaluate=paying(50, 1000, account=30)).record
    with pytest.raises(NotFound, match="member 'MX'"):        # before the facility
        settle("MX", "FX", "r2", "h2")
    with pytest.raises(Conflict):                             # the key, before evaluating
        settle("M1", "F0", "r1", "other", evaluate=refusing)
    again = settle("M0", "F0", "r1", "h1", evaluate=refusing)   # a replay: not evaluated
    assert (again.created, again.record.settlement_id) == (False, first.settlement_id)
    ledger.reverse(settlement_id=first.settlement_id, facility_id="F0")
    with pytest.raises(ReferralReversed):                     # the referral, then the facility
        settle("M0", "FX", "r3", "h3", referral=first.settlement_id)
    with pytest.raises(NotFound, match="facility 'FX'"):
        settle("M0", "FX", "r4", "h4")
    with pytest.raises(ValueError, match="evaluation refused"):
        settle("M0", "F0", "r5", "h5", evaluate=refusing)
    assert ledger.get_member("M0").account_balance_fen == 100
