"""Properties every settlement keeps, on random members and claim sequences, for both evaluators.

Issue 2, "Invariants (hypothesis)": the totals balance to the fen; no layer pays beyond its
remaining cap or allowance; the patient share is never negative; the personal account pays at
most its balance and the patient share; for a fixed member state, raising a class-A amount
never lowers the fund total; cumulative bases and paid amounts only grow.

Each property runs 300 examples by default (``HYPOTHESIS_PROFILE=nightly`` for more).
"""
from __future__ import annotations

import dataclasses
from datetime import date, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.bill import bill_from_items
from engine.evaluate import settle
from engine.loader import store
from engine.model import GROUPS, Accumulators, Bill, Claim, LineItem, Member
from engine_helpers import FACILITIES, both_impls

# At least 300 examples per property; more under a profile that asks for more (nightly).
EXAMPLES = settings(max_examples=max(300, settings().max_examples), deadline=None)

FIRST_DAY, LAST_DAY = date(2018, 1, 1), date(2019, 12, 31)
POLICY_STORE = store()

# The spec's annual caps and allowances in fen (§3.1–§3.3, §4), written here independently of
# the policy file so the test checks the engine against the spec, not against itself.
INPATIENT_CAP = {"inpatient_tier1": 20_000_000, "inpatient_tier2": 20_000_000,
                 "critical_illness": 24_000_000}
CI_UNCAPPED_GROUPS = {"POVERTY_REGISTERED", "MINIMUM_LIVING", "EXTREME_HARDSHIP"}


def scale_bp(member: Member, day: date) -> int:
    """二(四)4: 50% up to month 12, 70% up to month 24, then 100%."""
    months = (day.year * 12 + day.month) - (member.continuous_since.year * 12
                                             + member.continuous_since.month) + 1
    return 5000 if months <= 12 else 7000 if months <= 24 else 10000


def cap_now(layer: str, member: Member, day: date) -> int | None:
    """The most a layer may have paid in the year by ``day`` (None: no cap)."""
    if layer == "critical_illness" and member.groups & CI_UNCAPPED_GROUPS:
        return None
    if layer in INPATIENT_CAP:
        return INPATIENT_CAP[layer] * scale_bp(member, day) // 10_000
    return {"outpatient_tier1_primary": 18_000,
            "outpatient_tier2_primary": 3_500 * day.month,
            "outpatient_tier2_other": 4_000 * day.month}[layer]


# --- strategies ------------------------------------------------------------------------------

amounts = st.one_of(st.integers(0, 100_000),            # up to 1,000 yuan
                    st.integers(0, 5_000_000),          # up to 50,000 yuan
                    st.integers(0, 80_000_000))         # up to 800,000 yuan: every cap in reach


@st.composite
def members(draw) -> Member:
    identity = draw(st.sampled_from(["EMPLOYEE", "RESIDENT"]))
    allowed = [g for g in GROUPS if identity == "RESIDENT" or g != "FIVE_GUARANTEE"]
    return Member(
        identity=identity,
        continuous_since=draw(st.dates(date(2015, 6, 1), date(2019, 6, 30))),
        retired=identity == "EMPLOYEE" and draw(st.booleans()),
        groups=frozenset(draw(st.sets(st.sampled_from(allowed), max_size=2))),
        maternity_eligible=draw(st.booleans()),
        primary_facility="P1",
        other_facility="O1" if identity == "EMPLOYEE" else None,
    )


@st.composite
def line_items(draw) -> LineItem:
    category = draw(st.sampled_from("AABC"))
    allowed = None if category == "C" else draw(st.none() | amounts)
    ratio = draw(st.integers(0, 10_000)) if category == "B" else 0
    return LineItem(category, draw(amounts), allowed, ratio)


@st.composite
def bills(draw) -> tuple[Bill, tuple[LineItem, ...]]:
    if draw(st.booleans()):
        items = tuple(draw(st.lists(line_items(), min_size=1, max_size=4)))
        return bill_from_items(items), items
    in_scope, full, over, pre = (draw(amounts) for _ in range(4))
    if draw(st.booleans()):
        full = over = pre = 0
    return Bill(in_scope + full + over + pre, full, over, pre), ()


@st.composite
def claims(draw, member: Member, earliest: date) -> tuple[Claim, int | None]:
    """A claim on or after ``earliest``, and (inpatient) an optional referral-chain pick."""
    kind = draw(st.sampled_from(["INPATIENT", "OUTPATIENT"]))
    day = draw(st.dates(earliest, LAST_DAY))
    b, items = draw(bills())
    use_account = draw(st.booleans())
    if kind == "OUTPATIENT":
        facility = draw(st.sampled_from(["P1", "P1", "O1", "O2", "H3"]))
        referred = draw(st.none() | st.integers(-40, 5).map(lambda d: day + timedelta(days=d)))
        return Claim("OUTPATIENT", day, facility, FACILITIES[facility], b, items,
                     referred_by_primary_on=referred, use_account=use_account), None
    facility = draw(st.sampled_from(["H1", "H2", "H3", "X9", "P1"]))
    pick = draw(st.none() | st.integers(0, 20))
    return Claim("INPATIENT", day, facility, FACILITIES[facility], b, items,
                 home_bed_after_transfer=draw(st.booleans()),
                 out_of_area_unfiled=draw(st.booleans()),
                 childbirth=draw(st.booleans()), use_account=use_account), pick


@st.composite
def histories(draw, max_claims: int = 6):
    """A member, an opening balance and claims in date order (all dated after joining)."""
    m = draw(members())
    earliest = max(m.continuous_since, FIRST_DAY)
    out, day = [], earliest
    for _ in range(draw(st.integers(1, max_claims))):
        claim, pick = draw(claims(m, day))
        day = claim.service_date
        out.append((claim, pick))
    return m, draw(st.one_of(st.just(0), amounts)), out


@dataclasses.dataclass
class Record:
    claim: Claim
    before: Accumulators
    balance_before: int
    settlement: object


def settle_history(impl: str, m: Member, balance: int, claims_and_picks) -> list[Record]:
    """Settle in order as the conformance command does: a ledger per year, chains, balance."""
    years: dict[int, Accumulators] = {}
    chain: dict[int, int] = {}          # index of an inpatient claim → deductible along its chain
    records = []
    for i, (claim, pick) in enumerate(claims_and_picks):
        earlier = sorted(chain)
        if pick is not None and earlier:
            claim = dataclasses.replace(claim, referral=True,
                                        chain_deductible_fen=chain[earlier[pick % len(earlier)]])
        year = claim.service_date.year
        before = years.get(year, Accumulators(year))
        policy = POLICY_STORE.policy_for("jiangmen", claim.service_date)
        s = settle(policy, m, claim, before, balance, impl=impl)
        records.append(Record(claim, before, balance, s))
        years[year] = s.accumulators_after
        balance = s.balance_after_fen
        if claim.kind == "INPATIENT":
            chain[i] = s.chain_deductible_after_fen
    return records


# --- properties ------------------------------------------------------------------------------

@both_impls
@EXAMPLES
@given(histories())
def test_fund_total_plus_patient_total_is_the_bill_total_exactly(impl, history):
    for r in settle_history(impl, *history):
        s = r.settlement
        assert s.fund_total_fen + s.patient_total_fen == s.bill.total_fen
        assert sum(s.funds.values()) == s.fund_total_fen
        assert sum(p.amount_fen for p in s.payments) == s.fund_total_fen
        assert s.cash_fen == s.patient_total_fen - s.account_paid_fen


@both_impls
@EXAMPLES
@given(histories())
def test_no_layer_pays_beyond_its_remaining_cap_or_allowance(impl, history):
    m = history[0]
    for r in settle_history(impl, *history):
        s, day = r.settlement, r.claim.service_date
        for p in s.payments:
            cap = cap_now(p.layer, m, day)
            left = None if cap is None else max(0, cap - r.before.paid_of(p.layer))
            assert p.cap_remaining_fen == left, p
            assert 0 <= p.amount_fen
            if left is not None:
                assert p.amount_fen <= left, p
                assert s.accumulators_after.paid_of(p.layer) <= cap


@both_impls
@EXAMPLES
@given(histories())
def test_the_patient_share_is_never_negative_and_funds_pay_only_within_scope(impl, history):
    for r in settle_history(impl, *history):
        s = r.settlement
        assert s.patient_total_fen >= 0
        assert 0 <= s.deductible_fen <= s.in_scope_fen
        assert s.fund_total_fen <= s.in_scope_fen
        # the patient pays at least everything outside the policy scope (spec §2)
        assert s.patient_total_fen >= s.bill.total_fen - s.in_scope_fen


@both_impls
@EXAMPLES
@given(histories())
def test_the_account_pays_at_most_its_balance_and_the_patient_share(impl, history):
    for r in settle_history(impl, *history):
        s = r.settlement
        assert 0 <= s.account_paid_fen <= min(r.balance_before, s.patient_total_fen)
        if r.claim.use_account:
            assert s.account_paid_fen == min(r.balance_before, s.patient_total_fen)
        else:
            assert s.account_paid_fen == 0
        assert s.balance_after_fen == r.balance_before - s.account_paid_fen


@both_impls
@EXAMPLES
@given(histories())
def test_cumulative_bases_and_paid_amounts_only_grow(impl, history):
    for r in settle_history(impl, *history):
        before, after = r.before, r.settlement.accumulators_after
        assert after.year == before.year == r.claim.service_date.year
        for layer in set(before.paid) | set(before.base) | set(after.paid) | set(after.base):
            assert after.paid_of(layer) >= before.paid_of(layer)
            assert after.base_of(layer) >= before.base_of(layer)
        for p in r.settlement.payments:   # what a layer paid is what its accumulator grew by
            assert after.paid_of(p.layer) - before.paid_of(p.layer) == p.amount_fen


def _raise_class_a(claim: Claim, delta: int) -> tuple[Claim, Claim]:
    """The claim, and the same claim with one class-A amount raised by ``delta`` fen."""
    if not claim.items:
        b = claim.bill
        return claim, dataclasses.replace(claim, bill=dataclasses.replace(
            b, total_fen=b.total_fen + delta))
    items = list(claim.items)
    idx = next((i for i, it in enumerate(items) if it.category == "A"), None)
    if idx is None:
        items.append(LineItem("A", 0))
        idx = len(items) - 1
    low = tuple(items)
    items[idx] = dataclasses.replace(items[idx], amount_fen=items[idx].amount_fen + delta)
    high = tuple(items)
    return (dataclasses.replace(claim, items=low, bill=bill_from_items(low)),
            dataclasses.replace(claim, items=high, bill=bill_from_items(high)))


@both_impls
@EXAMPLES
@given(histories(max_claims=5), st.one_of(st.integers(1, 1_000), st.integers(1, 50_000_000)),
       st.integers(0, 200_000))
def test_raising_a_class_a_amount_never_lowers_the_fund_total(impl, history, delta, chain_fen):
    # The history but its last claim builds the member's state; the last claim is then settled
    # twice on that same state: as drawn and with a class-A amount raised by ``delta``.
    m, balance, claims_and_picks = history
    records = settle_history(impl, m, balance, claims_and_picks[:-1])
    target, pick = claims_and_picks[-1]
    if target.kind == "INPATIENT" and pick is not None:
        target = dataclasses.replace(target, referral=True, chain_deductible_fen=chain_fen)
    year = target.service_date.year
    acc = next((r.settlement.accumulators_after for r in reversed(records)
                if r.claim.service_date.year == year), Accumulators(year))
    bal = records[-1].settlement.balance_after_fen if records else balance
    policy = POLICY_STORE.policy_for("jiangmen", target.service_date)
    low, high = _raise_class_a(target, delta)
    s_low = settle(policy, m, low, acc, bal, impl=impl)
    s_high = settle(policy, m, high, acc, bal, impl=impl)
    assert s_high.bill.total_fen == s_low.bill.total_fen + delta
    assert s_high.fund_total_fen >= s_low.fund_total_fen, (s_low.funds, s_high.funds)
