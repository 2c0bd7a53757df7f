"""Bad input is refused with one exception type naming the field and the problem (issue 2 item 8).

Every case starts from a valid scenario (``VALID``), breaks one thing, and expects
``engine.errors.InvalidInput`` whose ``.field`` is the path of what is wrong and whose message
says what is wrong. Never a number.
"""
from __future__ import annotations

import copy

import pytest

from engine.claims import check_amount, check_bill, check_member, MAX_FEN
from engine.errors import InvalidInput, NoPolicyInForce
from engine.model import Bill
from engine.scenarios import parse_scenario, run_scenario
from engine_helpers import impl  # noqa: F401  (impl is a fixture)

VALID = {
    "id": "bad-input", "region": "jiangmen",
    "member": {"identity": "EMPLOYEE", "continuous_since": "2015-01-01",
               "primary_facility": "P1", "other_facility": "O1", "account_balance": "100.00"},
    "facilities": {"P1": {"level": "LEVEL_1"}, "O1": {"level": "LEVEL_2"},
                   "H3": {"level": "LEVEL_3"}},
    "claims": [
        {"id": "c1", "kind": "INPATIENT", "date": "2018-03-05", "facility": "H3",
         "items": [{"category": "A", "amount": "1000.00"},
                   {"category": "B", "amount": "500.00", "selfpay_ratio": "0.10"},
                   {"category": "A", "amount": "300.00", "allowed_amount": "200.00"}]},
        {"id": "c2", "kind": "OUTPATIENT", "date": "2018-04-01", "facility": "P1",
         "total": "100.00"},
    ],
}


def broken(path: str, value=None, *, delete: bool = False) -> dict:
    """VALID with the value at a dotted path (``claims.0.items.1.amount``) set or deleted."""
    raw = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    elif delete:
        del node[last]
    else:
        node[last] = value
    return raw


def with_claim(claim: dict) -> dict:
    raw = copy.deepcopy(VALID)
    raw["claims"].append(claim)
    return raw


CASES = [
    # (what, scenario, field, words the problem must contain)
    ("negative line amount", broken("claims.0.items.0.amount", "-5.00"),
     "claims[0].items[0].amount", ["negative"]),
    ("negative pre-aggregated total", broken("claims.1.total", "-1.00"),
     "claims[1].total", ["negative"]),
    ("negative full self-pay", broken("claims.1.full_selfpay", "-0.01"),
     "claims[1].full_selfpay", ["negative"]),
    ("negative account balance", broken("member.account_balance", "-1.00"),
     "member.account_balance", ["negative"]),
    ("three decimals", broken("claims.0.items.0.amount", "10.001"),
     "claims[0].items[0].amount", ["at most 2 decimals"]),
    ("three decimals in a price cap", broken("claims.0.items.2.allowed_amount", "200.005"),
     "claims[0].items[2].allowed_amount", ["at most 2 decimals"]),
    ("an amount as a JSON number", broken("claims.0.items.0.amount", 10.5),
     "claims[0].items[0].amount", ["decimal string"]),
    ("an amount that is not a number", broken("claims.1.total", "ten"),
     "claims[1].total", ["at most 2 decimals"]),
    ("an amount beyond the largest accepted", broken("claims.1.total", "10000000001.00"),
     "claims[1].total", ["must not exceed"]),
    ("self-pay ratio above 1", broken("claims.0.items.1.selfpay_ratio", "1.5"),
     "claims[0].items[1].selfpay_ratio", ["within [0, 1]"]),
    ("self-pay ratio just above 1", broken("claims.0.items.1.selfpay_ratio", "1.0001"),
     "claims[0].items[1].selfpay_ratio", ["within [0, 1]"]),
    ("negative self-pay ratio", broken("claims.0.items.1.selfpay_ratio", "-0.1"),
     "claims[0].items[1].selfpay_ratio", ["within [0, 1]"]),
    ("self-pay ratio with 5 decimals", broken("claims.0.items.1.selfpay_ratio", "0.12345"),
     "claims[0].items[1].selfpay_ratio", ["at most 4 decimals"]),
    ("unknown category", broken("claims.0.items.0.category", "D"),
     "claims[0].items[0].category", ["unknown category", "'D'"]),
    ("unknown facility level", broken("facilities.H3.level", "LEVEL_4"),
     "facilities.H3.level", ["unknown level", "'LEVEL_4'"]),
    ("unknown claim kind", broken("claims.0.kind", "EMERGENCY"),
     "claims[0].kind", ["unknown claim kind", "'EMERGENCY'"]),
    ("unknown identity", broken("member.identity", "STUDENT"),
     "member.identity", ["unknown identity", "'STUDENT'"]),
    ("unknown group", broken("member.groups", ["VETERAN"]),
     "member.groups", ["unknown group", "'VETERAN'"]),
    ("unknown facility", broken("claims.0.facility", "Z1"),
     "claims[0].facility", ["unknown facility", "'Z1'"]),
    ("referral to an unknown claim", broken("claims.0.referral_from", "c9"),
     "claims[0].referral_from", ["'c9'", "not an earlier inpatient claim"]),
    ("referral to itself", broken("claims.0.referral_from", "c1"),
     "claims[0].referral_from", ["'c1'", "not an earlier inpatient claim"]),
    ("referral to an outpatient claim",
     with_claim({"id": "c3", "kind": "INPATIENT", "date": "2018-05-01", "facility": "H3",
                 "total": "100.00", "referral_from": "c2"}),
     "claims[2].referral_from", ["'c2'", "not an earlier inpatient claim"]),
    ("employee in FIVE_GUARANTEE", broken("member.groups", ["FIVE_GUARANTEE"]),
     "member.groups", ["EMPLOYEE", "FIVE_GUARANTEE"]),
    ("retired resident", broken("member", {"identity": "RESIDENT", "retired": True,
                                           "continuous_since": "2015-01-01"}),
     "member.retired", ["only an EMPLOYEE"]),
    ("resident with an other facility", broken("member.identity", "RESIDENT"),
     "member.other_facility", ["only an EMPLOYEE"]),
    ("unknown key in a claim", broken("claims.0.colour", "red"),
     "claims[0].colour", ["unknown field"]),
    ("unknown key in a line item", broken("claims.0.items.0.price", "1.00"),
     "claims[0].items[0].price", ["unknown field"]),
    ("unknown key in the member", broken("member.nickname", "A"),
     "member.nickname", ["unknown field"]),
    ("unknown key in the scenario", broken("owner", "x"), "scenario.owner", ["unknown field"]),
    ("missing claim date", broken("claims.0.date", delete=True), "claims[0].date",
     ["required"]),
    ("no calendar day", broken("claims.0.date", "2018-02-30"), "claims[0].date",
     ["YYYY-MM-DD"]),
    ("a flag that is not a boolean", broken("claims.0.use_account", "yes"),
     "claims[0].use_account", ["true or false"]),
    ("a price cap on a class-C line", broken("claims.0.items.0",
                                             {"category": "C", "amount": "1.00",
                                              "allowed_amount": "1.00"}),
     "claims[0].items[0].allowed_amount", ["class-C"]),
    ("a self-pay ratio on a class-A line", broken("claims.0.items.0",
                                                  {"category": "A", "amount": "1.00",
                                                   "selfpay_ratio": "0.1"}),
     "claims[0].items[0].selfpay_ratio", ["class-B"]),
    ("items and pre-aggregated amounts together", broken("claims.0.total", "1.00"),
     "claims[0].total", ["not both"]),
    ("no line items", broken("claims.0.items", []), "claims[0].items", ["at least one"]),
    ("parts larger than the total", broken("claims.1.full_selfpay", "200.00"),
     "claims[1].total", ["less than"]),
    ("an inpatient flag on an outpatient claim", broken("claims.1.childbirth", True),
     "claims[1].childbirth", ["INPATIENT claims only"]),
    ("an outpatient referral date on an admission",
     broken("claims.0.referred_by_primary_on", "2018-03-01"),
     "claims[0].referred_by_primary_on", ["OUTPATIENT claims only"]),
    ("a duplicate claim id", broken("claims.1.id", "c1"), "claims[1].id", ["duplicate"]),
]


@pytest.mark.parametrize("raw, field, words", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_scenario_input_is_refused_naming_the_field_and_the_problem(raw, field, words):
    with pytest.raises(InvalidInput) as e:
        parse_scenario(raw)
    assert e.value.field == field, str(e.value)
    for word in words:
        assert word in e.value.problem, f"{word!r} not in {e.value.problem!r}"
    assert str(e.value).startswith(f"{field}: ")


def test_the_valid_scenario_of_these_cases_parses():
    sc = parse_scenario(copy.deepcopy(VALID))
    assert [c.id for c in sc.claims] == ["c1", "c2"]


def test_a_date_with_no_policy_in_force_is_refused(impl):
    # jiangmen-2018.md: "a claim dated earlier has no policy in force".
    sc = parse_scenario(broken("claims.0.date", "2017-06-01"))
    with pytest.raises(NoPolicyInForce) as e:
        run_scenario(sc, impl)
    assert isinstance(e.value, InvalidInput)
    assert e.value.field == "date"
    assert "2017-06-01" in e.value.problem and "2018-01-01" in e.value.problem


def test_a_service_date_before_the_contribution_run_began_is_refused_at_parse_time():
    # Spec §1: "A service date before continuous since is invalid input."
    with pytest.raises(InvalidInput) as e:
        parse_scenario(broken("member.continuous_since", "2018-03-06"))
    assert e.value.field == "claims[0].date"
    assert "2018-03-05" in e.value.problem and "2018-03-06" in e.value.problem


# --- the same checks called directly (the service validates protobuf requests with them) ------

def test_check_member_refuses_an_employee_in_five_guarantee():
    with pytest.raises(InvalidInput) as e:
        check_member("EMPLOYEE", frozenset({"FIVE_GUARANTEE"}), None)
    assert e.value.field == "member.groups" and "FIVE_GUARANTEE" in e.value.problem


def test_check_member_refuses_an_unknown_group_naming_it():
    with pytest.raises(InvalidInput, match="'VETERAN'"):
        check_member("RESIDENT", frozenset({"VETERAN"}), None, path="request.member")


@pytest.mark.parametrize("b, field", [
    (Bill(-1), "claim.total"),
    (Bill(100, -1), "claim.full_selfpay"),
    (Bill(100, 0, -1), "claim.over_limit"),
    (Bill(100, 0, 0, -1), "claim.pre_selfpay"),
    (Bill(100, 60, 30, 11), "claim.total"),          # 60 + 30 + 11 > 100
    (Bill(MAX_FEN + 1), "claim.total"),
])
def test_check_bill_refuses_negative_or_inconsistent_amounts(b, field):
    with pytest.raises(InvalidInput) as e:
        check_bill(b, "claim")
    assert e.value.field == field


def test_check_amount_accepts_the_bounds_and_nothing_beyond():
    assert check_amount(0, "x") == 0
    assert check_amount(MAX_FEN, "x") == MAX_FEN
    for bad in (-1, MAX_FEN + 1):
        with pytest.raises(InvalidInput):
            check_amount(bad, "x")


def test_a_valid_bill_passes_unchanged():
    b = Bill(100, 60, 30, 10)
    assert check_bill(b, "claim") is b and b.in_scope_fen == 0
