"""The ledger contract (server/ledger/base.py), every test against SQLite and PostgreSQL."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone

import pytest

from engine.model import Accumulators
from ledger_fixtures import *  # noqa: F401,F403  (fixtures: backend, pg_database)
from ledger_fixtures import YEAR, dump, facility, member, money, paying
from server.ledger.base import Conflict, Forbidden, NotFound, Outcome, ReferralReversed
from server.ledger.schema import VERSION
from server.ledger.verify import main as verify_main, verify


def settle(ledger, rid: str, evaluate, *, fid: str = "F1", mid: str = "M1", year: int = YEAR,
           h: str | None = None):
    return ledger.settle(facility_id=fid, request_id=rid, request_hash=h or f"hash-{rid}",
                         member_id=mid, year=year, evaluate=evaluate)


@pytest.fixture
def ledger(backend):
    lg = backend.open()
    lg.upsert_facility(facility("F1"))
    lg.upsert_facility(facility("F2", level="LEVEL_3"))
    lg.upsert_member(member("M1", balance=10_000))
    return lg


# --- registries -------------------------------------------------------------------------------
def test_member_and_facility_round_trip(backend):
    lg = backend.open()
    full = member("M9", balance=123, identity="RESIDENT", retired=True,
                  groups=frozenset({"MINIMUM_LIVING", "FIVE_GUARANTEE"}), maternity_eligible=True,
                  primary_facility="F1", other_facility="F2", benefit_start=date(2024, 1, 1),
                  benefit_end=date(2024, 12, 31), district="蓬江区", region="jiangmen")
    lg.upsert_member(full)
    assert lg.get_member("M9") == full
    changed = replace(full, retired=False, groups=frozenset(), benefit_end=None,
                      account_balance_fen=0)
    lg.upsert_member(changed)
    assert lg.get_member("M9") == changed
    f = facility("F1", designated=False, district="新会区", name="某医院")
    lg.upsert_facility(f)
    assert lg.get_facility("F1") == f
    lg.upsert_facility(replace(f, level="LEVEL_1"))
    assert lg.get_facility("F1").level == "LEVEL_1"
    with pytest.raises(NotFound):
        lg.get_member("nobody")
    with pytest.raises(NotFound):
        lg.get_facility("nowhere")
    assert lg.accumulators("nobody", YEAR) == Accumulators(YEAR)
    assert verify(lg) == []


# --- settle -----------------------------------------------------------------------------------
def test_bulk_reads_answer_as_the_single_reads_also_after_a_commit(backend, ledger):
    lg = ledger.reads()
    assert lg.members_of(["M1", "nobody", "M1"]) == [ledger.get_member("M1"), None,
                                                     ledger.get_member("M1")]
    assert lg.accumulators_of([("M1", YEAR)]) == [Accumulators(YEAR)]
    settle(ledger, "r1", paying(70, cap=1000, account=30))
    again = ledger.reads()          # a later call's reads see the commit
    want = ledger.accumulators("M1", YEAR)
    assert want.paid and again.accumulators_of([("M1", YEAR), ("M1", YEAR + 1)]) == \
        [want, Accumulators(YEAR + 1)]
    assert again.members_of(["M1"])[0].account_balance_fen == 10_000 - 30


def test_settle_writes_journal_accumulators_and_balance(backend, ledger):
    res = settle(ledger, "r1", paying(700, 1000, account=300))
    rec = res.record
    assert res.created and rec.status == "SETTLED" and rec.reversed_at is None
    assert (rec.facility_id, rec.request_id, rec.request_hash, rec.member_id, rec.year) == \
        ("F1", "r1", "hash-r1", "M1", YEAR)
    assert rec.deltas == {"T1": (700, 700)}
    assert (rec.account_paid_fen, rec.chain_deductible_after_fen, rec.policy_version,
            rec.result, rec.fund_total_fen) == (300, 700, "test-1", b"pay=700", 700)
    assert len(rec.settlement_id) == 32 and rec.created_at is not None
    assert ledger.get_settlement(rec.settlement_id) == rec
    assert list(ledger.journal("M1")) == [rec] == list(ledger.journal())
    assert list(ledger.journal("M2")) == []
    assert ledger.accumulators("M1", YEAR) == Accumulators(YEAR, {"T1": 700}, {"T1": 700})
    assert ledger.accumulators("M1", YEAR + 1) == Accumulators(YEAR + 1)
    assert ledger.get_member("M1").account_balance_fen == 9_700

    calls = []
    res2 = settle(ledger, "r2", paying(700, 1000, account=300, calls=calls))
    assert calls[0].accumulators == Accumulators(YEAR, {"T1": 700}, {"T1": 700})
    assert calls[0].balance_fen == 9_700
    assert calls[0].member == replace(ledger.get_member("M1"), account_balance_fen=9_700)
    assert res2.record.deltas == {"T1": (300, 700)}            # the cap binds
    assert ledger.accumulators("M1", YEAR) == Accumulators(YEAR, {"T1": 1000}, {"T1": 1400})
    assert ledger.get_member("M1").account_balance_fen == 9_400
    assert [r.request_id for r in ledger.journal("M1")] == ["r1", "r2"]
    with pytest.raises(NotFound):
        ledger.get_settlement("0" * 32)
    assert verify(ledger) == []


def test_replay_returns_the_identical_record_and_changes_nothing(backend, ledger):
    first = settle(ledger, "r1", paying(500, 1000, account=100))
    before = dump(backend)
    calls = []
    again = settle(ledger, "r1", paying(500, 1000, account=100, calls=calls))
    assert again.created is False and again.record == first.record
    assert calls == []                                         # not even evaluated
    assert dump(backend) == before
    # the key is per facility: another facility may use the same request id
    other = settle(ledger, "r1", paying(500, 1000), fid="F2")
    assert other.created and other.record.settlement_id != first.record.settlement_id
    # a replay of a reversed settlement returns it as it is now
    rev = ledger.reverse(settlement_id=first.record.settlement_id, facility_id="F1")
    replay = settle(ledger, "r1", paying(500, 1000, account=100))
    assert replay.created is False and replay.record == rev and rev.status == "REVERSED"


def test_same_request_id_with_another_body_is_a_conflict(backend, ledger):
    first = settle(ledger, "r1", paying(500, 1000))
    before = dump(backend)
    with pytest.raises(Conflict, match=first.record.settlement_id):
        settle(ledger, "r1", paying(500, 1000), h="another body")
    with pytest.raises(Conflict):   # also when it names another member
        ledger.upsert_member(member("M2"))
        before = dump(backend)
        settle(ledger, "r1", paying(500, 1000), mid="M2", h="another body")
    assert dump(backend) == before


def test_evaluate_raising_or_an_invalid_outcome_writes_nothing(backend, ledger):
    settle(ledger, "r0", paying(100, 1000, account=50))
    before = dump(backend)

    def boom(state):
        raise RuntimeError("evaluation failed")
    with pytest.raises(RuntimeError, match="evaluation failed"):
        settle(ledger, "r1", boom)
    bad = [Outcome({"T1": (-1, 0)}, 0, 0, "v", b""),              # negative delta
           Outcome({"T1": (1.5, 0)}, 0, 0, "v", b""),             # not an int
           Outcome({"T1": (1, 1)}, 10_001, 0, "v", b""),          # overdraws the account
           Outcome({"T1": (1, 1)}, -5, 0, "v", b""),              # negative account payment
           Outcome({"T1": (True, 0)}, 0, 0, "v", b""),            # a bool is not an amount
           Outcome({"T1": (1, 1)}, 0, 0.5, "v", b"")]             # chain deductible not an int
    for i, out in enumerate(bad):
        with pytest.raises(ValueError):
            settle(ledger, f"bad{i}", lambda state, out=out: out)
    assert dump(backend) == before
    # the key was not consumed: the same request settles once the evaluation succeeds
    assert settle(ledger, "r1", paying(100, 1000)).created


def test_sqlite_stores_deltas_as_the_json_encoder_writes_them(tmp_path):
    """SQLite formats the journal's deltas itself (one encoder call per settlement was a
    tenth of a batch's commit): the same text as ``enc_json`` of the same mapping."""
    from server.ledger.sqlbase import SqlLedger
    from server.ledger.sqlite import SqliteLedger
    ledger = SqliteLedger(str(tmp_path / "l.db"))
    try:
        for deltas in ({}, {"inpatient_tier1": (1, 2)},
                       {"a": (0, 123_456_789_012_345), 'q"uote\\': (5, 0), "层级": (7, 7)}):
            deltas = dict(sorted(deltas.items()))
            assert ledger.enc_deltas(deltas) == SqlLedger.enc_deltas(ledger, deltas)
    finally:
        ledger.close()


def test_sqlite_writes_a_batchs_timestamps_as_enc_ts_does(tmp_path):
    """A batch's journal times, 1 µs apart, as enc_ts writes each: within one second, across
    the next second, a minute, a day and a year, and none."""
    from server.ledger.sqlbase import SqlLedger
    from server.ledger.sqlite import SqliteLedger
    ledger = SqliteLedger(str(tmp_path / "l.db"))
    try:
        for start, n in ((datetime(2026, 12, 3, 14, 46, 5, 123_456, timezone.utc), 1000),
                         (datetime(2026, 12, 3, 14, 46, 5, 999_000, timezone.utc), 2000),
                         (datetime(2026, 12, 31, 23, 59, 59, 999_998, timezone.utc), 3),
                         (datetime(2026, 1, 1, 0, 0, 0, 0, timezone.utc), 0)):
            got = ledger.enc_times(start, n)
            assert got == [ledger.enc_ts(start + timedelta(microseconds=k))
                           for k in range(1, n + 1)]
            assert got == SqlLedger.enc_times(ledger, start, n)
        assert ledger.enc_times(datetime(2026, 12, 31, 23, 59, 59, 999_999, timezone.utc),
                                1) == ["2027-01-01T00:00:00.000000+00:00"]
    finally:
        ledger.close()


def test_settle_unknown_member_or_facility(backend, ledger):
    before = dump(backend)
    with pytest.raises(NotFound, match="member"):
        settle(ledger, "r1", paying(1, 1), mid="nobody")
    with pytest.raises(NotFound, match="facility"):
        settle(ledger, "r1", paying(1, 1), fid="nowhere")
    assert dump(backend) == before


def test_zero_deltas_are_not_stored(backend, ledger):
    out = Outcome({"T1": (0, 0), "T2": (0, 5)}, 0, 0, "v", b"x")
    rec = settle(ledger, "r1", lambda s: out).record
    assert rec.deltas == {"T2": (0, 5)}
    assert ledger.accumulators("M1", YEAR) == Accumulators(YEAR, {"T2": 0}, {"T2": 5})


# --- reverse ----------------------------------------------------------------------------------
def test_reverse_restores_accumulators_and_balance_exactly(backend, ledger):
    ledger.upsert_member(member("M2", balance=50))
    settle(ledger, "a", paying(300, 1000, account=100))
    settle(ledger, "m2", paying(300, 1000, account=50), mid="M2")
    before = money(backend)
    acc_before = ledger.accumulators("M1", YEAR)
    rec = settle(ledger, "b", paying(900, 1000, account=400)).record
    two_layers = settle(ledger, "c", lambda s: Outcome({"T1": (0, 10), "CI": (5, 10)}, 0, 0,
                                                      "v", b"")).record
    assert money(backend) != before

    r1 = ledger.reverse(settlement_id=two_layers.settlement_id, facility_id="F1")
    r2 = ledger.reverse(settlement_id=rec.settlement_id, facility_id="F1")
    assert (r2.status, r2.settlement_id, r2.deltas) == ("REVERSED", rec.settlement_id, rec.deltas)
    assert r2.reversed_at is not None and r2.created_at == rec.created_at
    assert money(backend) == before                     # rows and balances, exactly
    assert ledger.accumulators("M1", YEAR) == acc_before
    assert ledger.get_member("M1").account_balance_fen == 9_900
    assert ledger.get_settlement(rec.settlement_id) == r2

    after = dump(backend)
    assert ledger.reverse(settlement_id=rec.settlement_id, facility_id="F1") == r2  # idempotent
    assert ledger.reverse(settlement_id=two_layers.settlement_id, facility_id="F1") == r1
    assert dump(backend) == after
    with pytest.raises(Forbidden):
        ledger.reverse(settlement_id=rec.settlement_id, facility_id="F2")
    with pytest.raises(NotFound):
        ledger.reverse(settlement_id="0" * 32, facility_id="F1")
    assert dump(backend) == after
    # the freed cap is usable again
    assert settle(ledger, "d", paying(900, 1000)).record.deltas == {"T1": (700, 900)}
    assert verify(ledger) == []


def test_a_referral_whose_source_is_reversed_before_it_commits_is_refused_and_commits_nothing(
        backend, ledger):
    # The service checks the referring settlement when it reads the request; a reversal may
    # come between that read and the commit. The ledger checks again under the member's lock.
    src = settle(ledger, "src", paying(300, 1000)).record
    ledger.reverse(settlement_id=src.settlement_id, facility_id="F1")
    before = dump(backend)
    calls: list = []
    with pytest.raises(ReferralReversed) as e:
        ledger.settle(facility_id="F1", request_id="ref", request_hash="h", member_id="M1",
                      year=YEAR, evaluate=paying(100, 1000, calls=calls),
                      referral_from=src.settlement_id)
    assert e.value.settlement_id == src.settlement_id
    assert calls == [] and dump(backend) == before
    # a referral from a settlement that stands settles
    standing = settle(ledger, "src2", paying(300, 1000)).record
    got = ledger.settle(facility_id="F1", request_id="ref", request_hash="h", member_id="M1",
                        year=YEAR, evaluate=paying(100, 1000),
                        referral_from=standing.settlement_id)
    assert got.created and ledger.accumulators("M1", YEAR).paid == {"T1": 400}
    assert verify(ledger) == []


def test_reverse_of_the_only_settlement_leaves_the_tables_as_before(backend, ledger):
    before = money(backend)
    rec = settle(ledger, "r1", paying(10, 100, account=10)).record
    ledger.reverse(settlement_id=rec.settlement_id, facility_id="F1")
    assert money(backend) == before
    assert ledger.accumulators("M1", YEAR) == Accumulators(YEAR)


def test_upsert_sets_the_balance_and_settlements_move_it(backend, ledger):
    rec = settle(ledger, "r1", paying(10, 100, account=1_000)).record
    ledger.upsert_member(member("M1", balance=5_000))        # the bureau's new balance
    assert ledger.get_member("M1").account_balance_fen == 5_000
    ledger.upsert_member(member("M1", balance=5_000, district="x"))   # unchanged: no movement
    ledger.reverse(settlement_id=rec.settlement_id, facility_id="F1")
    assert ledger.get_member("M1").account_balance_fen == 6_000
    kinds = [k for (k,) in backend.raw("SELECT kind FROM account_movements "
                                       "WHERE member_id = 'M1' ORDER BY seq")]
    assert kinds == ["SET", "SETTLE", "SET", "REVERSE"]
    assert verify(ledger) == []


def test_an_upsert_that_keeps_the_balance_leaves_a_settlements_payment_standing(backend,
                                                                               ledger):
    """A registry feed that does not own balances (keep_balance): the settlement's account
    payment stands whatever balance the record it sends carries; a new member gets its."""
    settle(ledger, "r1", paying(10, 100, account=1_000))     # M1's 10,000 -> 9,000
    stored = ledger.upsert_member(member("M1", balance=10_000, district="x"), keep_balance=True)
    assert (stored.account_balance_fen, stored.district) == (9_000, "x")
    assert ledger.get_member("M1") == stored
    new = ledger.upsert_member(member("M7", balance=300), keep_balance=True)
    assert new.account_balance_fen == ledger.get_member("M7").account_balance_fen == 300
    kinds = [k for (k,) in backend.raw("SELECT kind FROM account_movements "
                                       "WHERE member_id = 'M1' ORDER BY seq")]
    assert kinds == ["SET", "SETTLE"]
    assert verify(ledger) == []


# --- restart ----------------------------------------------------------------------------------
def test_restart_keeps_everything_and_a_later_reversal_restores_the_state(backend, ledger):
    settle(ledger, "r0", paying(200, 1000, account=100))
    before = money(backend)
    rec = settle(ledger, "r1", paying(500, 1000, account=300)).record
    acc, m, journal = ledger.accumulators("M1", YEAR), ledger.get_member("M1"), \
        list(ledger.journal())
    ledger.close()

    reopened = backend.open()
    assert reopened.schema_version() == VERSION
    assert reopened.accumulators("M1", YEAR) == acc
    assert reopened.get_member("M1") == m
    assert reopened.get_facility("F2") == facility("F2", level="LEVEL_3")
    assert list(reopened.journal()) == journal
    assert reopened.get_settlement(rec.settlement_id) == rec
    again = settle(reopened, "r1", paying(500, 1000, account=300))
    assert again.created is False and again.record == rec
    reopened.reverse(settlement_id=rec.settlement_id, facility_id="F1")
    assert money(backend) == before
    assert verify(reopened) == []


def test_schema_version_newer_than_the_code_is_refused(backend):
    backend.open().close()
    backend.raw("UPDATE schema_version SET version = ? WHERE id = 1", (VERSION + 1,))
    with pytest.raises(RuntimeError, match="newer"):
        backend.open()


# --- verify -----------------------------------------------------------------------------------
def _mixed_workload(ledger):
    for i in range(2, 6):
        ledger.upsert_member(member(f"M{i}", balance=1_000 * i))
    recs = []
    for i in range(24):
        mid = f"M{1 + i % 5}"
        layer = ("T1", "T2", "CI")[i % 3]
        recs.append(settle(ledger, f"w{i}", paying(100 + i, 1_500, layer=layer, account=37),
                           mid=mid, fid=("F1", "F2")[i % 2], year=YEAR - i % 2).record)
    for r in recs[::3]:
        ledger.reverse(settlement_id=r.settlement_id, facility_id=r.facility_id)
    ledger.upsert_member(member("M3", balance=77))
    return recs


def test_verify_is_clean_after_a_mixed_workload_and_finds_tampering(backend, ledger):
    recs = _mixed_workload(ledger)
    assert verify(ledger) == []
    assert verify_main(["--database", backend.url]) == 0

    live = next(r for r in recs if r not in recs[::3] and r.member_id == "M2")
    (layer,) = live.deltas
    key = (live.member_id, live.year, layer)
    backend.raw("UPDATE accumulators SET paid_fen = paid_fen + 1 WHERE member_id = ? AND "
                "year = ? AND layer_id = ?", key)
    diffs = verify(ledger)
    assert len(diffs) == 1 and diffs[0].startswith(f"accumulators M2/{live.year}/{layer}: ")
    assert verify_main(["--database", backend.url]) == 1
    backend.raw("UPDATE accumulators SET paid_fen = paid_fen - 1 WHERE member_id = ? AND "
                "year = ? AND layer_id = ?", key)
    assert verify(ledger) == []

    b4 = ledger.get_member("M4").account_balance_fen
    backend.raw("UPDATE members SET account_balance_fen = account_balance_fen + 5 "
                "WHERE member_id = 'M4'")
    assert verify(ledger) == [f"account M4: balance {b4 + 5}, movements give {b4}"]
    backend.raw("UPDATE members SET account_balance_fen = account_balance_fen - 5 "
                "WHERE member_id = 'M4'")

    backend.raw("UPDATE settlements SET status = 'SETTLED', reversed_at = NULL "
                "WHERE settlement_id = ?", (recs[0].settlement_id,))   # un-reverse in place
    diffs = verify(ledger)
    assert any(d.startswith("accumulators M1/") for d in diffs)
    assert any(f"settlement {recs[0].settlement_id}: SETTLED but has 1 REVERSE" in d
               for d in diffs)

    backend.raw("DELETE FROM accumulators")
    assert len(verify(ledger)) > 5


def test_verify_command(backend, ledger, tmp_path):
    settle(ledger, "r1", paying(100, 1000, account=10))
    run = lambda db: subprocess.run([sys.executable, "-m", "server.ledger.verify",  # noqa: E731
                                     "--database", db], capture_output=True, text=True)
    ok = run(backend.url)
    assert ok.returncode == 0, ok.stderr
    assert "clean" in ok.stdout and "1 settlements" in ok.stdout
    backend.raw("UPDATE members SET account_seq = account_seq + 1")
    bad = run(backend.url)
    assert bad.returncode == 1 and "account M1: account_seq 3" in bad.stdout
    assert "1 difference" in bad.stdout
    missing = run(str(tmp_path / "nothing-here.db"))
    assert missing.returncode == 2 and "no ledger database" in missing.stderr


def test_sqlite_file_is_durable_wal(tmp_path):
    from server.ledger.base import open_ledger
    lg = open_ledger(f"sqlite:///{tmp_path}/sub/dir/ledger.db")   # makes the directory
    try:
        c = sqlite3.connect(tmp_path / "sub/dir/ledger.db")
        assert c.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        c.close()
        with lg._connection() as conn:
            assert conn.execute("PRAGMA synchronous").fetchone() == (2,)      # FULL
            assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
        assert lg.schema_version() == VERSION
    finally:
        lg.close()
    with pytest.raises(RuntimeError, match="closed"):
        lg.get_member("M1")
