"""One test per rule and adjustment of shared/spec/jiangmen-2018.md, against both evaluators.

Every expected amount is derived by hand in the comment above its assertion, from the spec's
numbers, never copied from the engine's output. Unless a test says otherwise: the member has
contributed since 2010 (25+ continuous months: full caps), the claim is dated 2018-06-01, and the
bill is class A only (total = in scope). "L1".."L3" are hospital levels, "X9" a non-designated
facility, "P1" the member's primary facility, "O1" an employee's other selected facility.
Threshold T of critical illness is 10,000 yuan (policy value dated 2017-01-01).
"""
from __future__ import annotations

from datetime import date

import pytest

from engine.errors import InvalidInput
from engine.scenarios import parse_scenario, run_scenario
from engine_helpers import (  # noqa: F401  (impl is a fixture)
    bill, employee, fen, funds, impl, inpatient, item, one, outpatient, policy_copy, resident,
    run, totals, yuan,
)

T1, T2, CI = "INPATIENT_TIER1", "INPATIENT_TIER2", "CRITICAL_ILLNESS"
OP1, OP2 = "OUTPATIENT_TIER1", "OUTPATIENT_TIER2"


def payment(s, layer_id):
    return next(p for p in s.payments if p.layer == layer_id)


# ============================================================================================
# §1 Who the member is: continuous months and the cap scale (二(四)4)
# ============================================================================================

def test_member_in_the_first_12_months_has_inpatient_caps_at_50_percent(impl):
    # 二(四)4. Since 2018-01-15, claim 2018-12-10: months = (2018×12+12) − (2018×12+1) + 1 = 12
    # → scale 50%. L1, in scope 200,000: tier 1 = 85% × (200,000 − 500) = 169,575
    # → cap 200,000 × 50% = 100,000. Critical illness base = 200,000 − 500 − 100,000 = 99,500;
    # 60% × (99,500 − 10,000) = 53,700 (cap 240,000 × 50% = 120,000 not reached).
    s = one(impl, resident(since=date(2018, 1, 15)),
            inpatient("200000.00", level="LEVEL_1", day=date(2018, 12, 10)))
    assert funds(s) == {T1: "100000.00", CI: "53700.00"}


@pytest.mark.parametrize("since, day", [
    (date(2017, 12, 31), date(2018, 12, 1)),   # (2018×12+12) − (2017×12+12) + 1 = 13
    (date(2017, 1, 1), date(2018, 12, 31)),    # (2018×12+12) − (2017×12+1) + 1 = 24
])
def test_member_in_months_13_to_24_has_inpatient_caps_at_70_percent(impl, since, day):
    # 二(四)4. Months 13 and 24 → 70%: cap1 = 140,000. L1 200,000: tier 1 = min(169,575,
    # 140,000) = 140,000; CI base = 200,000 − 500 − 140,000 = 59,500 → 60% × 49,500 = 29,700.
    s = one(impl, resident(since=since), inpatient("200000.00", level="LEVEL_1", day=day))
    assert funds(s) == {T1: "140000.00", CI: "29700.00"}


def test_member_from_month_25_has_full_inpatient_caps(impl):
    # 二(四)4. Since 2016-12-31, claim 2018-12-01: (2018×12+12) − (2016×12+12) + 1 = 25 → 100%.
    # L1 250,000: tier 1 = 85% × 249,500 = 212,075 → cap 200,000. CI base = 250,000 − 500 −
    # 200,000 = 49,500 → 60% × 39,500 = 23,700.
    s = one(impl, resident(since=date(2016, 12, 31)),
            inpatient("250000.00", level="LEVEL_1", day=date(2018, 12, 1)))
    assert funds(s) == {T1: "200000.00", CI: "23700.00"}


def test_passing_month_12_mid_year_gives_the_larger_cap_less_what_was_already_paid(impl):
    # 二(四)4. Since 2017-07-01.
    # c1 2018-05-10: months (2018×12+5) − (2017×12+7) + 1 = 11 → 50%: cap1 100,000.
    #    L1 200,000: 85% × 199,500 = 169,575 → 100,000.
    # c2 2018-08-10: months 14 → 70%: cap1 140,000, less 100,000 paid = 40,000 left.
    #    L1 100,000: 85% × 99,500 = 84,575 → 40,000.
    c1, c2 = run(impl, resident(since=date(2017, 7, 1)), [
        inpatient("200000.00", level="LEVEL_1", day=date(2018, 5, 10)),
        inpatient("100000.00", level="LEVEL_1", day=date(2018, 8, 10)),
    ])
    assert funds(c1)[T1] == "100000.00"
    assert funds(c2)[T1] == "40000.00"
    assert payment(c2, "inpatient_tier1").cap_remaining_fen == fen("40000.00")


def test_passing_month_24_mid_year_lifts_the_cap_to_full_less_what_was_already_paid(impl):
    # 二(四)4. Since 2016-07-01.
    # c1 2018-06-30: (2018×12+6) − (2016×12+7) + 1 = 24 → 70%: L1 200,000 → 169,575 → 140,000.
    # c2 2018-07-01: month 25 → 100%: 200,000 − 140,000 = 60,000 left; L1 100,000 → 84,575
    #    → 60,000.
    c1, c2 = run(impl, resident(since=date(2016, 7, 1)), [
        inpatient("200000.00", level="LEVEL_1", day=date(2018, 6, 30)),
        inpatient("100000.00", level="LEVEL_1", day=date(2018, 7, 1)),
    ])
    assert funds(c1)[T1] == "140000.00"
    assert funds(c2)[T1] == "60000.00"


def test_outpatient_allowances_are_not_scaled_for_a_new_member(impl):
    # 二(四)4 scales inpatient caps only. Since 2018-06-01, visit P1 2018-06-10 (month 1), 1,000:
    # 70% × 1,000 = 700; tier 1 = min(700, 180) = 180; tier 2 = min(700 − 180, 35 × 6 = 210)
    # = 210 — the full allowances.
    s = one(impl, employee(since=date(2018, 6, 1)), outpatient("1000.00", day=date(2018, 6, 10)))
    assert funds(s) == {OP1: "180.00", OP2: "210.00"}


def test_a_claim_before_the_contribution_run_began_is_refused(impl):
    # 二(四)4 / spec §1: "A service date before continuous since is invalid input."
    with pytest.raises(InvalidInput) as e:
        one(impl, resident(since=date(2018, 7, 1)), inpatient("1000.00", day=date(2018, 6, 30)))
    assert "date" in e.value.field and "2018-07-01" in str(e.value)


# ============================================================================================
# §2 From bill to policy scope
# ============================================================================================

def test_a_class_c_line_is_all_full_selfpay(impl):
    # §2 class C. A 10,000 + C 300: total 10,300, full self-pay 300, in scope 10,000.
    # L3 resident: tier 1 = 55% × (10,000 − 900) = 5,005; CI base 4,095 < T → 0.
    # Patient total = 10,300 − 5,005 = 5,295.
    s = one(impl, resident(), inpatient(items=[item("A", "10000.00"), item("C", "300.00")]))
    assert (yuan(s.bill.total_fen), yuan(s.bill.full_selfpay_fen)) == ("10300.00", "300.00")
    assert totals(s)["in_scope"] == "10000.00"
    assert funds(s) == {T1: "5005.00"}
    assert totals(s)["patient_total"] == "5295.00"


def test_the_part_of_a_line_above_its_price_cap_is_over_limit(impl):
    # §2 price cap. A 800 capped at 500 → over-limit 300; A 600 capped at 1,000 → none.
    # Total 1,400, in scope 1,400 − 300 = 1,100. L3 resident: tier 1 = 55% × (1,100 − 900) = 110.
    s = one(impl, resident(), inpatient(items=[item("A", "800.00", allowed="500.00"),
                                               item("A", "600.00", allowed="1000.00")]))
    assert yuan(s.bill.over_limit_fen) == "300.00"
    assert totals(s)["in_scope"] == "1100.00"
    assert funds(s) == {T1: "110.00"}


def test_class_b_pre_selfpay_is_rounded_half_up_on_each_line(impl):
    # §2 先行自付 per line. Two B lines of 10.05 at ratio 0.10: 1,005 fen × 10% = 100.5 fen
    # → 101 fen each → 2.02 (on the summed 20.10 it would be 2.01). In scope 20.10 − 2.02 = 18.08.
    # Resident at P1: 70% × 1,808 fen = 1,265.6 fen → 12.66.
    s = one(impl, resident(), outpatient(items=[item("B", "10.05", ratio="0.10"),
                                                item("B", "10.05", ratio="0.10")]))
    assert yuan(s.bill.pre_selfpay_fen) == "2.02"
    assert totals(s)["in_scope"] == "18.08"
    assert funds(s) == {OP1: "12.66"}


def test_class_b_pre_selfpay_is_taken_on_the_part_within_the_price_cap(impl):
    # §2: pre_selfpay = round(min(amount, allowed) × ratio). B 1,000 capped at 800, ratio 0.15:
    # over-limit 200, pre-self-pay 15% × 800 = 120 (not 150), in scope 1,000 − 200 − 120 = 680.
    s = one(impl, resident(), outpatient(items=[item("B", "1000.00", allowed="800.00",
                                                     ratio="0.15")]))
    assert (yuan(s.bill.over_limit_fen), yuan(s.bill.pre_selfpay_fen)) == ("200.00", "120.00")
    assert totals(s)["in_scope"] == "680.00"


def test_pre_aggregated_amounts_settle_like_the_same_line_items(impl):
    # §2 and issue item 4. The scenarios.md example: A 30,000; B 5,000 ratio 0.10 (pre 500);
    # A 800 capped 500 (over 300); C 2,000 → total 37,800, in scope 35,000.
    # Retired employee L3: deductible 900 − 100 = 800, rate 55 + 5 = 60%:
    #   tier 1 = 60% × 34,200 = 20,520; tier 2 base = 35,000 − 800 − 20,520 = 13,680:
    #   5,000 × 50% + 8,680 × 85% = 2,500 + 7,378 = 9,878; CI base 13,680 − 9,878 = 3,802 → 0.
    #   Fund total 30,398; patient 37,800 − 30,398 = 7,402.
    who = employee(retired=True)
    by_items = one(impl, who, inpatient(items=[
        item("A", "30000.00"), item("B", "5000.00", ratio="0.10"),
        item("A", "800.00", allowed="500.00"), item("C", "2000.00")]))
    by_sums = one(impl, who, inpatient(bill=bill("37800.00", "2000.00", "300.00", "500.00")))
    for s in (by_items, by_sums):
        assert totals(s)["in_scope"] == "35000.00"
        assert funds(s) == {T1: "20520.00", T2: "9878.00"}
        assert totals(s)["patient_total"] == "7402.00"
    assert by_items.bill == by_sums.bill


# ============================================================================================
# §3.1 Tier 1 (二(四)1(1)): deductible and rate by level, then the adjustments in order
# ============================================================================================

@pytest.mark.parametrize("level, deductible, tier1", [
    # 10,000 in scope, resident (no tier 2; CI base < T in every row, so CI pays 0):
    ("LEVEL_1", "500.00", "8075.00"),          # 85% × (10,000 − 500) = 8,075
    ("LEVEL_2", "600.00", "7520.00"),          # 80% × (10,000 − 600) = 7,520
    ("LEVEL_3", "900.00", "5005.00"),          # 55% × (10,000 − 900) = 5,005
    ("NON_DESIGNATED", "1500.00", "3400.00"),  # 40% × (10,000 − 1,500) = 3,400
])
def test_each_level_has_its_own_tier1_deductible_and_rate(impl, level, deductible, tier1):
    # 二(四)1(1) table: 500/85%, 600/80%, 900/55%, 1500/40%.
    s = one(impl, resident(), inpatient("10000.00", level=level))
    assert totals(s)["deductible"] == deductible
    assert funds(s) == {T1: tier1}


def test_a_bill_below_the_deductible_is_all_deductible(impl):
    # §3.1 deductible = min(in_scope, due): L3 600 < 900 → deductible 600, tier 1 pays 0.
    s = one(impl, resident(), inpatient("600.00"))
    assert totals(s)["deductible"] == "600.00"
    assert funds(s) == {}
    assert totals(s)["patient_total"] == "600.00"


def test_tier1_rounds_half_up_to_the_fen(impl):
    # Spec "Units": L1 500.10: 85% × 0.10 yuan = 8.5 fen → 9 fen.
    s = one(impl, resident(), inpatient("500.10", level="LEVEL_1"))
    assert funds(s) == {T1: "0.09"}


def test_retired_employee_pays_100_yuan_less_deductible_and_gets_5_more_points(impl):
    # §3.1 adjustment 1. L3: deductible 900 − 100 = 800, rate 55 + 5 = 60%:
    # 60% × (10,000 − 800) = 5,520.
    s = one(impl, employee(retired=True), inpatient("10000.00"))
    assert totals(s)["deductible"] == "800.00"
    assert funds(s)[T1] == "5520.00"


def test_a_working_employee_gets_no_retirement_adjustment(impl):
    # §3.1 adjustment 1 needs retirement: L3 employee → 900 and 55% → 5,005.
    s = one(impl, employee(), inpatient("10000.00"))
    assert (totals(s)["deductible"], funds(s)[T1]) == ("900.00", "5005.00")


def test_five_guarantee_resident_has_no_deductible(impl):
    # §3.1 adjustment 2. L3: deductible 0, rate stays 55% (the +10 is LEVEL_1 only):
    # 55% × 10,000 = 5,500.
    s = one(impl, resident(groups=["FIVE_GUARANTEE"]), inpatient("10000.00"))
    assert totals(s)["deductible"] == "0.00"
    assert funds(s)[T1] == "5500.00"


@pytest.mark.parametrize("level, tier1", [
    ("LEVEL_1", "9500.00"),   # 85 + 10 = 95% × 10,000 = 9,500
    ("LEVEL_2", "8000.00"),   # 80% (no +10) × 10,000 = 8,000
])
def test_five_guarantee_resident_gets_10_more_points_at_level_1_only(impl, level, tier1):
    # §3.1 adjustment 2: deductible 0; at LEVEL_1 rate +10 points.
    s = one(impl, resident(groups=["FIVE_GUARANTEE"]), inpatient("10000.00", level=level))
    assert funds(s)[T1] == tier1


def test_home_bed_after_transfer_has_no_deductible(impl):
    # §3.1 adjustment 3. Employee, L1 home bed, 10,000: deductible 0, 85% × 10,000 = 8,500;
    # tier 2 base = 10,000 − 0 − 8,500 = 1,500 → 50% = 750.
    s = one(impl, employee(), inpatient("10000.00", level="LEVEL_1",
                                        home_bed_after_transfer=True))
    assert totals(s)["deductible"] == "0.00"
    assert funds(s) == {T1: "8500.00", T2: "750.00"}


def test_referral_tops_up_to_the_higher_deductible_of_the_chain(impl):
    # §3.1 adjustment 4 (二(四)3, Reading: top up). c1 L2 10,000: deductible 600.
    # c2 L3 referred from c1: due = max(0, 900 − 600) = 300; tier 1 = 55% × 9,700 = 5,335.
    c1, c2 = run(impl, resident(), [inpatient("10000.00", level="LEVEL_2"),
                                    inpatient("10000.00", level="LEVEL_3", referral_from=0)])
    assert totals(c1)["deductible"] == "600.00"
    assert totals(c2)["deductible"] == "300.00"
    assert funds(c2) == {T1: "5335.00"}


def test_referral_to_a_lower_level_owes_no_further_deductible(impl):
    # §3.1 adjustment 4: c1 L3 pays 900; c2 L2 referred: max(0, 600 − 900) = 0;
    # tier 1 = 80% × 10,000 = 8,000.
    _, c2 = run(impl, resident(), [inpatient("10000.00", level="LEVEL_3"),
                                   inpatient("10000.00", level="LEVEL_2", referral_from=0)])
    assert totals(c2)["deductible"] == "0.00"
    assert funds(c2) == {T1: "8000.00"}


def test_the_deductible_is_counted_along_the_whole_referral_chain(impl):
    # §3.1 adjustment 4. c1 L1 pays 500; c2 L2 from c1: 600 − 500 = 100 (chain paid 600);
    # c3 L3 from c2: 900 − 600 = 300.
    # c2 tier 1 = 80% × (10,000 − 100) = 7,920; c3 tier 1 = 55% × (10,000 − 300) = 5,335.
    _, c2, c3 = run(impl, resident(), [
        inpatient("10000.00", level="LEVEL_1"),
        inpatient("10000.00", level="LEVEL_2", referral_from=0),
        inpatient("10000.00", level="LEVEL_3", referral_from=1)])
    assert (totals(c2)["deductible"], funds(c2)[T1]) == ("100.00", "7920.00")
    assert (totals(c3)["deductible"], funds(c3)[T1]) == ("300.00", "5335.00")


def test_a_chain_counts_the_deductible_actually_paid_not_the_one_due(impl):
    # §3.1 adjustment 4: c1 L1 with a bill of 200 pays only 200 of its 500 deductible;
    # c2 L3 from c1: due 900 − 200 = 700; tier 1 = 55% × (10,000 − 700) = 5,115.
    _, c2 = run(impl, resident(), [inpatient("200.00", level="LEVEL_1"),
                                   inpatient("10000.00", level="LEVEL_3", referral_from=0)])
    assert (totals(c2)["deductible"], funds(c2)[T1]) == ("700.00", "5115.00")


def test_an_admission_without_referral_pays_its_full_deductible_again(impl):
    # §3.1: no chain → c2 L3 deductible 900, tier 1 = 55% × 9,100 = 5,005.
    _, c2 = run(impl, resident(), [inpatient("10000.00", level="LEVEL_2"),
                                   inpatient("10000.00", level="LEVEL_3")])
    assert (totals(c2)["deductible"], funds(c2)[T1]) == ("900.00", "5005.00")


def test_out_of_area_unfiled_care_halves_the_tier1_rate(impl):
    # §3.1 adjustment 5. L1: 8500 // 2 = 4250 bp; 42.5% × (10,000 − 500) = 4,037.50.
    # The deductible is not halved.
    s = one(impl, resident(), inpatient("10000.00", level="LEVEL_1", out_of_area_unfiled=True))
    assert totals(s)["deductible"] == "500.00"
    assert funds(s) == {T1: "4037.50"}


def test_halving_is_integer_division_of_the_basis_points(impl, tmp_path):
    # §3.1 adjustment 5 "integer division of the bp value". With a test-only LEVEL_1 rate of
    # 8501 bp: 8501 // 2 = 4250 bp → 42.50% × 9,500 = 4,037.50 (an exact half, 4250.5 bp, would
    # give 950,000 fen × 0.42505 = 403,797.5 fen → 4,037.98). Unhalved: 85.01% × 9,500 = 8,075.95.
    ps = policy_copy(tmp_path, {
        'LEVEL_1: {2018-01-01: {value: 8500, ref: "二(四)1(1) 住院基金支付比例':
        'LEVEL_1: {2018-01-01: {value: 8501, ref: "二(四)1(1) 住院基金支付比例'})
    away = one(impl, resident(), inpatient("10000.00", level="LEVEL_1", out_of_area_unfiled=True),
               policy_store=ps)
    home = one(impl, resident(), inpatient("10000.00", level="LEVEL_1"), policy_store=ps)
    assert funds(away) == {T1: "4037.50"}
    assert funds(home) == {T1: "8075.95"}


def test_adjustments_apply_in_order_with_halving_last(impl):
    # §3.1 order: retired first (+5 points, −100 deductible), halving last.
    # Retired L3 out of area: (5500 + 500) // 2 = 3000 bp; 30% × (10,000 − 800) = 2,760.
    # (Halving first would give 2750 + 500 = 3250 bp → 2,990.)
    s = one(impl, employee(retired=True), inpatient("10000.00", out_of_area_unfiled=True))
    assert funds(s)[T1] == "2760.00"


def test_five_guarantee_out_of_area_at_level_1_halves_after_the_10_points(impl):
    # §3.1 order: (8500 + 1000) // 2 = 4750 bp; deductible 0: 47.5% × 10,000 = 4,750.
    s = one(impl, resident(groups=["FIVE_GUARANTEE"]),
            inpatient("10000.00", level="LEVEL_1", out_of_area_unfiled=True))
    assert funds(s) == {T1: "4750.00"}


def test_tier1_stops_at_the_annual_cap_of_200000_yuan(impl):
    # §3.1 cap1 = 200,000 × 100%. L1 c1 200,000: 85% × 199,500 = 169,575.
    # c2 50,000: 85% × 49,500 = 42,075 → cap left 200,000 − 169,575 = 30,425.
    c1, c2 = run(impl, resident(), [inpatient("200000.00", level="LEVEL_1"),
                                    inpatient("50000.00", level="LEVEL_1")])
    assert funds(c1)[T1] == "169575.00"
    assert funds(c2)[T1] == "30425.00"
    assert payment(c2, "inpatient_tier1").cap_remaining_fen == fen("30425.00")


def test_what_the_tier1_cap_cuts_flows_into_critical_illness(impl):
    # §3.3 "Whatever a cap cut from tier 1 … flows into this base". Same two claims:
    # c1 CI base = 200,000 − 500 − 169,575 = 29,925 → 60% × (29,925 − 10,000) = 11,955.
    # c2 CI base = 50,000 − 500 − 30,425 = 19,075; cumulative 29,925 → 49,000, all above T
    #    and below 120,000 → 60% × 19,075 = 11,445.
    c1, c2 = run(impl, resident(), [inpatient("200000.00", level="LEVEL_1"),
                                    inpatient("50000.00", level="LEVEL_1")])
    assert funds(c1)[CI] == "11955.00"
    assert funds(c2)[CI] == "11445.00"


# --- maternity floor (二(四)1(1)) ---------------------------------------------------------------

def test_childbirth_of_a_maternity_eligible_member_gets_at_least_500_yuan_from_tier1(impl):
    # §3.1 maternity. Resident L3 1,500: deductible 900; 55% × 600 = 330 < 500
    # → floor min(500, 1,500, 200,000) = 500. CI base = max(0, 1,500 − 900 − 500) = 100 → 0.
    # Patient total = 1,500 − 500 = 1,000.
    s = one(impl, resident(maternity=True), inpatient("1500.00", childbirth=True))
    assert funds(s) == {T1: "500.00"}
    assert totals(s)["deductible"] == "900.00"
    assert totals(s)["patient_total"] == "1000.00"


@pytest.mark.parametrize("maternity, childbirth", [(False, True), (True, False)])
def test_the_maternity_floor_needs_both_childbirth_and_eligibility(impl, maternity, childbirth):
    # §3.1 maternity: without both facts tier 1 is plain: 55% × (1,500 − 900) = 330.
    s = one(impl, resident(maternity=maternity), inpatient("1500.00", childbirth=childbirth))
    assert funds(s) == {T1: "330.00"}


def test_the_maternity_floor_never_exceeds_the_policy_scope_bill(impl):
    # §3.1 maternity Reading. A 400 + C 100 at L3: in scope 400, all deductible; tier 1 rate
    # part 0 → floor min(500, 400, cap) = 400. Patient total = 500 − 400 = 100 (the C line).
    s = one(impl, resident(maternity=True),
            inpatient(items=[item("A", "400.00"), item("C", "100.00")], childbirth=True))
    assert funds(s) == {T1: "400.00"}
    assert totals(s)["patient_total"] == "100.00"


def test_the_maternity_floor_never_exceeds_the_cap_remaining(impl):
    # §3.1 maternity: floor = min(500, in_scope, cap1 remaining).
    # c1 L2 250,000: 80% × 249,400 = 199,520 → cap left 480.
    # c2 L1 childbirth 1,000: 85% × (1,000 − 500) = 425 → floor min(500, 1,000, 480) = 480.
    c1, c2 = run(impl, resident(maternity=True), [
        inpatient("250000.00", level="LEVEL_2"),
        inpatient("1000.00", level="LEVEL_1", childbirth=True, day=date(2018, 9, 1))])
    assert funds(c1)[T1] == "199520.00"
    assert funds(c2)[T1] == "480.00"


def test_an_employee_gets_tier2_on_top_of_the_maternity_floor(impl):
    # §3.1 maternity Reading (floor on tier 1 alone). Employee L3 childbirth 1,500: tier 1 500
    # (floor); tier 2 base = 1,500 − 900 − 500 = 100 → 50% = 50; CI base 100 − 50 = 50 → 0.
    # Fund total 550.
    s = one(impl, employee(maternity=True), inpatient("1500.00", childbirth=True))
    assert funds(s) == {T1: "500.00", T2: "50.00"}
    assert totals(s)["fund_total"] == "550.00"


def test_when_the_floor_pays_into_the_deductible_the_next_layers_get_nothing(impl):
    # §3.1 maternity: employee L3 childbirth 1,000: deductible 900, 55% × 100 = 55 → floor 500,
    # which pays 400 of the deductible. Tier 2 base = max(0, 1,000 − 900 − 500) = 0 → tier 2 0,
    # CI 0, and the cumulative bases do not move. Patient total 1,000 − 500 = 500.
    s = one(impl, employee(maternity=True), inpatient("1000.00", childbirth=True))
    assert funds(s) == {T1: "500.00"}
    assert totals(s)["patient_total"] == "500.00"
    acc = s.accumulators_after
    assert (acc.base_of("inpatient_tier2"), acc.base_of("critical_illness")) == (0, 0)


# ============================================================================================
# §3.2 Tier 2 — employees (二(四)2(1)): marginal bands over the year's cumulative base
# ============================================================================================

def test_tier2_pays_50_percent_of_the_cumulative_base_up_to_5000_yuan(impl):
    # §3.2. Employee L3 10,000: tier 1 5,005; base = 10,000 − 900 − 5,005 = 4,095 → 50% =
    # 2,047.50. CI base 4,095 − 2,047.50 = 2,047.50 < T → 0.
    s = one(impl, employee(), inpatient("10000.00"))
    assert funds(s) == {T1: "5005.00", T2: "2047.50"}


def test_a_resident_gets_no_tier2(impl):
    # §3.2 employees only (二(二)1): resident L3 10,000 → tier 1 5,005 and nothing else.
    s = one(impl, resident(), inpatient("10000.00"))
    assert funds(s) == {T1: "5005.00"}


def test_tier2_pays_85_percent_of_the_base_above_5000_yuan_within_one_claim(impl):
    # §3.2. L3 20,000: tier 1 = 55% × 19,100 = 10,505; base = 20,000 − 900 − 10,505 = 8,595:
    # 5,000 × 50% + 3,595 × 85% = 2,500 + 3,055.75 = 5,555.75.
    s = one(impl, employee(), inpatient("20000.00"))
    assert funds(s)[T2] == "5555.75"


def test_tier2_bands_run_over_the_years_cumulative_base(impl):
    # §3.2. Two L3 claims of 10,000, base 4,095 each.
    # c1: 0 → 4,095 at 50% = 2,047.50.
    # c2: 4,095 → 8,190: 905 × 50% + 3,190 × 85% = 452.50 + 2,711.50 = 3,164.
    c1, c2 = run(impl, employee(), [inpatient("10000.00"),
                                    inpatient("10000.00", day=date(2018, 7, 1))])
    assert funds(c1)[T2] == "2047.50"
    assert funds(c2)[T2] == "3164.00"
    assert c2.accumulators_after.base_of("inpatient_tier2") == fen("8190.00")


def test_the_5000_yuan_edge_belongs_to_the_50_percent_band(impl):
    # §3.2 "5000元(含)以内50%". c1 L2 25,600: tier 1 = 80% × 25,000 = 20,000; base = 25,600 −
    # 600 − 20,000 = 5,000 → exactly 50% × 5,000 = 2,500.
    # c2 L2 1,100: tier 1 = 80% × 500 = 400; base 100, all above 5,000 → 85% = 85.
    c1, c2 = run(impl, employee(), [inpatient("25600.00", level="LEVEL_2"),
                                    inpatient("1100.00", level="LEVEL_2")])
    assert funds(c1)[T2] == "2500.00"
    assert funds(c2)[T2] == "85.00"


def test_tier2_rounds_once_over_all_bands_not_per_band(impl):
    # Spec "Units": rounded once per layer. c1 L3 12,011.09: y = 12,011.09 − 900 = 1,111,109 fen;
    # tier 1 = 55% × y = 611,109.95 → 611,110 fen; base = 1,111,109 − 611,110 = 499,999 fen;
    # tier 2 = 50% × 499,999 = 249,999.5 → 250,000 fen = 2,500.00.
    # c2 L3 900.24: y = 24 fen, tier 1 = 13.2 → 13 fen, base 11 fen: 1 fen at 50% (0.5) +
    # 10 fen at 85% (8.5) = 9.0 fen exactly → 0.09 (per-band rounding would give 1 + 9 = 0.10).
    c1, c2 = run(impl, employee(), [inpatient("12011.09"), inpatient("900.24")])
    assert funds(c1)[T2] == "2500.00"
    assert funds(c2) == {T1: "0.13", T2: "0.09"}


def test_tier2_pays_90_percent_of_the_cumulative_base_above_200000_yuan(impl):
    # §3.2. c1 L3 399,900: tier 1 = min(55% × 399,000 = 219,450, 200,000) = 200,000;
    #   base = 399,900 − 900 − 200,000 = 199,000: 5,000 × 50% + 194,000 × 85% = 2,500 +
    #   164,900 = 167,400. CI base 199,000 − 167,400 = 31,600 → 60% × 21,600 = 12,960.
    # c2 L3 2,900: deductible 900; tier 1 cap left 0; base 2,000, cumulative 199,000 → 201,000:
    #   1,000 × 85% + 1,000 × 90% = 850 + 900 = 1,750 (cap2 left 200,000 − 167,400 = 32,600).
    #   CI base 2,000 − 1,750 = 250 → 60% = 150.
    c1, c2 = run(impl, employee(), [inpatient("399900.00"), inpatient("2900.00")])
    assert funds(c1) == {T1: "200000.00", T2: "167400.00", CI: "12960.00"}
    assert funds(c2) == {T2: "1750.00", CI: "150.00"}


def test_tier2_bands_lose_10_points_at_a_non_designated_facility(impl):
    # §3.2. Employee X9 20,000: tier 1 = 40% × (20,000 − 1,500) = 7,400; base = 11,100:
    # 5,000 × 40% + 6,100 × 75% = 2,000 + 4,575 = 6,575. CI base 4,525 < T → 0.
    s = one(impl, employee(), inpatient("20000.00", level="NON_DESIGNATED"))
    assert funds(s) == {T1: "7400.00", T2: "6575.00"}


def test_out_of_area_unfiled_halves_tier2_bands_after_the_10_points(impl):
    # §3.2. Employee X9 out of area 20,000: tier 1 4000 // 2 = 2000 bp → 20% × 18,500 = 3,700;
    # base = 20,000 − 1,500 − 3,700 = 14,800; bands (5000 − 1000) // 2 = 2000 and
    # (8500 − 1000) // 2 = 3750: 5,000 × 20% + 9,800 × 37.5% = 1,000 + 3,675 = 4,675.
    # (Halving before the −10 would give 1500/3250 bp: 750 + 3,185 = 3,935.)
    # CI base = 14,800 − 4,675 = 10,125 → (60 − 10)% × 125 = 62.50 (CI is not halved).
    s = one(impl, employee(), inpatient("20000.00", level="NON_DESIGNATED",
                                        out_of_area_unfiled=True))
    assert funds(s) == {T1: "3700.00", T2: "4675.00", CI: "62.50"}


def test_out_of_area_unfiled_halves_tier2_bands_at_a_designated_facility(impl):
    # §3.2. Employee L3 out of area 20,000: tier 1 2750 bp → 27.5% × 19,100 = 5,252.50;
    # base = 20,000 − 900 − 5,252.50 = 13,847.50; bands 2500 and 4250 bp:
    # 500,000 fen × 2500 + 884,750 fen × 4250 = 1,250,000,000 + 3,760,187,500 = 5,010,187,500
    # → / 10,000 = 501,018.75 fen → 501,019 fen = 5,010.19.
    s = one(impl, employee(), inpatient("20000.00", out_of_area_unfiled=True))
    assert funds(s) == {T1: "5252.50", T2: "5010.19"}


def test_tier2_and_critical_illness_caps_are_scaled_for_a_new_member(impl):
    # §3.2 cap2 scaled, §3.3 cap scaled. Since 2018-01-01, claim 2018-06-01: month 6 → 50%.
    # L3 399,900: tier 1 = min(219,450, 100,000) = 100,000; base = 399,900 − 900 − 100,000 =
    # 299,000: 2,500 + 195,000 × 85% + 99,000 × 90% = 2,500 + 165,750 + 89,100 = 257,350
    # → cap2 200,000 × 50% = 100,000. CI base = 299,000 − 100,000 = 199,000:
    # 110,000 × 60% + 79,000 × 70% = 66,000 + 55,300 = 121,300 → 240,000 × 50% = 120,000.
    s = one(impl, employee(since=date(2018, 1, 1)), inpatient("399900.00"))
    assert funds(s) == {T1: "100000.00", T2: "100000.00", CI: "120000.00"}
    assert totals(s)["fund_total"] == "320000.00"


def test_tier2_cumulative_base_grows_by_the_whole_base_even_when_capped(impl):
    # §3.2. Since 2017-07-01. c1 2018-05-10 (month 11, 50%) L3 399,900: as above tier 2 is
    # capped at 100,000 but the cumulative base grows by the whole 299,000.
    # c2 2018-08-10 (month 14, 70%) L3 2,900: deductible 900; tier 1 left 140,000 − 100,000:
    # 55% × 2,000 = 1,100; base = 2,900 − 900 − 1,100 = 900, cumulative 299,000 → 299,900, all
    # above 200,000 → 90% × 900 = 810 (cap2 left 140,000 − 100,000 = 40,000).
    c1, c2 = run(impl, employee(since=date(2017, 7, 1)), [
        inpatient("399900.00", day=date(2018, 5, 10)),
        inpatient("2900.00", day=date(2018, 8, 10))])
    assert funds(c1)[T2] == "100000.00"
    assert c1.accumulators_after.base_of("inpatient_tier2") == fen("299000.00")
    assert c1.accumulators_after.paid_of("inpatient_tier2") == fen("100000.00")
    assert funds(c2)[T1] == "1100.00"
    assert funds(c2)[T2] == "810.00"


# ============================================================================================
# §3.3 Critical illness (二(四)1(4)): rows, threshold share of T, 120,000 edge, caps
# ============================================================================================

def test_critical_illness_pays_60_percent_of_a_residents_cumulative_base_above_the_threshold(
        impl):
    # §3.3 standard row. Resident L3 40,900: tier 1 = 55% × 40,000 = 22,000; residents' base =
    # 40,900 − 900 − 22,000 = 18,000 → 60% × (18,000 − 10,000) = 4,800.
    s = one(impl, resident(), inpatient("40900.00"))
    assert funds(s) == {T1: "22000.00", CI: "4800.00"}


def test_the_critical_illness_threshold_is_passed_on_the_years_cumulative_base(impl):
    # §3.3. c1 L3 20,900: tier 1 = 55% × 20,000 = 11,000; base 9,000 < 10,000 → 0.
    # c2 the same: cumulative 9,000 → 18,000: 60% × 8,000 = 4,800.
    c1, c2 = run(impl, resident(), [inpatient("20900.00"), inpatient("20900.00")])
    assert CI not in funds(c1)
    assert c1.accumulators_after.base_of("critical_illness") == fen("9000.00")
    assert funds(c2)[CI] == "4800.00"


@pytest.mark.parametrize("groups, ci", [
    # Resident L3 40,900: base 18,000 as above.
    (["POVERTY_REGISTERED"], "10500.00"),  # threshold 30% × 10,000 = 3,000: 70% × 15,000
    (["MINIMUM_LIVING"], "10500.00"),      # same row
    (["EXTREME_HARDSHIP"], "12800.00"),    # threshold 20% × 10,000 = 2,000: 80% × 16,000
])
def test_poverty_and_hardship_rows_lower_the_threshold_to_a_share_of_T_and_raise_rates(
        impl, groups, ci):
    # §3.3 table and the Reading "30% (20%) of T".
    s = one(impl, resident(groups=groups), inpatient("40900.00"))
    assert funds(s)[CI] == ci


@pytest.mark.parametrize("groups, ci", [
    # Resident L3 300,900: tier 1 = 55% × 300,000 = 165,000; base 135,000 (cumulative from 0).
    ([], "76500.00"),                      # (120,000 − 10,000) × 60% + 15,000 × 70% = 66,000 + 10,500
    (["POVERTY_REGISTERED"], "93900.00"),  # (120,000 − 3,000) × 70% + 15,000 × 80% = 81,900 + 12,000
    (["EXTREME_HARDSHIP"], "107900.00"),   # (120,000 − 2,000) × 80% + 15,000 × 90% = 94,400 + 13,500
])
def test_the_120000_yuan_edge_is_measured_on_the_cumulative_base(impl, groups, ci):
    # §3.3 "The 120,000-yuan band edge is measured on the same cumulative base" (not on the
    # amount above the threshold).
    s = one(impl, resident(groups=groups), inpatient("300900.00"))
    assert funds(s)[CI] == ci


def test_standard_critical_illness_stops_at_240000_yuan_a_year(impl):
    # §3.3 cap. Resident L3 600,900: tier 1 = min(330,000, 200,000) = 200,000; base 400,000:
    # 66,000 + 280,000 × 70% = 66,000 + 196,000 = 262,000 → 240,000.
    s = one(impl, resident(), inpatient("600900.00"))
    assert funds(s)[CI] == "240000.00"
    assert payment(s, "critical_illness").cap_remaining_fen == fen("240000.00")


@pytest.mark.parametrize("groups, ci", [
    # New resident (since 2018-01-01, month 6: 50%), L3 600,900: tier 1 = min(330,000, 100,000)
    # = 100,000; base = 600,900 − 900 − 100,000 = 500,000.
    (["POVERTY_REGISTERED"], "385900.00"),  # 117,000 × 70% + 380,000 × 80% = 81,900 + 304,000
    (["EXTREME_HARDSHIP"], "436400.00"),    # 118,000 × 80% + 380,000 × 90% = 94,400 + 342,000
])
def test_poverty_and_hardship_rows_have_no_cap_even_for_a_new_member(impl, groups, ci):
    # §3.3 table: annual cap "none" for these rows (scaled 240,000 would be 120,000).
    s = one(impl, resident(since=date(2018, 1, 1), groups=groups), inpatient("600900.00"))
    assert funds(s)[CI] == ci
    assert payment(s, "critical_illness").cap_remaining_fen is None


@pytest.mark.parametrize("groups, ci", [
    # Resident X9 40,000: tier 1 = 40% × 38,500 = 15,400; base = 40,000 − 1,500 − 15,400 = 23,100.
    ([], "6550.00"),                     # (60 − 10)% × (23,100 − 10,000) = 50% × 13,100
    (["EXTREME_HARDSHIP"], "14770.00"),  # (80 − 10)% × (23,100 − 2,000) = 70% × 21,100
])
def test_critical_illness_rates_lose_10_points_at_a_non_designated_facility(impl, groups, ci):
    # §3.3 "Non-designated facility: every rate −10 points".
    s = one(impl, resident(groups=groups), inpatient("40000.00", level="NON_DESIGNATED"))
    assert funds(s) == {T1: "15400.00", CI: ci}


def test_critical_illness_is_not_halved_for_out_of_area_unfiled_care(impl):
    # §3.1 adjustment 5 Reading: halving covers tier 1 and 2, not critical illness.
    # Resident L3 out of area 40,900: tier 1 = 27.5% × 40,000 = 11,000; base = 40,900 − 900 −
    # 11,000 = 29,000 → 60% (not 30%) × 19,000 = 11,400.
    s = one(impl, resident(), inpatient("40900.00", out_of_area_unfiled=True))
    assert funds(s) == {T1: "11000.00", CI: "11400.00"}


@pytest.mark.parametrize("groups, ci", [
    # Resident L3 40,900, base 18,000: extreme hardship beats poverty → 80% × (18,000 − 2,000).
    (["POVERTY_REGISTERED", "EXTREME_HARDSHIP"], "12800.00"),
    (["EXTREME_HARDSHIP", "MINIMUM_LIVING"], "12800.00"),
])
def test_a_member_in_several_groups_takes_the_most_favourable_row(impl, groups, ci):
    # §3.3 "A member in several groups takes the most favourable row".
    s = one(impl, resident(groups=groups), inpatient("40900.00"))
    assert funds(s)[CI] == ci


def test_five_guarantee_is_not_a_critical_illness_row(impl):
    # §3.3: five-guarantee changes tier 1 only. Resident [FIVE_GUARANTEE, MINIMUM_LIVING] L3
    # 40,900: deductible 0, tier 1 = 55% × 40,900 = 22,495; base = 40,900 − 22,495 = 18,405 →
    # minimum-living row: 70% × (18,405 − 3,000) = 10,783.50.
    s = one(impl, resident(groups=["FIVE_GUARANTEE", "MINIMUM_LIVING"]), inpatient("40900.00"))
    assert funds(s) == {T1: "22495.00", CI: "10783.50"}


def test_an_employees_critical_illness_base_is_what_tier2_left_unpaid(impl):
    # §3.3 base = max(0, in_scope − deductible − tier1) − tier2. Employee L3 300,900: tier 1
    # 165,000; tier 2 base 135,000: 2,500 + 130,000 × 85% = 113,000; CI base = 135,000 −
    # 113,000 = 22,000 → 60% × 12,000 = 7,200.
    s = one(impl, employee(), inpatient("300900.00"))
    assert funds(s) == {T1: "165000.00", T2: "113000.00", CI: "7200.00"}
    assert s.accumulators_after.base_of("critical_illness") == fen("22000.00")


def test_only_selfpay_within_scope_enters_the_critical_illness_base(impl):
    # §3.3 Reading: full self-pay, over-limit and pre-self-pay never enter the base.
    # Resident L3: A 40,900 + C 50,000 + A 3,000 capped at 1,000 (over-limit 2,000):
    # in scope = 40,900 + 1,000 = 41,900; tier 1 = 55% × 41,000 = 22,550; base = 41,900 − 900 −
    # 22,550 = 18,450 → 60% × 8,450 = 5,070 (the 52,000 outside scope adds nothing).
    s = one(impl, resident(), inpatient(items=[item("A", "40900.00"), item("C", "50000.00"),
                                               item("A", "3000.00", allowed="1000.00")]))
    assert totals(s)["in_scope"] == "41900.00"
    assert funds(s) == {T1: "22550.00", CI: "5070.00"}


def test_critical_illness_cumulative_base_grows_even_when_capped(impl):
    # §3.3. c1 resident L3 600,900: CI base 400,000, payment capped at 240,000.
    # c2 L3 10,900: deductible 900, tier 1 cap left 0 → 0; base 10,000; CI cap left 0 → 0;
    # cumulative base 400,000 + 10,000 = 410,000.
    c1, c2 = run(impl, resident(), [inpatient("600900.00"), inpatient("10900.00")])
    assert c1.accumulators_after.base_of("critical_illness") == fen("400000.00")
    assert funds(c2) == {}
    assert c2.accumulators_after.base_of("critical_illness") == fen("410000.00")


# ============================================================================================
# §4 General outpatient pooling (二(四)1(3), 2(3))
# ============================================================================================

def test_a_resident_at_the_selected_primary_facility_gets_70_percent_without_deductible(impl):
    # §4. P1 100: 70% × 100 = 70 (within 180 a year). Patient 30.
    s = one(impl, resident(), outpatient("100.00"))
    assert funds(s) == {OP1: "70.00"}
    assert (totals(s)["deductible"], totals(s)["patient_total"]) == ("0.00", "30.00")


def test_outpatient_pooling_takes_only_the_policy_scope_amount(impl):
    # §4 base is in_scope. P1: A 100 + C 50: 70% × 100 = 70; patient 150 − 70 = 80.
    s = one(impl, resident(), outpatient(items=[item("A", "100.00"), item("C", "50.00")]))
    assert funds(s) == {OP1: "70.00"}
    assert totals(s)["patient_total"] == "80.00"


def test_outpatient_tier1_pays_at_most_180_yuan_a_year(impl):
    # §4 (二(四)1(3)). Three visits of 200: 140, then min(140, 180 − 140 = 40) = 40, then 0.
    c1, c2, c3 = run(impl, resident(), [outpatient("200.00", day=date(2018, 3, 1)),
                                        outpatient("200.00", day=date(2018, 4, 1)),
                                        outpatient("200.00", day=date(2018, 5, 1))])
    assert funds(c1) == {OP1: "140.00"}
    assert funds(c2) == {OP1: "40.00"}
    assert funds(c3) == {}


def test_unused_outpatient_tier1_allowance_does_not_carry_into_the_next_year(impl):
    # §4 "no carry-over into the next year". c1 2018-12-01 100 → 70 (110 unused).
    # c2 2019-01-05 1,000: min(700, 180) = 180, not 180 + 110.
    _, c2 = run(impl, resident(), [outpatient("100.00", day=date(2018, 12, 1)),
                                   outpatient("1000.00", day=date(2019, 1, 5))])
    assert funds(c2) == {OP1: "180.00"}


def test_employee_tier2_pays_the_rest_of_70_percent_within_35_yuan_a_month(impl):
    # §4 (二(四)2(3)). Employee P1 2018-03-10 1,000: 70% = 700; tier 1 = min(700, 180) = 180;
    # tier 2 = min(700 − 180 = 520, 35 × 3 = 105) = 105. Fund total 285.
    s = one(impl, employee(), outpatient("1000.00", day=date(2018, 3, 10)))
    assert funds(s) == {OP1: "180.00", OP2: "105.00"}
    assert totals(s)["fund_total"] == "285.00"


def test_the_monthly_tier2_allowance_carries_over_from_month_to_month(impl):
    # §4 "by month m tier 2 at the primary facility may have paid at most 35 × m".
    # c1 01-20 300: 70% = 210; tier 1 180; tier 2 min(30, 35) = 30.
    # c2 04-15 1,000: tier 1 used up; tier 2 min(700, 35 × 4 − 30 = 110) = 110.
    # c3 04-20 100: 140 − 140 = 0 → nothing.
    # c4 05-01 100: min(70, 35 × 5 − 140 = 35) = 35.
    c1, c2, c3, c4 = run(impl, employee(), [
        outpatient("300.00", day=date(2018, 1, 20)), outpatient("1000.00", day=date(2018, 4, 15)),
        outpatient("100.00", day=date(2018, 4, 20)), outpatient("100.00", day=date(2018, 5, 1))])
    assert funds(c1) == {OP1: "180.00", OP2: "30.00"}
    assert funds(c2) == {OP2: "110.00"}
    assert funds(c3) == {}
    assert funds(c4) == {OP2: "35.00"}


def test_the_monthly_tier2_allowance_does_not_carry_into_the_next_year(impl):
    # §4 "inside the year". c1 2018-12-01 100 → tier 1 70, tier 2 0 (420 of 2018 unused).
    # c2 2019-01-10 1,000: tier 1 180 (new year); tier 2 min(520, 35 × 1) = 35.
    c1, c2 = run(impl, employee(), [outpatient("100.00", day=date(2018, 12, 1)),
                                    outpatient("1000.00", day=date(2019, 1, 10))])
    assert funds(c1) == {OP1: "70.00"}
    assert funds(c2) == {OP1: "180.00", OP2: "35.00"}


def test_the_other_selected_facility_pays_50_percent_without_referral(impl):
    # §4. Employee O1 2018-03-10 100: 50% = 50, within 40 × 3 = 120. No tier-1 outpatient fund.
    s = one(impl, employee(), outpatient("100.00", facility="O1", day=date(2018, 3, 10)))
    assert funds(s) == {OP2: "50.00"}


@pytest.mark.parametrize("referred_on, paid", [
    (date(2018, 3, 31), "60.00"),   # same day → 60% × 100
    (date(2018, 3, 1), "60.00"),    # exactly 30 days before the visit → 60%
    (date(2018, 2, 28), "50.00"),   # 31 days before → 50%
    (date(2018, 4, 1), "50.00"),    # a referral dated after the visit → 50%
])
def test_the_other_facility_pays_60_percent_within_30_days_of_a_primary_referral(
        impl, referred_on, paid):
    # §4 "60% when referred by the primary facility on a date from 30 days before the visit up
    # to the visit day, else 50%". Visit 2018-03-31, 100, allowance 40 × 3 = 120.
    s = one(impl, employee(), outpatient("100.00", facility="O1", day=date(2018, 3, 31),
                                         referred_by_primary_on=referred_on))
    assert funds(s) == {OP2: paid}


def test_the_other_facility_allowance_is_40_yuan_a_month_carried_over(impl):
    # §4. c1 O1 03-10 1,000: min(500, 40 × 3 = 120) = 120. c2 05-10 1,000: min(500, 200 − 120)
    # = 80.
    c1, c2 = run(impl, employee(), [
        outpatient("1000.00", facility="O1", day=date(2018, 3, 10)),
        outpatient("1000.00", facility="O1", day=date(2018, 5, 10))])
    assert funds(c1) == {OP2: "120.00"}
    assert funds(c2) == {OP2: "80.00"}


def test_primary_and_other_facility_allowances_are_separate(impl):
    # §4: 35/month at the primary, 40/month at the other facility, each its own allowance.
    # c1 O1 01-10 1,000: min(500, 40) = 40. c2 P1 01-20 1,000: tier 1 180; tier 2 min(520, 35)
    # = 35 (not cut by the 40 paid at O1).
    c1, c2 = run(impl, employee(), [
        outpatient("1000.00", facility="O1", day=date(2018, 1, 10)),
        outpatient("1000.00", facility="P1", day=date(2018, 1, 20))])
    assert funds(c1) == {OP2: "40.00"}
    assert funds(c2) == {OP1: "180.00", OP2: "35.00"}


@pytest.mark.parametrize("who", ["resident", "employee"])
@pytest.mark.parametrize("facility", ["O2", "H3"])
def test_a_visit_to_a_facility_not_selected_is_paid_by_the_patient(impl, who, facility):
    # §4 "Any other facility: no outpatient pooling". 100 → funds none, patient 100.
    m = resident() if who == "resident" else employee()
    s = one(impl, m, outpatient("100.00", facility=facility))
    assert funds(s) == {}
    assert totals(s)["patient_total"] == "100.00"


def test_a_resident_has_no_outpatient_tier2(impl):
    # §4 tier 2 is for employees. Resident P1 1,000: tier 1 min(700, 180) = 180; nothing else.
    s = one(impl, resident(), outpatient("1000.00"))
    assert funds(s) == {OP1: "180.00"}


# ============================================================================================
# §5 Totals of a settlement; a new year
# ============================================================================================

MIXED = [item("A", "10000.00"), item("C", "500.00"), item("A", "800.00", allowed="500.00")]
# Resident L3: total 11,300, in scope 10,500; tier 1 = 55% × (10,500 − 900) = 5,280; CI base
# 10,500 − 900 − 5,280 = 4,320 < T → 0. Patient total 11,300 − 5,280 = 6,020.


def test_patient_total_is_the_bill_total_less_the_fund_total(impl):
    # §5.
    s = one(impl, resident(), inpatient(items=MIXED))
    assert totals(s) == {"in_scope": "10500.00", "deductible": "900.00", "fund_total": "5280.00",
                         "patient_total": "6020.00", "account_paid": "0.00", "cash": "6020.00"}


@pytest.mark.parametrize("balance, account, cash, left", [
    ("1000.00", "1000.00", "5020.00", "0.00"),      # min(1,000, 6,020) = 1,000; cash 5,020
    ("10000.00", "6020.00", "0.00", "3980.00"),     # min(10,000, 6,020) = 6,020; 3,980 left
])
def test_the_personal_account_pays_the_patient_share_up_to_its_balance(
        impl, balance, account, cash, left):
    # §5 account_paid = min(balance, patient_total); cash = patient_total − account_paid.
    s = one(impl, resident(), inpatient(items=MIXED, use_account=True), balance=balance)
    assert (totals(s)["account_paid"], totals(s)["cash"]) == (account, cash)
    assert yuan(s.balance_after_fen) == left


def test_the_personal_account_is_untouched_unless_the_claim_asks(impl):
    # §5 "when the claim asks": balance 10,000, use_account false → account 0, cash 6,020.
    s = one(impl, resident(), inpatient(items=MIXED), balance="10000.00")
    assert (totals(s)["account_paid"], totals(s)["cash"]) == ("0.00", "6020.00")
    assert yuan(s.balance_after_fen) == "10000.00"


def test_the_account_balance_carries_from_claim_to_claim(impl):
    # §5. Balance 8,000: c1 pays 6,020 from it (1,980 left); c2 (same bill, later, new deductible
    # 900 again and same tier 1 5,280) pays 1,980 from it and 6,020 − 1,980 = 4,040 in cash.
    c1, c2 = run(impl, resident(), [inpatient(items=MIXED, use_account=True),
                                    inpatient(items=MIXED, use_account=True,
                                              day=date(2018, 7, 1))], balance="8000.00")
    assert (totals(c1)["account_paid"], yuan(c1.balance_after_fen)) == ("6020.00", "1980.00")
    assert (totals(c2)["account_paid"], totals(c2)["cash"]) == ("1980.00", "4040.00")


def test_a_new_year_starts_with_fresh_caps_and_cumulative_bases(impl):
    # Spec "Units": the policy year is the calendar year of the service date.
    # Resident L1: c1 2018-12-31 250,000 → tier 1 capped at 200,000; c2 2019-01-01 10,000 →
    # 85% × 9,500 = 8,075 from a fresh cap (CI base 1,425, fresh cumulative, < T → 0).
    _, c2 = run(impl, resident(), [
        inpatient("250000.00", level="LEVEL_1", day=date(2018, 12, 31)),
        inpatient("10000.00", level="LEVEL_1", day=date(2019, 1, 1))])
    assert funds(c2) == {T1: "8075.00"}
    # Employee L3 10,000 twice across the year end: tier 2 base 4,095 each time; the second is
    # again at 50% from a fresh cumulative base: 2,047.50 (not 3,164 as within one year).
    e1, e2 = run(impl, employee(), [inpatient("10000.00", day=date(2018, 12, 31)),
                                    inpatient("10000.00", day=date(2019, 1, 2))])
    assert funds(e1)[T2] == funds(e2)[T2] == "2047.50"
    assert e2.accumulators_after.year == 2019


def test_the_conformance_command_keeps_one_ledger_per_year(impl):
    # Same as above through engine.scenarios (the shell): c2 in 2019 gets 8,075 from a fresh cap.
    sc = parse_scenario({
        "id": "new-year", "region": "jiangmen",
        "member": {"identity": "RESIDENT", "continuous_since": "2010-01-01"},
        "facilities": {"H1": {"level": "LEVEL_1"}},
        "claims": [
            {"id": "c1", "kind": "INPATIENT", "date": "2018-12-31", "facility": "H1",
             "total": "250000.00"},
            {"id": "c2", "kind": "INPATIENT", "date": "2019-01-01", "facility": "H1",
             "total": "10000.00"}]})
    lines = run_scenario(sc, impl)
    assert lines[0]["funds"]["INPATIENT_TIER1"] == "200000.00"
    assert lines[1]["funds"] == {"INPATIENT_TIER1": "8075.00"}
