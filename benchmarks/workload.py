"""Synthetic members, facilities and claims for the load harness, as wire messages.

Deterministic from a seed, so that every client process of a run builds the same population
without talking to the others:

- facilities: every level (1, 2, 3 and non-designated; a few registered ``designated: false``);
- members: employees (about 60 %, a quarter of them retired) and residents, every special group
  (five-guarantee residents only), some maternity-eligible, contribution runs from 2000 to the
  claim year (recent ones get continuity-scaled caps), a primary facility and for employees an
  other facility, personal-account balances;
- claims of 2018 (the bundled policy's year), pre-aggregated amounts (``BillAmounts``): about
  80 % outpatient visits (log-normal, median about 150 yuan), 20 % admissions (log-normal,
  median about 8,000 yuan, with self-pay parts), and a few "heavy" members whose admissions
  (log-normal around 150,000 yuan) reach the annual caps within a run.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import date, timedelta

from reimburse.v1 import registry_pb2 as reg
from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty

YEAR = 2018
LEVELS = (ty.FACILITY_LEVEL_1, ty.FACILITY_LEVEL_2, ty.FACILITY_LEVEL_3,
          ty.FACILITY_LEVEL_NON_DESIGNATED)
GROUPS = (ty.GROUP_FIVE_GUARANTEE, ty.GROUP_POVERTY_REGISTERED, ty.GROUP_MINIMUM_LIVING,
          ty.GROUP_EXTREME_HARDSHIP)


def _date(d: date) -> ty.Date:
    return ty.Date(year=d.year, month=d.month, day=d.day)


@dataclass
class Population:
    prefix: str
    facilities: list[reg.Facility]
    members: list[reg.Member]
    heavy: set[int]                  # indices of members whose bills reach the caps

    def facility_ids(self) -> list[str]:
        return [f.facility_id for f in self.facilities]


def population(n_members: int = 2000, n_facilities: int = 24, seed: int = 1,
               prefix: str = "L") -> Population:
    rng = random.Random(seed)
    facilities = []
    for i in range(n_facilities):
        level = LEVELS[i % len(LEVELS)]
        f = reg.Facility(facility_id=f"{prefix}H{i}", level=level, district="440703",
                         name=f"load facility {i}")
        if level != ty.FACILITY_LEVEL_NON_DESIGNATED and i % 11 == 5:
            f.designated = False
        facilities.append(f)
    designated = [f.facility_id for f in facilities if f.level != ty.FACILITY_LEVEL_NON_DESIGNATED]
    members, heavy = [], set()
    for i in range(n_members):
        employee = rng.random() < 0.6
        m = reg.Member(member_id=f"{prefix}M{i}",
                       identity=ty.IDENTITY_EMPLOYEE if employee else ty.IDENTITY_RESIDENT,
                       retired=employee and rng.random() < 0.25,
                       maternity_eligible=rng.random() < 0.1,
                       account_balance_fen=rng.randrange(0, 300_000) if employee else 0,
                       district="440703")
        m.groups.extend(g for g in GROUPS if (not employee or g != ty.GROUP_FIVE_GUARANTEE)
                        and rng.random() < 0.04)
        since = date(2000, 1, 1) + timedelta(days=rng.randrange((date(YEAR, 1, 1)
                                                                 - date(2000, 1, 1)).days))
        if rng.random() < 0.1:   # a recent start: continuity-scaled caps
            since = date(YEAR - 1, 1, 1) + timedelta(days=rng.randrange(300))
        m.continuous_since.CopyFrom(_date(since))
        m.primary_facility_id = rng.choice(designated)
        if employee:
            m.other_facility_id = rng.choice(designated)
        if rng.random() < 0.02:
            heavy.add(i)
        members.append(m)
    return Population(prefix, facilities, members, heavy)


def register_in(ledger, pop: Population) -> None:
    """Register ``pop``'s facilities and members straight into ``ledger`` (no gRPC: tests and
    in-process benchmarks; ``benchmarks.load.register`` does it through RegistryService)."""
    from server import convert   # the workload itself needs only the messages

    for f in pop.facilities:
        ledger.upsert_facility(convert.facility_from_wire(f))
    for m in pop.members:
        ledger.upsert_member(convert.member_from_wire(m))


def lognormal_fen(rng: random.Random, median_yuan: float, sigma: float,
                  cap_fen: int = 10**10) -> int:
    return max(1, min(cap_fen, int(median_yuan * 100 * math.exp(rng.gauss(0, sigma)))))


@dataclass
class Claim:
    member: int                      # index into Population.members
    facility: int                    # index into Population.facilities
    kind: int
    day: date
    total: int
    full_selfpay: int
    over_limit: int
    pre_selfpay: int
    use_account: bool
    out_of_area: bool = False


def claims(pop: Population, n: int, seed: int = 2) -> list[Claim]:
    """``n`` claims of random members of ``pop`` on random days of YEAR."""
    rng = random.Random(seed)
    nm, nf = len(pop.members), len(pop.facilities)
    heavy = sorted(pop.heavy)
    out = []
    for _ in range(n):
        if heavy and rng.random() < 0.02:
            i = rng.choice(heavy)
            total = lognormal_fen(rng, 150_000, 0.6)
            kind = ty.CLAIM_KIND_INPATIENT
        else:
            i = rng.randrange(nm)
            if rng.random() < 0.8:
                kind, total = ty.CLAIM_KIND_OUTPATIENT, lognormal_fen(rng, 150, 1.0)
            else:
                kind, total = ty.CLAIM_KIND_INPATIENT, lognormal_fen(rng, 8_000, 1.2)
        m = pop.members[i]
        since = date(m.continuous_since.year, m.continuous_since.month, m.continuous_since.day)
        start = max(date(YEAR, 1, 1), since)
        day = start + timedelta(days=rng.randrange((date(YEAR, 12, 31) - start).days + 1))
        full = int(total * rng.random() * 0.15) if rng.random() < 0.5 else 0
        over = int((total - full) * rng.random() * 0.05) if rng.random() < 0.2 else 0
        pre = int((total - full - over) * rng.random() * 0.1) if rng.random() < 0.4 else 0
        out.append(Claim(i, rng.randrange(nf), kind, day, total, full, over, pre,
                         use_account=m.account_balance_fen > 0 and rng.random() < 0.5,
                         out_of_area=kind == ty.CLAIM_KIND_INPATIENT and rng.random() < 0.03))
    return out


def settle_request(pop: Population, c: Claim, request_id: str = "") -> st.SettleRequest:
    req = st.SettleRequest(
        request_id=request_id, member_id=pop.members[c.member].member_id,
        facility_id=pop.facilities[c.facility].facility_id, kind=c.kind,
        service_date=_date(c.day), use_personal_account=c.use_account,
        out_of_area_unfiled=c.out_of_area,
        amounts=st.BillAmounts(total_fen=c.total, full_selfpay_fen=c.full_selfpay,
                               over_limit_fen=c.over_limit, pre_selfpay_fen=c.pre_selfpay))
    return req


def request_id_field(request_id: str) -> bytes:
    """``request_id`` (field 1) encoded, to put before a request's other fields."""
    data = request_id.encode()
    return b"\x0a" + bytes([len(data)]) + data if len(data) < 128 else \
        st.SettleRequest(request_id=request_id).SerializeToString()
