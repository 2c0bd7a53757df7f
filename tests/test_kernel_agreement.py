"""The Cython kernel agrees with the reference evaluator to the fen.

Golden scenarios through the kernel; random member/claim sequences settled by both, compared as
whole Settlements (the kernel's has no trace); settle_batch against claim-by-claim settle_one.
The nightly run (``pytest -m slow``) takes ten times the examples.
"""
from __future__ import annotations

import dataclasses
import json
import random
from array import array
from datetime import date, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine import kernel, reference
from engine.claims import MAX_FEN
from engine.errors import InvalidInput
from engine.loader import store
from engine.model import GROUPS, LEVELS, Accumulators, Bill, Claim, Member
from engine.policy import (
    FACTS, LAYER_KINDS, Adjustment, Band, Floor, Layer, Param, Policy, Row, ScaleStep,
)
from engine.scenarios import parse_scenario, run_scenario
from engine import _kernel as _k

HERE = Path(__file__).parent
GOLDEN = sorted((HERE / "golden").glob("*.json")) or sorted(
    (HERE.parent.parent / "shared" / "golden").glob("*.json"))
REGION = "jiangmen"


def policy_on(day: date):
    return store().policy_for(REGION, day)


# --- golden -------------------------------------------------------------------------------

def test_golden_scenarios_are_found():
    assert GOLDEN, "no golden scenarios in tests/golden or ../shared/golden"


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_golden_scenario_settles_as_expected_in_the_kernel(path):
    sc = parse_scenario(json.loads(path.read_text(encoding="utf-8")))
    assert run_scenario(sc, impl="kernel") == list(sc.expected)


# --- random sequences: kernel == reference ----------------------------------------------------

# Facility ids a member can select, and fixed-level ones; the selected ones get a drawn level.
FIXED = {"F1": "LEVEL_1", "F2": "LEVEL_2", "F3": "LEVEL_3", "FX": "NON_DESIGNATED"}

amounts = st.one_of(st.integers(0, 2_000), st.integers(0, 2_000_000),
                    st.integers(0, 60_000_000), st.integers(0, 1_000_000_000))


@st.composite
def bills(draw, small: bool = False) -> Bill:
    # outpatient bills are mostly small, or the monthly allowances would bind every time
    total = draw(st.one_of(st.integers(0, 20_000), amounts) if small else amounts)
    if draw(st.integers(0, 3)) == 0:
        return Bill(total)
    full = draw(st.integers(0, total))
    over = draw(st.integers(0, total - full))
    pre = draw(st.integers(0, total - full - over))
    return Bill(total, full, over, pre)


@st.composite
def sequences(draw):
    """(member, opening balance, [(claim, referral_from index or None)]) over 1–8 claims."""
    identity = draw(st.sampled_from(("EMPLOYEE", "RESIDENT")))
    allowed = GROUPS if identity == "RESIDENT" else tuple(g for g in GROUPS
                                                           if g != "FIVE_GUARANTEE")
    start = draw(st.dates(date(2018, 1, 1), date(2021, 12, 31)))
    months = draw(st.integers(1, 40))               # continuous months at the first claim
    m0 = start.year * 12 + start.month - 1 - (months - 1)
    since_day = draw(st.integers(1, 28)) if months > 1 else draw(st.integers(1, start.day))
    member = Member(
        identity=identity,
        continuous_since=date(m0 // 12, m0 % 12 + 1, since_day),
        retired=identity == "EMPLOYEE" and draw(st.booleans()),
        groups=draw(st.frozensets(st.sampled_from(allowed))),
        maternity_eligible=draw(st.booleans()),
        primary_facility=draw(st.sampled_from(("P", "P", None))),
        other_facility=draw(st.sampled_from(("O", "O", None))) if identity == "EMPLOYEE" else None,
    )
    levels = dict(FIXED, P=draw(st.sampled_from(LEVELS)), O=draw(st.sampled_from(LEVELS)))
    day = start
    claims = []
    for i in range(draw(st.integers(1, 8))):
        if i:
            day += timedelta(days=draw(st.one_of(st.just(0), st.integers(0, 45),
                                                 st.integers(0, 400))))
        kind = draw(st.sampled_from(("INPATIENT", "OUTPATIENT")))
        fid = draw(st.sampled_from(("P", "O", *sorted(levels))))   # selected ones twice
        flags: dict = {}
        ref_from = None
        if kind == "INPATIENT":
            flags = dict(home_bed_after_transfer=draw(st.booleans()),
                         out_of_area_unfiled=draw(st.booleans()),
                         childbirth=draw(st.booleans()))
            earlier = [j for j, (c, _) in enumerate(claims) if c.kind == "INPATIENT"]
            how = draw(st.sampled_from(("none", "none", "chain", "amount")))
            if how == "chain" and earlier:
                ref_from = draw(st.sampled_from(earlier))
                flags["referral"] = True
            elif how == "amount":
                flags.update(referral=True, chain_deductible_fen=draw(
                    st.one_of(st.integers(0, 200_000), st.integers(0, 10**9))))
        elif draw(st.booleans()):
            offset = draw(st.one_of(st.sampled_from((-31, -30, 0, 1)), st.integers(-40, 5)))
            flags["referred_by_primary_on"] = day + timedelta(days=offset)   # window edges
        claims.append((Claim(kind=kind, service_date=day, facility_id=fid,
                             facility_level=levels[fid], bill=draw(bills(kind == "OUTPATIENT")),
                             use_account=draw(st.booleans()), **flags), ref_from))
    return member, draw(st.one_of(st.just(0), st.integers(0, 10**7))), claims


def run(settle, member, balance, claims, policy=None):
    """Settle a sequence as engine.scenarios.run_scenario does: ledger per year, chains."""
    years: dict[int, Accumulators] = {}
    chain: dict[int, int] = {}
    out = []
    for i, (claim, ref_from) in enumerate(claims):
        if ref_from is not None:
            claim = dataclasses.replace(claim, chain_deductible_fen=chain[ref_from])
        year = claim.service_date.year
        s = settle(policy or policy_on(claim.service_date), member, claim,
                   years.get(year, Accumulators(year)), balance)
        years[year] = s.accumulators_after
        balance = s.balance_after_fen
        chain[i] = s.chain_deductible_after_fen
        out.append(s)
    return out


def assert_agree(seq):
    member, balance, claims = seq
    want = run(reference.settle, member, balance, claims)
    got = run(kernel.settle, member, balance, claims)
    for w, g in zip(want, got):
        assert g.trace == ()
        assert dataclasses.replace(w, trace=()) == g


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequences())
def test_kernel_agrees_with_reference_on_random_claim_sequences(seq):
    assert_agree(seq)


@pytest.mark.slow
def test_kernel_agrees_with_reference_on_20000_random_claim_sequences(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("nightly: run with -m slow")
    settings(max_examples=20_000, deadline=None,
             suppress_health_check=[HealthCheck.too_slow])(given(sequences())(assert_agree))()


# --- random policies: every parameter shape the loader accepts, not only Jiangmen's ----------

def param(value):
    return Param(value, "test", date(2018, 1, 1))


rates = st.integers(0, 10_000)
money = st.one_of(st.integers(0, 200_000), st.integers(0, 50_000_000))
fact_sets = st.frozensets(st.sampled_from(FACTS), max_size=2)


@st.composite
def adjustments(draw) -> Adjustment:
    effects = draw(st.fixed_dictionaries({}, optional={
        "deductible_fen": money.map(param),
        "deductible_delta_fen": st.integers(-200_000, 200_000).map(param),
        "rate_bp": rates.map(param),
        "rate_delta_bp": st.integers(-10_000, 10_000).map(param),
        "rate_divisor": st.integers(1, 4).map(param)}))
    return Adjustment(draw(fact_sets), "test", **effects)


@st.composite
def band_params(draw):
    edges = sorted(draw(st.lists(st.integers(1, 50_000_000), max_size=3, unique=True)))
    return param(tuple(Band(edge, draw(rates)) for edge in [0, *edges]))


@st.composite
def layer_of(draw, i: int) -> Layer:
    kind = draw(st.sampled_from(LAYER_KINDS))
    kw = dict(id=f"layer{i}", fund=draw(st.sampled_from(("FUND_A", "FUND_B", "FUND_C"))),
              kind=kind, claim_kind=draw(st.sampled_from(("INPATIENT", "OUTPATIENT"))),
              when=draw(fact_sets), ref="test",
              adjustments=tuple(draw(st.lists(adjustments(), max_size=3))))
    if kind == "deductible_rate":
        kw.update(
            deductible_fen=draw(st.one_of(st.none(), st.just({}), st.fixed_dictionaries(
                {lvl: money.map(param) for lvl in LEVELS}))),
            rate_bp=draw(st.fixed_dictionaries({lvl: rates.map(param) for lvl in LEVELS})),
            annual_cap_fen=draw(st.one_of(st.none(), money.map(param))),
            cap_scaled_by_continuity=draw(st.booleans()),
            referral_chain_ref=draw(st.sampled_from((None, "test"))),
            childbirth_floor=draw(st.one_of(st.none(), st.builds(
                Floor, fact_sets, money.map(param)))))
    elif kind == "marginal_bands":
        rows = draw(st.lists(st.builds(
            Row, st.frozensets(st.sampled_from(GROUPS), max_size=2), st.just("test"),
            band_params(), st.one_of(st.none(), rates.map(param)),
            st.one_of(st.none(), money.map(param)), st.booleans()), min_size=1, max_size=3))
        if draw(st.integers(0, 9)):   # mostly a catch-all last row, as policy files have
            rows[-1] = dataclasses.replace(rows[-1], groups=frozenset())
        kw.update(rows=tuple(rows), threshold_fen=draw(st.one_of(st.none(),
                                                                money.map(param))))
    else:
        allowance = draw(money.map(param))
        kw.update(rate_bp=draw(rates.map(param)),
                  **{draw(st.sampled_from(("yearly_allowance_fen", "monthly_allowance_fen"))):
                     allowance})
    return Layer(**kw)


@st.composite
def policies(draw) -> Policy:
    upto = sorted(draw(st.lists(st.integers(1, 40), max_size=3, unique=True)))
    scale = tuple(ScaleStep(u, draw(rates)) for u in [*upto, None])
    n = draw(st.integers(1, 6))
    return Policy("test", date(2018, 1, 1), "test/2018-01-01#random", param(scale),
                  param(draw(st.integers(0, 60))),
                  tuple(draw(layer_of(i)) for i in range(n)))


def outcome(settle, policy, seq):
    member, balance, claims = seq
    done: list = []
    try:
        done.extend(run(settle, member, balance, claims, policy))
    except Exception as e:  # both must refuse the same claim the same way
        return done, type(e)
    return done, None


def assert_agree_under(policy, seq):
    want, want_error = outcome(reference.settle, policy, seq)
    got, got_error = outcome(kernel.settle, policy, seq)
    assert [dataclasses.replace(w, trace=()) for w in want] == got
    assert want_error is got_error


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(), sequences())
def test_kernel_agrees_with_reference_under_random_policies(policy, seq):
    assert_agree_under(policy, seq)


@pytest.mark.slow
def test_kernel_agrees_with_reference_under_3000_random_policies(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("nightly: run with -m slow")
    settings(max_examples=3_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])(
        given(policies(), sequences())(assert_agree_under))()


def test_kernel_refuses_what_the_reference_refuses():
    member = Member("RESIDENT", date(2018, 6, 1))
    claim = Claim("INPATIENT", date(2018, 5, 31), "F1", "LEVEL_1", Bill(100_000))
    policy = policy_on(claim.service_date)
    for settle in (reference.settle, kernel.settle):
        with pytest.raises(InvalidInput):
            settle(policy, member, claim, Accumulators(2018))
        with pytest.raises(ValueError):
            settle(policy, member, dataclasses.replace(claim, service_date=date(2018, 7, 1)),
                   Accumulators(2017))


def test_kernel_refuses_amounts_beyond_max_fen_that_the_boundary_refuses():
    # engine.claims.MAX_FEN keeps amount x rate inside int64; the reference, in Python ints,
    # would go on, but no such bill passes the boundary
    member = Member("RESIDENT", date(2010, 1, 1))
    claim = Claim("INPATIENT", date(2018, 5, 3), "F1", "LEVEL_1", Bill(MAX_FEN + 1))
    with pytest.raises(OverflowError):
        kernel.settle(policy_on(claim.service_date), member, claim, Accumulators(2018))


def test_accumulators_of_other_layers_are_carried_over_unchanged():
    member = Member("EMPLOYEE", date(2010, 1, 1))
    claim = Claim("INPATIENT", date(2018, 5, 3), "F3", "LEVEL_3", Bill(3_000_000))
    acc = Accumulators(2018, {"inpatient_tier1": 5, "elsewhere": 7}, {"elsewhere": 9,
                                                                      "critical_illness": 11})
    policy = policy_on(claim.service_date)
    want = reference.settle(policy, member, claim, acc, 0)
    assert dataclasses.replace(want, trace=()) == kernel.settle(policy, member, claim, acc, 0)


# --- settle_batch == settle_one claim by claim -------------------------------------------------

def random_batch(rng: random.Random, n_members: int, n_claims: int):
    """Claims of many members interleaved in date order: rows, (member, year) slots, accounts."""
    members = []
    for m in range(n_members):
        identity = rng.choice(("EMPLOYEE", "RESIDENT"))
        allowed = [g for g in GROUPS if identity == "RESIDENT" or g != "FIVE_GUARANTEE"]
        members.append(Member(
            identity, date(2017, rng.randint(1, 12), 1) - timedelta(days=rng.choice((0, 400))),
            retired=identity == "EMPLOYEE" and rng.random() < 0.3,
            groups=frozenset(g for g in allowed if rng.random() < 0.15),
            maternity_eligible=rng.random() < 0.3, primary_facility="P",
            other_facility="O" if identity == "EMPLOYEE" else None))
    days = sorted(date(2018, 1, 1) + timedelta(days=rng.randrange(3 * 365))
                  for _ in range(n_claims))
    items = []
    for day in days:
        m = rng.randrange(n_members)
        kind = rng.choice(("INPATIENT", "OUTPATIENT"))
        fid, level = rng.choice((("P", "LEVEL_1"), ("O", "LEVEL_2"), ("F3", "LEVEL_3"),
                                 ("FX", "NON_DESIGNATED")))
        total = rng.choice((rng.randrange(3_000), rng.randrange(2_000_000),
                            rng.randrange(1_000_000_000)))
        full = rng.randrange(total // 4 + 1)
        extra = {}
        if kind == "INPATIENT":
            extra = dict(home_bed_after_transfer=rng.random() < 0.1,
                         out_of_area_unfiled=rng.random() < 0.1, childbirth=rng.random() < 0.1)
            if rng.random() < 0.2:
                extra.update(referral=True, chain_deductible_fen=rng.randrange(150_000))
        elif rng.random() < 0.5:
            extra["referred_by_primary_on"] = day - timedelta(days=rng.randrange(-3, 40))
        items.append((m, Claim(kind, day, fid, level, Bill(total, full),
                               use_account=rng.random() < 0.5, **extra)))
    return members, items


@pytest.mark.parametrize("seed", range(4))
def test_settle_batch_equals_settle_one_claim_by_claim_and_the_reference(seed):
    rng = random.Random(seed)
    members, items = random_batch(rng, n_members=40, n_claims=300)
    policy = policy_on(date(2018, 1, 1))
    cp = kernel.compile_policy(policy)
    slot_of: dict[tuple[int, int], int] = {}
    slots = array("q", (slot_of.setdefault((m, c.service_date.year), len(slot_of))
                        for m, c in items))
    accounts = array("q", (m for m, _ in items))
    opening = [rng.randrange(500_000) for _ in members]
    claims = kernel.pack_claims(kernel.claim_row(members[m], c) for m, c in items)

    state, balances, out = cp.new_state(len(slot_of)), array("q", opening), cp.new_out(len(items))
    assert kernel.settle_batch(cp, claims, slots, state, balances, out, accounts) == 0

    # the same claims one by one through settle_one, each with its slot's state
    one_state = [cp.new_state() for _ in slot_of]
    one_balance = list(opening)
    w = cp.out_size
    for i, (m, c) in enumerate(items):
        row = array("q", kernel.claim_row(members[m], c, one_balance[m]))
        o = cp.new_out()
        assert _k.settle_one(cp.kernel, row, one_state[slots[i]], o) == _k.ST_OK
        assert o == out[i * w:(i + 1) * w]
        one_balance[m] = o[_k.O_BALANCE_AFTER]
    assert list(balances) == one_balance
    assert list(state) == [v for s in one_state for v in s]

    # and the reference, field by field
    years: dict[tuple[int, int], Accumulators] = {}
    ref_balance = list(opening)
    for i, (m, c) in enumerate(items):
        key = (m, c.service_date.year)
        s = reference.settle(policy, members[m], c, years.get(key, Accumulators(key[1])),
                             ref_balance[m])
        years[key], ref_balance[m] = s.accumulators_after, s.balance_after_fen
        o = out[i * w:(i + 1) * w]
        assert (o[_k.O_IN_SCOPE], o[_k.O_DEDUCTIBLE], o[_k.O_FUND_TOTAL], o[_k.O_PATIENT_TOTAL],
                o[_k.O_ACCOUNT_PAID], o[_k.O_CASH], o[_k.O_BALANCE_AFTER],
                o[_k.O_CHAIN_AFTER]) == (
            s.in_scope_fen, s.deductible_fen, s.fund_total_fen, s.patient_total_fen,
            s.account_paid_fen, s.cash_fen, s.balance_after_fen, s.chain_deductible_after_fen)
        paid = {p.layer: p.amount_fen for p in s.payments}
        assert {cp.layer_ids[j]: o[_k.O_LAYERS + 2 * j]
                for j in cp.applied_layers(o[_k.O_APPLIED])} == paid
    for (m, year), slot in slot_of.items():
        acc = years[(m, year)]
        assert state[slot * cp.state_size:(slot + 1) * cp.state_size] == cp.state_of(acc)


def test_settle_batch_refuses_a_bad_slot_and_changes_nothing():
    policy = policy_on(date(2018, 1, 1))
    cp = kernel.compile_policy(policy)
    member = Member("EMPLOYEE", date(2010, 1, 1))
    claim = Claim("INPATIENT", date(2018, 3, 1), "F1", "LEVEL_1", Bill(1_000_000))
    claims = kernel.pack_claims([kernel.claim_row(member, claim)] * 2)
    state, balances, out = cp.new_state(1), array("q", [0]), cp.new_out(2)
    assert kernel.settle_batch(cp, claims, array("q", [5, 0]), state, balances, out) == 1
    assert out[_k.O_STATUS] == _k.ST_BAD_SLOT and out[cp.out_size + _k.O_STATUS] == _k.ST_OK
    want = reference.settle(policy, member, claim, Accumulators(2018))
    assert cp.state_of(want.accumulators_after) == state
