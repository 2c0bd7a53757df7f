"""Every refusal has its status code, names the field, and is logged; never UNKNOWN/INTERNAL."""
from __future__ import annotations

import logging

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from reimburse.v1 import policy_pb2 as pol
from reimburse.v1 import registry_pb2 as reg
from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from server.ledger.sqlite import SqliteLedger
from service_fixtures import add_facility, add_member, d, inpatient, any_server  # noqa: F401
from service_fixtures import running_server


@pytest.fixture
def svc(any_server):
    c = any_server.client
    add_facility(c, "H3", ty.FACILITY_LEVEL_3)
    add_member(c, "M1")
    add_member(c, "ENDED", benefit_end="2018-02-28")
    add_member(c, "LATE", benefit_start="2018-06-01")
    add_member(c, "NEW", continuous_since="2018-04-01")
    return any_server


def violations(e: grpc.RpcError, kind) -> list:
    status = rpc_status.from_call(e)
    assert status is not None, "no rich status"
    out = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            msg = kind()
            detail.Unpack(msg)
            out.append(msg)
    return out


def field_violations(e: grpc.RpcError) -> list[str]:
    return [v.field for br in violations(e, error_details_pb2.BadRequest)
            for v in br.field_violations]


def refusal(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=10)
    return e.value


def _items(*items):
    return st.LineItems(items=list(items))


BAD_SETTLE = [
    ("request_id", dict(request_id="")),
    ("request_id", dict(request_id="x" * 129)),
    ("member_id", dict(member_id="")),
    ("facility_id", dict(facility_id=" H3")),
    ("kind", dict(kind=ty.CLAIM_KIND_UNSPECIFIED)),
    ("kind", dict(kind=7)),
    ("service_date", dict(service_date=None)),
    ("service_date", dict(service_date=ty.Date(year=2018, month=2, day=30))),
    ("amounts.total_fen", dict(amounts=st.BillAmounts(total_fen=-1))),
    ("amounts.total_fen", dict(amounts=st.BillAmounts(total_fen=2**62))),
    ("amounts.total_fen", dict(amounts=st.BillAmounts(total_fen=100, full_selfpay_fen=200))),
    ("line_items", dict(amounts=None)),
    ("line_items.items", dict(line_items=_items())),
    ("line_items.items[0].charge_class", dict(line_items=_items(st.LineItem(amount_fen=1)))),
    ("line_items.items[1].amount_fen", dict(line_items=_items(
        st.LineItem(charge_class=ty.CHARGE_CLASS_A, amount_fen=1),
        st.LineItem(charge_class=ty.CHARGE_CLASS_A, amount_fen=-5)))),
    ("line_items.items[0].allowed_amount_fen", dict(line_items=_items(
        st.LineItem(charge_class=ty.CHARGE_CLASS_C, amount_fen=100, allowed_amount_fen=50)))),
    ("line_items.items[0].selfpay_ratio_bp", dict(line_items=_items(
        st.LineItem(charge_class=ty.CHARGE_CLASS_A, amount_fen=100, selfpay_ratio_bp=10)))),
    ("line_items.items[0].selfpay_ratio_bp", dict(line_items=_items(
        st.LineItem(charge_class=ty.CHARGE_CLASS_B, amount_fen=100, selfpay_ratio_bp=10001)))),
    ("referred_by_primary_on", dict(referred_by_primary_on=ty.Date(year=2018, month=3, day=1))),
]


@pytest.mark.parametrize("field,change", BAD_SETTLE, ids=[f"{f}-{i}" for i, (f, _) in
                                                          enumerate(BAD_SETTLE)])
def test_bad_settle_input_is_invalid_argument_naming_the_field(svc, field, change):
    req = inpatient("r1", "M1", "H3", 1_000_000)
    for k, v in change.items():
        if v is None:
            req.ClearField(k)
        elif isinstance(v, (str, int)):
            setattr(req, k, v)
        else:
            getattr(req, k).CopyFrom(v)
    e = refusal(svc.client.settlement.Settle, req)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert field_violations(e) == [field]
    assert not list(svc.ledger.journal())


def test_outpatient_with_inpatient_flags_is_invalid(svc):
    req = inpatient("r1", "M1", "H3", 1_000, childbirth=True)
    req.kind = ty.CLAIM_KIND_OUTPATIENT
    e = refusal(svc.client.settlement.Settle, req)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(e) == ["childbirth"]


def test_too_many_line_items_is_invalid(svc):
    req = inpatient("r1", "M1", "H3", 0)
    req.line_items.items.extend(
        [st.LineItem(charge_class=ty.CHARGE_CLASS_A, amount_fen=1)] * 10_001)
    e = refusal(svc.client.settlement.Settle, req)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(e) == ["line_items.items"]


@pytest.mark.parametrize("member,field", [
    (reg.Member(member_id="X", continuous_since=d("2010-01-01")), "member.identity"),
    (reg.Member(member_id="X", identity=ty.IDENTITY_EMPLOYEE), "member.continuous_since"),
    (reg.Member(identity=ty.IDENTITY_EMPLOYEE, continuous_since=d("2010-01-01")),
     "member.member_id"),
    (reg.Member(member_id="X", identity=ty.IDENTITY_EMPLOYEE, continuous_since=d("2010-01-01"),
                groups=[ty.GROUP_FIVE_GUARANTEE]), "member.groups"),
    (reg.Member(member_id="X", identity=ty.IDENTITY_RESIDENT, continuous_since=d("2010-01-01"),
                other_facility_id="O1"), "member.other_facility_id"),
    (reg.Member(member_id="X", identity=ty.IDENTITY_RESIDENT, continuous_since=d("2010-01-01"),
                retired=True), "member.retired"),
    (reg.Member(member_id="X", identity=ty.IDENTITY_EMPLOYEE, continuous_since=d("2010-01-01"),
                account_balance_fen=-1), "member.account_balance_fen"),
    (reg.Member(member_id="X", identity=ty.IDENTITY_EMPLOYEE, continuous_since=d("2010-01-01"),
                benefit_start=d("2018-05-01"), benefit_end=d("2018-04-01")),
     "member.benefit_end"),
    (reg.Member(member_id="X", identity=ty.IDENTITY_EMPLOYEE, continuous_since=d("2010-01-01"),
                region="atlantis"), "member.region"),
])
def test_bad_member_is_invalid_argument_naming_the_field(svc, member, field):
    e = refusal(svc.client.registry.UpsertMember, reg.UpsertMemberRequest(member=member))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert field_violations(e) == [field]


def test_bad_facility_is_invalid_argument(svc):
    e = refusal(svc.client.registry.UpsertFacility,
                reg.UpsertFacilityRequest(facility=reg.Facility(facility_id="F")))
    assert field_violations(e) == ["facility.level"]


@pytest.mark.parametrize("call,request_", [
    ("settle", inpatient("r1", "NOBODY", "H3", 1_000)),
    ("settle", inpatient("r1", "M1", "NOWHERE", 1_000)),
    ("settle", inpatient("r1", "M1", "H3", 1_000, referral_from_settlement_id="nope")),
    ("presettle", inpatient("", "NOBODY", "H3", 1_000)),
    ("reverse", st.ReverseRequest(settlement_id="nope", facility_id="H3")),
    ("get", st.GetSettlementRequest(settlement_id="nope")),
    ("member", reg.GetMemberRequest(member_id="nope")),
    ("facility", reg.GetFacilityRequest(facility_id="nope")),
    ("accumulators", st.GetAccumulatorsRequest(member_id="nope", year=2018)),
])
def test_unknown_member_facility_or_settlement_is_not_found(svc, call, request_):
    c = svc.client
    method = {"settle": c.settlement.Settle, "presettle": c.settlement.PreSettle,
              "reverse": c.settlement.Reverse, "get": c.settlement.GetSettlement,
              "member": c.registry.GetMember, "facility": c.registry.GetFacility,
              "accumulators": c.settlement.GetAccumulators}[call]
    e = refusal(method, request_)
    assert e.code() == grpc.StatusCode.NOT_FOUND, e.details()
    assert "nope" in e.details() or "NOBODY" in e.details() or "NOWHERE" in e.details()


@pytest.mark.parametrize("member,day,words", [
    ("ENDED", "2018-03-05", "benefits ended 2018-02-28"),
    ("LATE", "2018-03-05", "benefits start 2018-06-01"),
    ("NEW", "2018-03-05", "continuous contribution began 2018-04-01"),
    ("M1", "2017-12-31", "no jiangmen policy in force on 2017-12-31"),
])
def test_a_member_not_covered_on_the_service_date_is_failed_precondition(svc, member, day,
                                                                        words):
    for method in (svc.client.settlement.Settle, svc.client.settlement.PreSettle):
        e = refusal(method, inpatient("r1", member, "H3", 1_000_000, day=day))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert words in e.details()
        assert violations(e, error_details_pb2.PreconditionFailure)
    assert not list(svc.ledger.journal())


def test_policy_before_the_first_effective_date_is_failed_precondition(svc):
    e = refusal(svc.client.policy.GetPolicy, pol.GetPolicyRequest(date=d("2017-06-01")))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_get_policy_lists_parameters_with_clauses(svc):
    p = svc.client.call(svc.client.policy.GetPolicy,
                        pol.GetPolicyRequest(region="jiangmen", date=d("2018-03-01")))
    params = {x.path: x for x in p.parameters}
    ded = params["layers.inpatient_tier1.deductible_fen.LEVEL_3"]
    assert ded.value_json == "90000" and "900元" in ded.clause
    assert [x.layer_id for x in p.layers][0] == "inpatient_tier1"
    assert all(x.clause for x in p.parameters)


def test_each_call_writes_one_structured_log_line(svc, caplog):
    caplog.set_level(logging.INFO, logger="reimburse.rpc")
    c = svc.client
    c.call(c.settlement.Settle, inpatient("log-1", "M1", "H3", 1_000_000))
    with pytest.raises(grpc.RpcError):
        c.call(c.settlement.Settle, inpatient("log-2", "NOBODY", "H3", 1_000_000))
    lines = [r.msg for r in caplog.records if r.name == "reimburse.rpc"]
    assert len(lines) == 2
    ok, bad = lines
    assert ok["method"] == "Settle" and ok["request_id"] == "log-1"
    assert ok["member_id"] == "M1" and ok["code"] == "OK" and ok["latency_ms"] >= 0
    assert bad["code"] == "NOT_FOUND" and bad["member_id"] == "NOBODY" and bad["error"]


class _ExpiredContext:
    """A servicer context whose caller's deadline has already passed."""

    def time_remaining(self):
        return 0.0

    def abort_with_status(self, status):
        raise RuntimeError(status.code)

    def abort(self, code, details):
        raise RuntimeError(code)


def test_a_settle_whose_deadline_passed_settles_nothing(svc):
    from engine.loader import store
    from server.service import Core, SettlementServicer

    servicer = SettlementServicer(Core(svc.ledger, store()))
    with pytest.raises(RuntimeError) as e:
        servicer.Settle(inpatient("late", "M1", "H3", 1_000_000), _ExpiredContext())
    assert e.value.args[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not list(svc.ledger.journal())


class _ReversedMeanwhile(SqliteLedger):
    """A reversal of the referring admission lands between the service's check of the
    referral (when it reads the request) and the referred claim's commit."""

    source: tuple[str, str] | None = None      # (settlement id, facility id)

    def settle(self, **kw):
        if kw.get("referral_from") and self.source:
            self.reverse(settlement_id=self.source[0], facility_id=self.source[1])
        return super().settle(**kw)


def test_a_referral_whose_source_is_reversed_before_the_commit_is_failed_precondition(tmp_path):
    ledger = _ReversedMeanwhile(tmp_path / "ledger.db")
    with running_server(ledger) as r:
        c = r.client
        add_facility(c, "H2", ty.FACILITY_LEVEL_2)
        add_facility(c, "H3", ty.FACILITY_LEVEL_3)
        add_member(c, "M1")
        first = c.call(c.settlement.Settle, inpatient("r1", "M1", "H2", 400_000)).settlement
        ledger.source = (first.settlement_id, "H2")
        e = refusal(c.settlement.Settle, inpatient(
            "r2", "M1", "H3", 400_000, referral_from_settlement_id=first.settlement_id))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"the referring settlement {first.settlement_id!r} was reversed" in e.details()
        [v] = violations(e, error_details_pb2.PreconditionFailure)[0].violations
        assert (v.type, v.subject) == ("REFERRAL_REVERSED", f"settlements/{first.settlement_id}")
        # the referred claim left nothing: one settlement, reversed, and empty accumulators
        assert [(s.request_id, s.status) for s in ledger.journal()] == [("r1", "REVERSED")]
        assert ledger.accumulators("M1", 2018).paid == {}
