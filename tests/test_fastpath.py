"""The service's kernel wire path (server.fastpath) builds exactly what the general path builds.

The general path is the engine's kernel adapter (``engine.kernel.settle``, which the agreement
tests hold to the reference) followed by ``views.accumulators_view`` and
``convert.settlement_to_wire``. For random members, claims, facility levels and accumulators
both must give the same serialized Settlement and the same ledger outcome.
"""
from __future__ import annotations

import random
from datetime import date, timedelta

import pytest

from engine.loader import store
from engine.model import Accumulators
from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from server import convert
from server.ledger.base import MemberRecord, MemberState
from server.ledger.memory import MemoryLedger
from server.service import Core

GROUPS = ("FIVE_GUARANTEE", "POVERTY_REGISTERED", "MINIMUM_LIVING", "EXTREME_HARDSHIP")


def _case(rng: random.Random, policies):
    employee = rng.random() < 0.5
    m = MemberRecord(
        "M", "EMPLOYEE" if employee else "RESIDENT",
        date(2010 + rng.randrange(9), rng.randrange(1, 13), 1),
        retired=employee and rng.random() < 0.3,
        groups=frozenset(g for g in GROUPS if rng.random() < 0.2
                         and (not employee or g != "FIVE_GUARANTEE")),
        maternity_eligible=rng.random() < 0.2,
        primary_facility=rng.choice([None, "H1", "H2"]),
        other_facility=rng.choice([None, "H1", "H2"]) if employee else None,
        account_balance_fen=rng.randrange(100_000))
    day = max(m.continuous_since, date(2018, 1, 1)) + timedelta(days=rng.randrange(200))
    inpatient = rng.random() < 0.5
    total = rng.randrange(10 ** rng.randrange(1, 10))
    req = st.SettleRequest(
        request_id="r", member_id="M", facility_id=rng.choice(["H1", "H2", "H3"]),
        kind=ty.CLAIM_KIND_INPATIENT if inpatient else ty.CLAIM_KIND_OUTPATIENT,
        service_date=ty.Date(year=day.year, month=day.month, day=day.day),
        use_personal_account=rng.random() < 0.5)
    if rng.random() < 0.8:
        full = rng.randrange(total // 3 + 1)
        req.amounts.CopyFrom(st.BillAmounts(total_fen=total, full_selfpay_fen=full,
                                            over_limit_fen=rng.randrange(total - full + 1)))
    else:
        for _ in range(rng.randrange(1, 5)):
            it = req.line_items.items.add(charge_class=rng.choice([1, 2, 3]),
                                          amount_fen=rng.randrange(1, 10 ** 7))
            if it.charge_class == ty.CHARGE_CLASS_B:
                it.selfpay_ratio_bp = rng.randrange(0, 3001)
            if it.charge_class != ty.CHARGE_CLASS_C and rng.random() < 0.3:
                it.allowed_amount_fen = rng.randrange(it.amount_fen + 1)
    if inpatient:
        req.out_of_area_unfiled = rng.random() < 0.2
        req.childbirth = rng.random() < 0.1
        req.home_bed_after_transfer = rng.random() < 0.1
    elif rng.random() < 0.3:
        r = day - timedelta(days=rng.randrange(40))
        req.referred_by_primary_on.CopyFrom(ty.Date(year=r.year, month=r.month, day=r.day))
    ids = [layer.id for layer in policies.policy_for("jiangmen", day).layers]
    acc = Accumulators(day.year,
                       {k: rng.randrange(10 ** rng.randrange(1, 8)) for k in ids
                        if rng.random() < 0.5},
                       {k: rng.randrange(10 ** 8) for k in ids if rng.random() < 0.5})
    chain = rng.randrange(100_000) if inpatient and rng.random() < 0.2 else 0
    if chain:
        req.referral_from_settlement_id = "S0"
    level = rng.choice(["LEVEL_1", "LEVEL_2", "LEVEL_3", "NON_DESIGNATED"])
    return m, req, acc, level, chain


def fast_and_general(policies) -> tuple[Core, Core]:
    """Two cores over the same policies: the kernel's wire path and the general path."""
    fast = Core(MemoryLedger(), policies, "kernel")
    general = Core(MemoryLedger(), policies, "kernel")
    general.fast = False
    assert fast.fast
    return fast, general


@pytest.mark.parametrize("seed", range(4))
def test_the_wire_path_builds_the_same_settlement_and_outcome_as_the_general_path(seed):
    policies = store()
    fast, general = fast_and_general(policies)
    rng = random.Random(seed)
    for _ in range(500):
        m, req, acc, level, chain = _case(rng, policies)
        call = convert.validate_settle(req, require_request_id=True)
        state = MemberState(m, acc, m.account_balance_fen)
        o1, msg1 = fast.evaluate(call, level, chain, state)
        o2, msg2 = general.evaluate(call, level, chain, state)
        assert o1.result == o2.result == msg2.SerializeToString()
        assert msg1 == msg2
        assert dict(o1.deltas) == dict(o2.deltas)
        assert (o1.account_paid_fen, o1.chain_deductible_after_fen, o1.policy_version,
                o1.fund_total_fen) == (o2.account_paid_fen, o2.chain_deductible_after_fen,
                                       o2.policy_version, o2.fund_total_fen)


def test_a_traced_call_still_takes_the_reference():
    policies = store()
    core = Core(MemoryLedger(), policies, "kernel")
    rng = random.Random(9)
    m, req, acc, level, chain = _case(rng, policies)
    req.want_trace = True
    call = convert.validate_settle(req, require_request_id=True)
    _, msg = core.evaluate(call, level, chain, MemberState(m, acc, m.account_balance_fen))
    assert len(msg.trace) > 0
