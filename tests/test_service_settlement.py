"""The settlement service over the wire, on the in-memory ledger (fast unit tests)."""
from __future__ import annotations

import grpc
import pytest

from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from service_fixtures import (  # noqa: F401  (fixtures)
    accumulators, add_facility, add_member, any_server, d, inpatient,
)


@pytest.fixture
def svc(any_server):
    c = any_server.client
    add_facility(c, "H3", ty.FACILITY_LEVEL_3)
    add_facility(c, "H2", ty.FACILITY_LEVEL_2)
    add_facility(c, "P1", ty.FACILITY_LEVEL_1)
    add_member(c, "M1", account_balance_fen=100_000, primary_facility_id="P1")
    return any_server


def settle(c, req):
    return c.call(c.settlement.Settle, req)


def test_presettle_computes_the_same_numbers_and_commits_nothing(svc):
    c = svc.client
    before = accumulators(c, "M1")
    pre = c.call(c.settlement.PreSettle,
                 inpatient("", "M1", "H3", 1_000_000, use_personal_account=True)).settlement
    assert pre.status == ty.SETTLEMENT_STATUS_PRE_SETTLED and pre.settlement_id == ""
    assert pre.fund_total_fen > 0 and pre.account_paid_fen == 100_000
    assert accumulators(c, "M1") == before
    assert not list(svc.ledger.journal())
    done = settle(c, inpatient("r1", "M1", "H3", 1_000_000, use_personal_account=True))
    got = done.settlement
    assert got.status == ty.SETTLEMENT_STATUS_SETTLED and got.settlement_id
    for f in ("fund_total_fen", "patient_total_fen", "account_paid_fen", "cash_fen",
              "balance_after_fen", "breakdown", "layers", "funds"):
        assert getattr(got, f) == getattr(pre, f), f


def test_reply_carries_breakdown_funds_layers_and_accumulators_after(svc):
    s = settle(svc.client, inpatient("r1", "M1", "H3", 1_000_000)).settlement
    b = s.breakdown
    assert (b.total_fen, b.in_scope_fen, b.deductible_fen) == (1_000_000, 1_000_000, 90_000)
    tier1 = round((1_000_000 - 90_000) * 0.55)
    assert [(p.layer_id, p.amount_fen) for p in s.layers][0] == ("inpatient_tier1", tier1)
    assert s.layers[0].cap_remaining_fen == 20_000_000  # crt_payb_lmt_amt before the claim
    assert s.funds[0].fund == ty.FUND_INPATIENT_TIER1
    assert s.fund_total_fen == sum(f.amount_fen for f in s.funds)
    assert s.patient_total_fen == 1_000_000 - s.fund_total_fen == s.cash_fen
    after = {v.layer_id: v for v in s.accumulators_after.layers}
    assert after["inpatient_tier1"].paid_fen == tier1
    assert after["inpatient_tier1"].remaining_fen == 20_000_000 - tier1
    assert s.policy_version.startswith("jiangmen/2018-01-01#")
    assert s.identity == ty.IDENTITY_EMPLOYEE and not s.trace


def test_trace_is_returned_only_when_asked(svc):
    s = settle(svc.client, inpatient("r1", "M1", "H3", 1_000_000, want_trace=True)).settlement
    assert s.trace and all(step.clause and step.what for step in s.trace)
    assert any(step.clause.startswith("二(四)1(1)") for step in s.trace)


def test_replaying_a_request_returns_the_original_reply_and_settles_nothing_more(svc):
    c = svc.client
    first = settle(c, inpatient("r1", "M1", "H3", 1_000_000))
    acc = accumulators(c, "M1")
    again = settle(c, inpatient("r1", "M1", "H3", 1_000_000))
    assert again.replayed and not first.replayed
    assert again.settlement == first.settlement
    assert accumulators(c, "M1") == acc
    assert len(list(svc.ledger.journal())) == 1


def test_replay_asking_for_a_trace_is_still_the_same_request(svc):
    c = svc.client
    first = settle(c, inpatient("r1", "M1", "H3", 1_000_000))
    again = settle(c, inpatient("r1", "M1", "H3", 1_000_000, want_trace=True))
    assert again.replayed and again.settlement == first.settlement


def test_same_request_id_with_another_body_is_already_exists_naming_the_conflict(svc):
    c = svc.client
    settle(c, inpatient("r1", "M1", "H3", 1_000_000))
    with pytest.raises(grpc.RpcError) as e:
        settle(c, inpatient("r1", "M1", "H3", 1_000_001))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'r1'" in e.value.details() and "different" in e.value.details()


def test_the_same_request_id_at_another_facility_is_another_settlement(svc):
    c = svc.client
    a = settle(c, inpatient("r1", "M1", "H3", 1_000_000)).settlement
    b = settle(c, inpatient("r1", "M1", "H2", 1_000_000)).settlement
    assert a.settlement_id != b.settlement_id


def test_reverse_restores_accumulators_and_balance_exactly_and_is_idempotent(svc):
    c = svc.client
    settle(c, inpatient("r0", "M1", "H2", 300_000, use_personal_account=True))
    before = accumulators(c, "M1")
    s = settle(c, inpatient("r1", "M1", "H3", 3_000_000, use_personal_account=True)).settlement
    assert s.account_paid_fen > 0
    assert accumulators(c, "M1") != before
    rev = c.call(c.settlement.Reverse, st.ReverseRequest(settlement_id=s.settlement_id,
                                                         facility_id="H3"))
    assert rev.settlement.status == ty.SETTLEMENT_STATUS_REVERSED
    assert rev.settlement.fund_total_fen == s.fund_total_fen
    assert accumulators(c, "M1") == before
    again = c.call(c.settlement.Reverse, st.ReverseRequest(settlement_id=s.settlement_id,
                                                           facility_id="H3"))
    assert again.settlement.status == ty.SETTLEMENT_STATUS_REVERSED
    assert accumulators(c, "M1") == before
    got = c.call(c.settlement.GetSettlement,
                 st.GetSettlementRequest(settlement_id=s.settlement_id)).settlement
    assert got.status == ty.SETTLEMENT_STATUS_REVERSED


def test_reverse_of_another_facilitys_settlement_is_permission_denied(svc):
    c = svc.client
    s = settle(c, inpatient("r1", "M1", "H3", 1_000_000)).settlement
    acc = accumulators(c, "M1")
    with pytest.raises(grpc.RpcError) as e:
        c.call(c.settlement.Reverse, st.ReverseRequest(settlement_id=s.settlement_id,
                                                       facility_id="H2"))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert accumulators(c, "M1") == acc


def test_get_settlement_returns_the_reply_as_settled(svc):
    c = svc.client
    s = settle(c, inpatient("r1", "M1", "H3", 1_000_000)).settlement
    got = c.call(c.settlement.GetSettlement,
                 st.GetSettlementRequest(settlement_id=s.settlement_id)).settlement
    assert got == s


def test_referral_continues_the_deductible_from_the_referring_settlement(svc):
    c = svc.client
    first = settle(c, inpatient("r1", "M1", "H2", 400_000, day="2018-03-01")).settlement
    assert first.breakdown.deductible_fen == 60_000
    second = settle(c, inpatient("r2", "M1", "H3", 1_500_000, day="2018-03-09",
                                 referral_from_settlement_id=first.settlement_id)).settlement
    assert second.breakdown.deductible_fen == 30_000  # tops up 600 to 900 yuan
    assert second.chain_deductible_after_fen == 90_000


def test_referral_from_a_reversed_settlement_is_a_failed_precondition(svc):
    c = svc.client
    first = settle(c, inpatient("r1", "M1", "H2", 400_000)).settlement
    c.call(c.settlement.Reverse, st.ReverseRequest(settlement_id=first.settlement_id,
                                                   facility_id="H2"))
    with pytest.raises(grpc.RpcError) as e:
        settle(c, inpatient("r2", "M1", "H3", 400_000,
                            referral_from_settlement_id=first.settlement_id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_referral_from_another_members_settlement_is_invalid(svc):
    c = svc.client
    add_member(c, "M2")
    first = settle(c, inpatient("r1", "M2", "H2", 400_000)).settlement
    with pytest.raises(grpc.RpcError) as e:
        settle(c, inpatient("r2", "M1", "H3", 400_000,
                            referral_from_settlement_id=first.settlement_id))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "another member" in e.value.details()


def test_a_facility_that_is_not_designated_settles_as_non_designated(svc):
    c = svc.client
    add_facility(c, "X9", ty.FACILITY_LEVEL_NON_DESIGNATED)
    add_facility(c, "Y2", ty.FACILITY_LEVEL_2, designated=False)
    add_member(c, "M2")
    a = c.call(c.settlement.PreSettle, inpatient("", "M1", "X9", 1_000_000)).settlement
    b = c.call(c.settlement.PreSettle, inpatient("", "M2", "Y2", 1_000_000)).settlement
    assert a.breakdown.deductible_fen == b.breakdown.deductible_fen == 150_000
    assert a.fund_total_fen == b.fund_total_fen


def test_line_items_are_split_into_the_four_amounts(svc):
    c = svc.client
    req = st.SettleRequest(
        request_id="r1", member_id="M1", facility_id="H3", kind=ty.CLAIM_KIND_INPATIENT,
        service_date=d("2018-03-05"),
        line_items=st.LineItems(items=[
            st.LineItem(charge_class=ty.CHARGE_CLASS_A, amount_fen=3_000_000),
            st.LineItem(charge_class=ty.CHARGE_CLASS_B, amount_fen=500_000,
                        selfpay_ratio_bp=1000),
            st.LineItem(charge_class=ty.CHARGE_CLASS_A, amount_fen=80_000,
                        allowed_amount_fen=50_000),
            st.LineItem(charge_class=ty.CHARGE_CLASS_C, amount_fen=200_000)]))
    b = settle(c, req).settlement.breakdown
    assert (b.total_fen, b.full_selfpay_fen, b.over_limit_fen, b.pre_selfpay_fen,
            b.in_scope_fen) == (3_780_000, 200_000, 30_000, 50_000, 3_500_000)


def test_get_accumulators_shows_caps_bands_and_allowances(svc):
    c = svc.client
    settle(c, inpatient("r1", "M1", "H3", 3_000_000))
    acc = accumulators(c, "M1", as_of="2018-03-31")
    layers = {v.layer_id: v for v in acc.layers}
    t2 = layers["inpatient_tier2"]
    assert t2.cumulative_base_fen > 500_000 and t2.current_rate_bp == 8500
    assert t2.to_next_band_fen == 20_000_000 - t2.cumulative_base_fen
    assert layers["outpatient_tier2_primary"].limit_fen == 3 * 3500  # 35 yuan a month to March
    assert acc.continuous_months == 99 and acc.cap_scale_bp == 10_000


def test_outpatient_at_the_primary_facility(svc):
    c = svc.client
    req = st.SettleRequest(request_id="o1", member_id="M1", facility_id="P1",
                           kind=ty.CLAIM_KIND_OUTPATIENT, service_date=d("2018-02-01"),
                           amounts=st.BillAmounts(total_fen=10_000))
    s = settle(c, req).settlement
    assert s.fund_total_fen == 7_000
    assert [f.fund for f in s.funds] == [ty.FUND_OUTPATIENT_TIER1]


def test_a_fund_added_by_a_policy_edit_is_reported_with_its_enum():
    from engine.loader import PolicyStore
    from server.ledger.memory import MemoryLedger
    from service_fixtures import ROOT, running_server

    policies = PolicyStore(ROOT / "tests" / "fixtures" / "policies" / "with_assistance")
    with running_server(MemoryLedger(), policies) as srv:
        c = srv.client
        add_facility(c, "H3", ty.FACILITY_LEVEL_3)
        add_member(c, "M", identity=ty.IDENTITY_RESIDENT, groups=[ty.GROUP_MINIMUM_LIVING])
        s = settle(c, inpatient("r1", "M", "H3", 1_000_000)).settlement
    ma = [f for f in s.funds if f.fund_code == "MEDICAL_ASSISTANCE"]
    assert ma and ma[0].fund == ty.FUND_MEDICAL_ASSISTANCE and ma[0].amount_fen > 0
