"""Adding a payer of an existing kind is a policy edit only (issue 2 item 3).

tests/fixtures/policies/with_assistance/jiangmen/2018-01-01.yaml is the bundled Jiangmen file
plus one layer after critical illness: medical assistance (fund MEDICAL_ASSISTANCE, kind
deductible_rate, INPATIENT, when [MINIMUM_LIVING]) paying 70% at every level of what the earlier
layers left unpaid of the policy-scope bill, no deductible, up to 10,000 yuan a year. No Python
changes: both evaluators read the layer list.

Members below have contributed since 2010 (full caps); claims are class A at a level-3
hospital. For a minimum-living member critical illness uses the row threshold 30% × 10,000 =
3,000 and 70% up to a cumulative 120,000.
"""
from __future__ import annotations

from datetime import date

import pytest

from engine.loader import BUNDLED, PolicyStore, load_policy_file
from engine_helpers import (  # noqa: F401  (impl is a fixture)
    FIXTURES, employee, fen, funds, impl, inpatient, outpatient, resident, run, totals,
)

ROOT = FIXTURES / "with_assistance"
T1, T2, CI, MA = "INPATIENT_TIER1", "INPATIENT_TIER2", "CRITICAL_ILLNESS", "MEDICAL_ASSISTANCE"


@pytest.fixture(scope="module")
def assisted() -> PolicyStore:
    return PolicyStore(ROOT)


def test_the_fixture_is_the_bundled_policy_plus_one_layer():
    bundled = load_policy_file(BUNDLED / "jiangmen" / "2018-01-01.yaml").template
    with_ma = load_policy_file(ROOT / "jiangmen" / "2018-01-01.yaml").template
    ids = [layer.id for layer in with_ma.layers]
    assert ids.index("medical_assistance") == ids.index("critical_illness") + 1
    assert tuple(x for x in with_ma.layers if x.id != "medical_assistance") == bundled.layers
    assert (with_ma.continuity_cap_scale, with_ma.referral_window_days) == (
        bundled.continuity_cap_scale, bundled.referral_window_days)


def test_a_minimum_living_member_gets_70_percent_of_what_critical_illness_left(impl, assisted):
    # Resident [MINIMUM_LIVING] L3 40,900: deductible 900; tier 1 = 55% × 40,000 = 22,000;
    # CI base = 40,900 − 900 − 22,000 = 18,000 → 70% × (18,000 − 3,000) = 10,500;
    # left = 40,900 − 900 − 22,000 − 10,500 = 7,500 → assistance 70% × 7,500 = 5,250.
    # Fund total 22,000 + 10,500 + 5,250 = 37,750; patient 40,900 − 37,750 = 3,150.
    [s] = run(impl, resident(groups=["MINIMUM_LIVING"]), [inpatient("40900.00")],
              policy_store=assisted)
    assert funds(s) == {T1: "22000.00", CI: "10500.00", MA: "5250.00"}
    assert totals(s)["deductible"] == "900.00"           # the layer adds no deductible
    assert totals(s)["patient_total"] == "3150.00"


def test_assistance_for_an_employee_comes_after_tier2_and_critical_illness(impl, assisted):
    # Employee [MINIMUM_LIVING] L3 40,900: tier 1 22,000; tier 2 base 18,000: 5,000 × 50% +
    # 13,000 × 85% = 2,500 + 11,050 = 13,550; CI base 18,000 − 13,550 = 4,450 → 70% × (4,450 −
    # 3,000) = 1,015; left = 40,900 − 900 − 22,000 − 13,550 − 1,015 = 3,435 → 70% = 2,404.50.
    [s] = run(impl, employee(groups=["MINIMUM_LIVING"]), [inpatient("40900.00")],
              policy_store=assisted)
    assert funds(s) == {T1: "22000.00", T2: "13550.00", CI: "1015.00", MA: "2404.50"}


def test_assistance_stops_at_10000_yuan_a_year_across_claims(impl, assisted):
    # c1 as above: 5,250.
    # c2 L3 100,900: tier 1 = 55% × 100,000 = 55,000; CI base = 100,900 − 900 − 55,000 = 45,000,
    #    cumulative 18,000 → 63,000 (above 3,000, below 120,000): 70% × 45,000 = 31,500;
    #    left = 45,000 − 31,500 = 13,500 → 70% = 9,450 → cap left 10,000 − 5,250 = 4,750.
    # c3 L3 10,900: tier 1 5,500; CI base 4,500 → 3,150; left 1,350 → 945 → cap left 0 → 0.
    # c4 2019-01-10 L3 40,900: a new year, a fresh 10,000: 5,250 again (as c1, fresh bases).
    c1, c2, c3, c4 = run(impl, resident(groups=["MINIMUM_LIVING"]), [
        inpatient("40900.00", day=date(2018, 3, 1)),
        inpatient("100900.00", day=date(2018, 5, 1)),
        inpatient("10900.00", day=date(2018, 9, 1)),
        inpatient("40900.00", day=date(2019, 1, 10))], policy_store=assisted)
    assert funds(c1)[MA] == "5250.00"
    assert funds(c2) == {T1: "55000.00", CI: "31500.00", MA: "4750.00"}
    assert funds(c3) == {T1: "5500.00", CI: "3150.00"}
    assert c3.accumulators_after.paid_of("medical_assistance") == fen("10000.00")
    assert funds(c4)[MA] == "5250.00"


@pytest.mark.parametrize("groups, expected", [
    # Resident L3 40,900, CI base 18,000 (see above); no assistance without MINIMUM_LIVING.
    ([], {T1: "22000.00", CI: "4800.00"}),                          # 60% × (18,000 − 10,000)
    (["POVERTY_REGISTERED"], {T1: "22000.00", CI: "10500.00"}),     # 70% × (18,000 − 3,000)
    (["EXTREME_HARDSHIP"], {T1: "22000.00", CI: "12800.00"}),       # 80% × (18,000 − 2,000)
])
def test_members_outside_the_group_get_nothing_from_assistance(impl, assisted, groups,
                                                               expected):
    [s] = run(impl, resident(groups=groups), [inpatient("40900.00")], policy_store=assisted)
    assert funds(s) == expected


def test_assistance_does_not_touch_outpatient_claims(impl, assisted):
    # The layer is INPATIENT only: resident [MINIMUM_LIVING] at P1, 100 → 70% = 70, tier 1 only.
    [s] = run(impl, resident(groups=["MINIMUM_LIVING"]), [outpatient("100.00")],
              policy_store=assisted)
    assert funds(s) == {"OUTPATIENT_TIER1": "70.00"}


def test_assistance_pays_nothing_when_the_bill_is_all_deductible(impl, assisted):
    # L3 800 < 900: all deductible, nothing left for any layer (the deductible is the patient's).
    [s] = run(impl, resident(groups=["MINIMUM_LIVING"]), [inpatient("800.00")],
              policy_store=assisted)
    assert funds(s) == {}


def test_the_bundled_policy_has_no_assistance_layer(impl):
    # The same claim under the bundled policy: tier 1 and CI only (22,000 and 10,500).
    [s] = run(impl, resident(groups=["MINIMUM_LIVING"]), [inpatient("40900.00")])
    assert funds(s) == {T1: "22000.00", CI: "10500.00"}
