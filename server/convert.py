"""The wire boundary: protobuf messages <-> the engine's and the ledger's value types.

Every request is validated here, once, with the checks of ``engine.claims``; a refusal is an
``InvalidInput`` naming the protobuf field (``line_items.items[2].amount_fen``). Past this
module the service trusts its values. Pure: no I/O.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date

from engine.bill import bill_from_items
from engine.claims import (
    MAX_FEN, check_amount, check_bill, check_claim_flags, check_member,
)
from engine.errors import InvalidInput
from engine.model import (
    Accumulators, Bill, Claim, LayerPayment, LineItem, Member, Settlement, Step,
)
from engine.money import BP
from reimburse.v1 import registry_pb2 as reg
from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from server.ledger.base import FacilityRecord, MemberRecord

MAX_ID_LEN = 128
MAX_LINE_ITEMS = 10_000
DEFAULT_REGION = "jiangmen"

# Enum <-> engine code tables. The engine's codes are strings; UNSPECIFIED never maps.
IDENTITY = {ty.IDENTITY_EMPLOYEE: "EMPLOYEE", ty.IDENTITY_RESIDENT: "RESIDENT"}
GROUP = {ty.GROUP_FIVE_GUARANTEE: "FIVE_GUARANTEE",
         ty.GROUP_POVERTY_REGISTERED: "POVERTY_REGISTERED",
         ty.GROUP_MINIMUM_LIVING: "MINIMUM_LIVING",
         ty.GROUP_EXTREME_HARDSHIP: "EXTREME_HARDSHIP"}
LEVEL = {ty.FACILITY_LEVEL_1: "LEVEL_1", ty.FACILITY_LEVEL_2: "LEVEL_2",
         ty.FACILITY_LEVEL_3: "LEVEL_3", ty.FACILITY_LEVEL_NON_DESIGNATED: "NON_DESIGNATED"}
KIND = {ty.CLAIM_KIND_INPATIENT: "INPATIENT", ty.CLAIM_KIND_OUTPATIENT: "OUTPATIENT"}
CATEGORY = {ty.CHARGE_CLASS_A: "A", ty.CHARGE_CLASS_B: "B", ty.CHARGE_CLASS_C: "C"}
FUND = {"INPATIENT_TIER1": ty.FUND_INPATIENT_TIER1, "INPATIENT_TIER2": ty.FUND_INPATIENT_TIER2,
        "CRITICAL_ILLNESS": ty.FUND_CRITICAL_ILLNESS,
        "OUTPATIENT_TIER1": ty.FUND_OUTPATIENT_TIER1,
        "OUTPATIENT_TIER2": ty.FUND_OUTPATIENT_TIER2,
        "MEDICAL_ASSISTANCE": ty.FUND_MEDICAL_ASSISTANCE}


def _inverse(table: dict) -> dict:
    return {v: k for k, v in table.items()}


IDENTITY_WIRE, GROUP_WIRE, LEVEL_WIRE, KIND_WIRE, CATEGORY_WIRE = map(
    _inverse, (IDENTITY, GROUP, LEVEL, KIND, CATEGORY))


# --- scalars -----------------------------------------------------------------------------

def check_id(value: str, field: str, required: bool = True) -> str:
    if not value:
        if required:
            raise InvalidInput(field, "is required")
        return ""
    if len(value) > MAX_ID_LEN:
        raise InvalidInput(field, f"must be at most {MAX_ID_LEN} characters, got {len(value)}")
    if not value.isprintable() or value != value.strip():
        raise InvalidInput(field, "must be printable characters without leading or trailing "
                                  "spaces")
    return value


def enum_value(value: int, table: dict, field: str, enum_type) -> str:
    if value in table:
        return table[value]
    if value == 0:
        raise InvalidInput(field, "is required")
    names = [enum_type.Name(k) for k in table]
    raise InvalidInput(field, f"unknown value {value}; expected one of {names}")


def date_from_wire(msg, parent, name: str, field: str, required: bool = False) -> date | None:
    if not parent.HasField(name):
        if required:
            raise InvalidInput(field, "is required")
        return None
    try:
        return date(msg.year, msg.month, msg.day)
    except ValueError:
        raise InvalidInput(field, f"is not a valid date: {msg.year:04d}-{msg.month:02d}-"
                                  f"{msg.day:02d}") from None


def date_to_wire(d: date | None, out: ty.Date) -> None:
    if d is not None:
        out.year, out.month, out.day = d.year, d.month, d.day


def wire_date(d: date) -> ty.Date:
    return ty.Date(year=d.year, month=d.month, day=d.day)


# --- settlement requests -----------------------------------------------------------------

@dataclass(frozen=True)
class SettleCall:
    """A validated ``SettleRequest``: everything but what the registry and ledger supply."""

    request_id: str
    member_id: str
    facility_id: str
    kind: str
    service_date: date
    bill: Bill
    items: tuple[LineItem, ...]
    referral_from: str
    home_bed_after_transfer: bool
    out_of_area_unfiled: bool
    childbirth: bool
    referred_by_primary_on: date | None
    use_account: bool
    want_trace: bool

    def claim(self, facility_level: str, chain_deductible_fen: int = 0) -> Claim:
        return Claim(kind=self.kind, service_date=self.service_date,
                     facility_id=self.facility_id, facility_level=facility_level,
                     bill=self.bill, items=self.items,
                     home_bed_after_transfer=self.home_bed_after_transfer,
                     out_of_area_unfiled=self.out_of_area_unfiled, childbirth=self.childbirth,
                     referred_by_primary_on=self.referred_by_primary_on,
                     use_account=self.use_account, chain_deductible_fen=chain_deductible_fen,
                     referral=bool(self.referral_from))


def _line_item(it: st.LineItem, p: str) -> LineItem:
    cat = enum_value(it.charge_class, CATEGORY, f"{p}.charge_class", ty.ChargeClass)
    has_allowed = it.HasField("allowed_amount_fen")
    # Same rules as engine.claims.parse_items, named by the protobuf fields.
    if cat == "C" and has_allowed:
        raise InvalidInput(f"{p}.allowed_amount_fen", "a class-C line is all self-pay; it has "
                                                      "no price cap")
    if cat != "B" and it.selfpay_ratio_bp:
        raise InvalidInput(f"{p}.selfpay_ratio_bp", "only a class-B line has a first "
                                                    "self-pay ratio")
    if not 0 <= it.selfpay_ratio_bp <= BP:
        raise InvalidInput(f"{p}.selfpay_ratio_bp", f"must be within 0..{BP} bp, got "
                                                    f"{it.selfpay_ratio_bp}")
    check_id(it.line_id, f"{p}.line_id", required=False)
    return LineItem(
        category=cat, amount_fen=check_amount(it.amount_fen, f"{p}.amount_fen"),
        allowed_fen=(check_amount(it.allowed_amount_fen, f"{p}.allowed_amount_fen")
                     if has_allowed else None),
        selfpay_ratio_bp=it.selfpay_ratio_bp)


def _bill(req: st.SettleRequest) -> tuple[Bill, tuple[LineItem, ...]]:
    which = req.WhichOneof("bill")
    if which is None:
        raise InvalidInput("line_items", "is required (or the pre-aggregated amounts)")
    if which == "line_items":
        raw = req.line_items.items
        if not raw:
            raise InvalidInput("line_items.items", "must list at least one line item")
        if len(raw) > MAX_LINE_ITEMS:
            raise InvalidInput("line_items.items", f"must list at most {MAX_LINE_ITEMS} line "
                                                   f"items, got {len(raw)}")
        items = tuple(_line_item(it, f"line_items.items[{i}]") for i, it in enumerate(raw))
        bill = bill_from_items(items)
        if bill.total_fen > MAX_FEN:
            raise InvalidInput("line_items.items", f"sum to more than {MAX_FEN // 100} yuan")
        return bill, items
    a = req.amounts
    bill = Bill(*(check_amount(getattr(a, k), f"amounts.{k}")
                  for k in ("total_fen", "full_selfpay_fen", "over_limit_fen",
                            "pre_selfpay_fen")))
    try:
        check_bill(bill, "amounts")
    except InvalidInput as e:  # engine.claims names JSON fields; the wire's end in _fen
        raise InvalidInput(f"{e.field}_fen", e.problem) from None
    return bill, ()


def validate_settle(req: st.SettleRequest, *, require_request_id: bool) -> SettleCall:
    kind = enum_value(req.kind, KIND, "kind", ty.ClaimKind)
    service_date = date_from_wire(req.service_date, req, "service_date", "service_date",
                                  required=True)
    referred = date_from_wire(req.referred_by_primary_on, req, "referred_by_primary_on",
                              "referred_by_primary_on")
    ids = dict(request_id=check_id(req.request_id, "request_id", required=require_request_id),
               member_id=check_id(req.member_id, "member_id"),
               facility_id=check_id(req.facility_id, "facility_id"))
    bill, items = _bill(req)
    referral = check_id(req.referral_from_settlement_id, "referral_from_settlement_id",
                        required=False)
    try:
        check_claim_flags(kind, "", referral=bool(referral),
                          home_bed=req.home_bed_after_transfer,
                          out_of_area=req.out_of_area_unfiled, childbirth=req.childbirth,
                          referred_on=referred)
    except InvalidInput as e:  # the engine's names -> the wire's
        name = e.field.lstrip(".")
        raise InvalidInput({"referral_from": "referral_from_settlement_id"}.get(name, name),
                           e.problem) from None
    return SettleCall(kind=kind, service_date=service_date, bill=bill, items=items,
                      referral_from=referral,
                      home_bed_after_transfer=req.home_bed_after_transfer,
                      out_of_area_unfiled=req.out_of_area_unfiled, childbirth=req.childbirth,
                      referred_by_primary_on=referred, use_account=req.use_personal_account,
                      want_trace=req.want_trace, **ids)


def request_hash(req: st.SettleRequest) -> str:
    """Digest of the canonical request body: deterministic serialization, want_trace left out
    (it changes what is shown, not what is settled)."""
    body = req
    if req.want_trace:  # copy only when there is something to leave out
        body = st.SettleRequest()
        body.CopyFrom(req)
        body.want_trace = False
    return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()


# --- registries ----------------------------------------------------------------------------

def member_from_wire(m: reg.Member) -> MemberRecord:
    identity = enum_value(m.identity, IDENTITY, "member.identity", ty.Identity)
    groups = frozenset(enum_value(g, GROUP, f"member.groups[{i}]", ty.Group)
                       for i, g in enumerate(m.groups))
    other = check_id(m.other_facility_id, "member.other_facility_id", required=False)
    try:
        check_member(identity, groups, other or None)
    except InvalidInput as e:
        raise InvalidInput(e.field.replace("other_facility", "other_facility_id"),
                           e.problem) from None
    if m.retired and identity != "EMPLOYEE":
        raise InvalidInput("member.retired", "only an EMPLOYEE can be retired (职工退休人员)")
    start = date_from_wire(m.benefit_start, m, "benefit_start", "member.benefit_start")
    end = date_from_wire(m.benefit_end, m, "benefit_end", "member.benefit_end")
    if start and end and end < start:
        raise InvalidInput("member.benefit_end", f"is before benefit_start ({start})")
    return MemberRecord(
        member_id=check_id(m.member_id, "member.member_id"),
        identity=identity,
        continuous_since=date_from_wire(m.continuous_since, m, "continuous_since",
                                        "member.continuous_since", required=True),
        retired=m.retired, groups=groups, maternity_eligible=m.maternity_eligible,
        primary_facility=check_id(m.primary_facility_id, "member.primary_facility_id",
                                  required=False) or None,
        other_facility=other or None, benefit_start=start, benefit_end=end,
        district=check_id(m.district, "member.district", required=False),
        region=check_id(m.region, "member.region", required=False) or DEFAULT_REGION,
        account_balance_fen=check_amount(m.account_balance_fen, "member.account_balance_fen"),
    )


def member_to_wire(r: MemberRecord) -> reg.Member:
    m = reg.Member(member_id=r.member_id, identity=IDENTITY_WIRE[r.identity],
                   retired=r.retired, groups=[GROUP_WIRE[g] for g in sorted(r.groups)],
                   district=r.district, primary_facility_id=r.primary_facility or "",
                   other_facility_id=r.other_facility or "",
                   maternity_eligible=r.maternity_eligible,
                   account_balance_fen=r.account_balance_fen, region=r.region)
    date_to_wire(r.continuous_since, m.continuous_since)
    if r.benefit_start:
        date_to_wire(r.benefit_start, m.benefit_start)
    if r.benefit_end:
        date_to_wire(r.benefit_end, m.benefit_end)
    return m


def engine_member(r: MemberRecord) -> Member:
    return Member(identity=r.identity, continuous_since=r.continuous_since, retired=r.retired,
                  groups=r.groups, maternity_eligible=r.maternity_eligible,
                  primary_facility=r.primary_facility, other_facility=r.other_facility)


def facility_from_wire(f: reg.Facility) -> FacilityRecord:
    return FacilityRecord(
        facility_id=check_id(f.facility_id, "facility.facility_id"),
        level=enum_value(f.level, LEVEL, "facility.level", ty.FacilityLevel),
        designated=f.designated if f.HasField("designated") else True,
        district=check_id(f.district, "facility.district", required=False),
        name=check_id(f.name, "facility.name", required=False))


def facility_to_wire(r: FacilityRecord) -> reg.Facility:
    return reg.Facility(facility_id=r.facility_id, level=LEVEL_WIRE[r.level],
                        designated=r.designated, district=r.district, name=r.name)


def rule_level(f: FacilityRecord) -> str:
    """The level the rules use: a facility that is not designated is NON_DESIGNATED."""
    return f.level if f.designated else "NON_DESIGNATED"


# --- results -----------------------------------------------------------------------------

def trace_to_wire(steps: tuple[Step, ...], out) -> None:
    for s in steps:
        out.add(clause=s.clause, what=s.what, result=s.result,
                inputs={k: int(v) for k, v in s.inputs.items()})


def settlement_to_wire(call: SettleCall, member: MemberRecord, s: Settlement,
                       accumulators_after: ty.Accumulators) -> ty.Settlement:
    b = s.bill
    msg = ty.Settlement(
        request_id=call.request_id, member_id=call.member_id, facility_id=call.facility_id,
        kind=KIND_WIRE[call.kind], service_date=wire_date(call.service_date),
        breakdown=ty.Breakdown(total_fen=b.total_fen, full_selfpay_fen=b.full_selfpay_fen,
                               over_limit_fen=b.over_limit_fen,
                               pre_selfpay_fen=b.pre_selfpay_fen, in_scope_fen=s.in_scope_fen,
                               deductible_fen=s.deductible_fen),
        fund_total_fen=s.fund_total_fen, patient_total_fen=s.patient_total_fen,
        account_paid_fen=s.account_paid_fen, cash_fen=s.cash_fen,
        balance_after_fen=s.balance_after_fen, accumulators_after=accumulators_after,
        policy_version=s.policy_version,
        chain_deductible_after_fen=s.chain_deductible_after_fen,
        identity=IDENTITY_WIRE[member.identity], childbirth=call.childbirth)
    for code, amount in s.funds.items():
        msg.funds.add(fund=FUND.get(code, ty.FUND_UNSPECIFIED), fund_code=code,
                      amount_fen=amount)
    for p in s.payments:
        lp = msg.layers.add(layer_id=p.layer, fund=FUND.get(p.fund, ty.FUND_UNSPECIFIED),
                            fund_code=p.fund, amount_fen=p.amount_fen)
        if p.cap_remaining_fen is not None:
            lp.cap_remaining_fen = p.cap_remaining_fen
    if call.want_trace:
        trace_to_wire(s.trace, msg.trace)
    return msg


def settlement_from_wire(msg: ty.Settlement) -> Settlement:
    """The engine's view of a reply (for ``engine.scenarios.result_line`` over the wire)."""
    b = msg.breakdown
    payments = tuple(LayerPayment(p.layer_id, p.fund_code, p.amount_fen,
                                  p.cap_remaining_fen if p.HasField("cap_remaining_fen")
                                  else None)
                     for p in msg.layers)
    return Settlement(
        bill=Bill(b.total_fen, b.full_selfpay_fen, b.over_limit_fen, b.pre_selfpay_fen),
        in_scope_fen=b.in_scope_fen, deductible_fen=b.deductible_fen, payments=payments,
        fund_total_fen=msg.fund_total_fen, patient_total_fen=msg.patient_total_fen,
        account_paid_fen=msg.account_paid_fen, cash_fen=msg.cash_fen,
        balance_after_fen=msg.balance_after_fen,
        accumulators_after=Accumulators(msg.service_date.year),
        chain_deductible_after_fen=msg.chain_deductible_after_fen,
        policy_version=msg.policy_version)


def settle_request(claim: Claim, *, request_id: str, member_id: str, facility_id: str,
                   referral_from: str = "", want_trace: bool = False) -> st.SettleRequest:
    """The wire request for an engine ``Claim`` (clients: the CLI and ``server.scenarios``).
    The claim's facility level is not sent: the server takes it from its registry."""
    req = st.SettleRequest(
        request_id=request_id, member_id=member_id, facility_id=facility_id,
        kind=KIND_WIRE[claim.kind], service_date=wire_date(claim.service_date),
        referral_from_settlement_id=referral_from,
        home_bed_after_transfer=claim.home_bed_after_transfer,
        out_of_area_unfiled=claim.out_of_area_unfiled, childbirth=claim.childbirth,
        use_personal_account=claim.use_account, want_trace=want_trace)
    if claim.referred_by_primary_on is not None:
        date_to_wire(claim.referred_by_primary_on, req.referred_by_primary_on)
    if claim.items:
        for it in claim.items:
            li = req.line_items.items.add(charge_class=CATEGORY_WIRE[it.category],
                                          amount_fen=it.amount_fen,
                                          selfpay_ratio_bp=it.selfpay_ratio_bp)
            if it.allowed_fen is not None:
                li.allowed_amount_fen = it.allowed_fen
    else:
        b = claim.bill
        req.amounts.CopyFrom(st.BillAmounts(total_fen=b.total_fen,
                                            full_selfpay_fen=b.full_selfpay_fen,
                                            over_limit_fen=b.over_limit_fen,
                                            pre_selfpay_fen=b.pre_selfpay_fen))
    return req
