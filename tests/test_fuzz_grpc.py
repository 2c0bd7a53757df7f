"""Hostile input through gRPC (hypothesis): malformed and extreme requests to every method.

Amounts near the int64 limits, 10,000 line items, empty, over-long, control-character and
unicode ids, missing fields, dates from year 1 to 9999 and impossible ones (month 13, day 0),
mismatched kinds and flags, unknown enum numbers, referrals to unknown, reversed, outpatient or
another member's settlements, and bytes that are no protobuf message at all.

Every refusal is INVALID_ARGUMENT, NOT_FOUND or FAILED_PRECONDITION — never UNKNOWN, INTERNAL
or anything else — save the two refusals the API defines for well-formed requests: a request id
reused with another body is ALREADY_EXISTS (Settle), another facility's settlement is
PERMISSION_DENIED (Reverse). The server stays SERVING, and the ledger (journal, accumulators,
account balances and movements, registry) is exactly what it was before.

A request body is first pre-settled (commits nothing: OK is allowed and shows the engine
survived the extremes); every body the server refuses to pre-settle is then sent to Settle,
which must refuse it too. Registry writes get ids that can never be valid, so none commits.
"""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as s

from engine.claims import MAX_FEN
from reimburse.v1 import policy_pb2 as pol
from reimburse.v1 import registry_pb2 as reg
from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from service_fixtures import (
    DURABLE_BACKENDS, add_facility, add_member, d, inpatient, ledger_for, running_server,
)

ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION}
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
INT64 = (-2**63, 2**63 - 1)
INT32 = (-2**31, 2**31 - 1)


@pytest.fixture(scope="module", params=DURABLE_BACKENDS)
def world(request, tmp_path_factory):
    """A server with two members, three facilities and settlements of every kind to refer to;
    yields (client, ledger, ids of the existing settlements)."""
    ledger = ledger_for(request.param, request, tmp_path_factory.mktemp("fuzz"))
    with running_server(ledger, workers=8) as srv:
        c = srv.client
        add_facility(c, "H3", ty.FACILITY_LEVEL_3)
        add_facility(c, "H2", ty.FACILITY_LEVEL_2)
        add_facility(c, "P1", ty.FACILITY_LEVEL_1)
        add_member(c, "M1", account_balance_fen=100_000, primary_facility_id="P1")
        add_member(c, "M2", identity=ty.IDENTITY_RESIDENT, account_balance_fen=MAX_FEN)
        settle = c.settlement.Settle
        ids = {
            "m1": c.call(settle, inpatient("s1", "M1", "H3", 1_000_000)).settlement,
            "m2": c.call(settle, inpatient("s2", "M2", "H2", 500_000)).settlement,
            "out": c.call(settle, st.SettleRequest(
                request_id="s3", member_id="M1", facility_id="P1",
                kind=ty.CLAIM_KIND_OUTPATIENT, service_date=d("2018-02-01"),
                amounts=st.BillAmounts(total_fen=10_000))).settlement,
            "rev": c.call(settle, inpatient("s4", "M1", "H2", 300_000)).settlement,
        }
        c.call(c.settlement.Reverse, st.ReverseRequest(settlement_id=ids["rev"].settlement_id,
                                                       facility_id="H2"))
        before = ledger.audit()
        srv.refs = {k: v.settlement_id for k, v in ids.items()}
        srv.owners = {v.settlement_id: v.facility_id for v in ids.values()}
        yield srv
        assert ledger.audit() == before, "the ledger changed under hostile input"
        reply = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def refused(call, request, also=()) -> grpc.StatusCode | None:
    """The status of the call: None if it succeeded; a code not in ALLOWED (or ``also``)
    fails the test."""
    try:
        call(request, timeout=60)
    except grpc.RpcError as e:
        assert e.code() in ALLOWED | set(also), \
            f"{e.code().name}: {e.details()}\n{request!s:.2000}"
        return e.code()
    return None


# --- strategies ------------------------------------------------------------------------------

text = s.text(alphabet=s.characters(exclude_categories=("Cs",)), max_size=140)
HOSTILE_IDS = ["", " ", " M1", "M1 ", "M1\n", "\x00", "x" * 129, "\u202eM1", "\t", "\x7f"]
ids = s.sampled_from(["M1", "M2", "H3", "H2", "P1", "NOBODY", "患者一号", "🙂" * 32,
                      "x" * 128, *HOSTILE_IDS]) | text
bad_ids = s.sampled_from(HOSTILE_IDS) | text.filter(
    lambda x: not x or len(x) > 128 or not x.isprintable() or x != x.strip())
amounts = s.sampled_from([0, 1, -1, MAX_FEN, MAX_FEN + 1, 2**31, 2**53 + 1, 2**62, *INT64]) | \
    s.integers(*INT64)
small_amounts = s.integers(0, 10**8)
int32s = s.sampled_from([0, -1, 1, 13, *INT32]) | s.integers(*INT32)
enums = s.sampled_from([0, 1, 2, 3, 4, 5, 7, 99, -1, *INT32])
dates = s.one_of(
    s.none(),
    s.sampled_from([(2018, 3, 5), (2019, 12, 31), (1, 1, 1), (9999, 12, 31), (2018, 2, 29),
                    (2018, 13, 1), (2018, 0, 10), (2018, 4, 31), (0, 1, 1), (10000, 1, 1),
                    (2018, 1, 0), (-1, -1, -1), (2020, 2, 29)]),
    s.tuples(int32s, int32s, int32s),
    s.tuples(s.integers(1, 9999), s.integers(1, 12), s.integers(1, 28)))


def put_date(parent, name: str, value) -> None:
    if value is not None:
        getattr(parent, name).CopyFrom(ty.Date(year=value[0], month=value[1], day=value[2]))


line_items = s.builds(
    lambda cc, amt, allowed, ratio, lid: st.LineItem(
        charge_class=cc, amount_fen=amt, selfpay_ratio_bp=ratio, line_id=lid,
        **({} if allowed is None else {"allowed_amount_fen": allowed})),
    enums, amounts | small_amounts, s.none() | amounts | small_amounts,
    s.sampled_from([0, 1000, 10_000, 10_001, -1]) | int32s, s.just("") | ids)


valid_dates = s.sampled_from([(2018, 3, 5), (1, 1, 1), (9999, 12, 31), (2020, 2, 29),
                               (2018, 1, 1), (2017, 12, 31), (2018, 12, 31)]) | \
    s.dates().map(lambda x: (x.year, x.month, x.day))
fen = s.sampled_from([0, 1, MAX_FEN - 1, MAX_FEN]) | s.integers(0, MAX_FEN) | small_amounts


@s.composite
def valid_items(draw):
    cc = draw(s.sampled_from([ty.CHARGE_CLASS_A, ty.CHARGE_CLASS_B, ty.CHARGE_CLASS_C]))
    it = st.LineItem(charge_class=cc, amount_fen=draw(fen))
    if cc != ty.CHARGE_CLASS_C and draw(s.booleans()):
        it.allowed_amount_fen = draw(fen)
    if cc == ty.CHARGE_CLASS_B:
        it.selfpay_ratio_bp = draw(s.integers(0, 10_000))
    return it


@s.composite
def settle_bodies(draw, refs: dict[str, str]):
    """A plausible body (registered member and facility, extreme but valid values) with 0–3
    hostile changes, so that both the boundary and the evaluation behind it are exercised."""
    kind = draw(s.sampled_from([ty.CLAIM_KIND_INPATIENT, ty.CLAIM_KIND_OUTPATIENT]))
    inpatient_ = kind == ty.CLAIM_KIND_INPATIENT
    req = st.SettleRequest(
        request_id=draw(s.sampled_from(["fz", "s1", "s3"])), member_id=draw(
            s.sampled_from(["M1", "M2"])), facility_id=draw(s.sampled_from(["H3", "H2", "P1"])),
        kind=kind, use_personal_account=draw(s.booleans()), want_trace=draw(s.booleans()))
    put_date(req, "service_date", draw(valid_dates))
    if inpatient_:
        req.referral_from_settlement_id = draw(s.just("") | s.sampled_from(
            sorted(refs.values())))
        req.home_bed_after_transfer = draw(s.booleans())
        req.out_of_area_unfiled = draw(s.booleans())
        req.childbirth = draw(s.booleans())
    elif draw(s.booleans()):
        put_date(req, "referred_by_primary_on", draw(valid_dates))
    bill = draw(s.sampled_from(["items", "amounts", "big"]))
    if bill == "items":
        req.line_items.items.extend(draw(s.lists(valid_items(), min_size=1, max_size=12)))
    elif bill == "amounts":
        total = draw(fen)
        parts = [draw(s.integers(0, total)) for _ in range(3)]
        fsp = parts[0]
        olim = min(parts[1], total - fsp)
        psp = min(parts[2], total - fsp - olim)
        req.amounts.CopyFrom(st.BillAmounts(total_fen=total, full_selfpay_fen=fsp,
                                            over_limit_fen=olim, pre_selfpay_fen=psp))
    else:
        n = draw(s.sampled_from([10_000, 10_001]))
        amt = draw(s.sampled_from([1, 100_000, 100_000_000, MAX_FEN]))
        req.line_items.items.extend(
            [st.LineItem(charge_class=ty.CHARGE_CLASS_B, amount_fen=amt, selfpay_ratio_bp=1000,
                         allowed_amount_fen=amt // 2)] * n)

    hostile = {
        "request_id": lambda: setattr(req, "request_id", draw(ids)),
        "member_id": lambda: setattr(req, "member_id", draw(ids)),
        "facility_id": lambda: setattr(req, "facility_id", draw(ids)),
        "kind": lambda: setattr(req, "kind", draw(enums)),
        "service_date": lambda: (req.ClearField("service_date"),
                                 put_date(req, "service_date", draw(dates))),
        "referred_by_primary_on": lambda: put_date(req, "referred_by_primary_on",
                                                   draw(dates.filter(bool))),
        "referral": lambda: setattr(req, "referral_from_settlement_id", draw(ids)),
        "flags": lambda: [setattr(req, f, draw(s.booleans())) for f in (
            "home_bed_after_transfer", "out_of_area_unfiled", "childbirth")],
        "amounts": lambda: req.amounts.CopyFrom(st.BillAmounts(
            total_fen=draw(amounts), full_selfpay_fen=draw(amounts | s.just(0)),
            over_limit_fen=draw(amounts | s.just(0)), pre_selfpay_fen=draw(amounts | s.just(0)))),
        "items": lambda: req.line_items.items.extend(draw(s.lists(line_items, max_size=5))),
        "an_item": lambda: (req.line_items.items[
            draw(s.integers(0, len(req.line_items.items) - 1))].CopyFrom(draw(line_items))
            if req.line_items.items else None),
        "no_bill": lambda: (req.ClearField("line_items"), req.ClearField("amounts"),
                            draw(s.booleans()) and req.line_items.SetInParent()),
    }
    for name in draw(s.lists(s.sampled_from(sorted(hostile)), max_size=3, unique=True)):
        hostile[name]()
    return req


# --- the tests -------------------------------------------------------------------------------

def test_settle_and_presettle_refuse_hostile_bodies_cleanly(world):
    c = world.client

    @settings(FUZZ, max_examples=400)
    @given(s.data())
    def run(data):
        req = data.draw(settle_bodies(world.refs))
        pre = refused(c.settlement.PreSettle, req)
        if pre is not None:  # refused without committing: Settle must refuse it as well
            assert refused(c.settlement.Settle, req, also={grpc.StatusCode.ALREADY_EXISTS}) \
                is not None, "Settle accepted it"
    run()


@pytest.mark.parametrize("extreme", [MAX_FEN, 1])
def test_ten_thousand_line_items_at_the_extremes(world, extreme):
    c = world.client
    req = inpatient("", "M1", "H3", 0, want_trace=True, use_personal_account=True)
    req.ClearField("amounts")
    req.line_items.items.extend([st.LineItem(charge_class=ty.CHARGE_CLASS_A,
                                             amount_fen=extreme)] * 10_000)
    code = refused(c.settlement.PreSettle, req)
    assert code == (grpc.StatusCode.INVALID_ARGUMENT if extreme == MAX_FEN else None)
    req.request_id, req.member_id = "big", "NOBODY"
    assert refused(c.settlement.Settle, req) is not None


def test_reverse_refuses_hostile_requests(world):
    c = world.client
    owners = world.owners

    @FUZZ
    @given(s.sampled_from(sorted(owners)) | ids, ids, s.just("") | ids)
    def run(sid, fid, rid):
        if owners.get(sid) == fid:
            return  # the owner's own reversal is legitimate (tests/test_service_settlement.py)
        assert refused(c.settlement.Reverse, st.ReverseRequest(
            settlement_id=sid, facility_id=fid, request_id=rid),
            also={grpc.StatusCode.PERMISSION_DENIED}) is not None
    run()


def test_reads_refuse_hostile_requests(world):
    c = world.client

    @FUZZ
    @given(s.sampled_from(sorted(world.owners)) | ids, ids, int32s, dates, dates,
           s.just("jiangmen") | ids)
    def run(sid, mid, year, as_of, day, region):
        refused(c.settlement.GetSettlement, st.GetSettlementRequest(settlement_id=sid))
        acc = st.GetAccumulatorsRequest(member_id=mid, year=year)
        put_date(acc, "as_of", as_of)
        refused(c.settlement.GetAccumulators, acc)
        refused(c.registry.GetMember, reg.GetMemberRequest(member_id=mid))
        refused(c.registry.GetFacility, reg.GetFacilityRequest(facility_id=mid))
        p = pol.GetPolicyRequest(region=region)
        put_date(p, "date", day)
        refused(c.policy.GetPolicy, p)
    run()


def test_registry_writes_refuse_hostile_records(world):
    c = world.client

    @FUZZ
    @given(bad_ids, enums, s.lists(enums, max_size=5), s.booleans(), s.booleans(), dates,
           dates, dates, amounts, ids, ids, s.just("") | ids)
    def run(mid, identity, groups, retired, maternity, since, start, end, balance, fac,
            district, region):
        m = reg.Member(member_id=mid, identity=identity, groups=groups, retired=retired,
                       maternity_eligible=maternity, account_balance_fen=balance,
                       primary_facility_id=fac, other_facility_id=fac, district=district,
                       region=region)
        put_date(m, "continuous_since", since)
        put_date(m, "benefit_start", start)
        put_date(m, "benefit_end", end)
        assert refused(c.registry.UpsertMember, reg.UpsertMemberRequest(member=m)) is not None
        f = reg.Facility(facility_id=mid, level=identity, district=district, name=fac)
        assert refused(c.registry.UpsertFacility,
                       reg.UpsertFacilityRequest(facility=f)) is not None
    run()
    assert refused(c.registry.UpsertMember, reg.UpsertMemberRequest()) is not None
    assert refused(c.registry.UpsertFacility, reg.UpsertFacilityRequest()) is not None


RAW_METHODS = ["/reimburse.v1.SettlementService/Settle",
               "/reimburse.v1.SettlementService/PreSettle",
               "/reimburse.v1.SettlementService/Reverse",
               "/reimburse.v1.SettlementService/GetSettlement",
               "/reimburse.v1.SettlementService/GetAccumulators",
               "/reimburse.v1.RegistryService/GetMember",
               "/reimburse.v1.RegistryService/GetFacility",
               "/reimburse.v1.PolicyService/GetPolicy"]
if hasattr(st, "SettleBatchRequest"):  # issue 4's batches
    RAW_METHODS += ["/reimburse.v1.SettlementService/SettleBatch",
                    "/reimburse.v1.SettlementService/PreSettleBatch"]


def test_bytes_that_are_no_message_are_invalid_argument(world):
    """Garbage, truncated messages, invalid UTF-8 in a string field, wrong wire types."""
    channel = world.client.channel
    calls = {m: channel.unary_unary(m, request_serializer=None, response_deserializer=None)
             for m in RAW_METHODS}
    known_bad = [b"\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x12\x80\x80\x80\x80\x80\x80"
                 b"\x80\x80\x80\x80\x01", b"\x0b", b"\x08" + b"\xff" * 11]
    for m, call in calls.items():
        for raw in known_bad:
            with pytest.raises(grpc.RpcError) as e:
                call(raw, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (m, raw)

    @FUZZ
    @given(s.sampled_from(RAW_METHODS), s.binary(max_size=300))
    def run(method, raw):
        refused(calls[method], raw)
    run()
