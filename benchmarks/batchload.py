"""Batch payloads for the load harness: ``SettleBatchRequest`` columns of synthetic claims.

A batch holds ``--batch`` claims (default 1000) of ``--batch-members`` members (default 100:
about ten claims a member, as a year-end re-settlement run sorted by member sends them), in date
order per member. ``batch-settle`` gives every claim of every call a new request id.
"""
from __future__ import annotations

import random

from benchmarks import workload
from reimburse.v1 import settlement_pb2 as st

VARIANTS = 8   # distinct batches per client, cycled


def batch_columns(pop: workload.Population, n: int, n_members: int, seed: int):
    rng = random.Random(seed)
    chosen = rng.sample(range(len(pop.members)), min(n_members, len(pop.members)))
    sub = workload.Population(pop.prefix, pop.facilities, [pop.members[i] for i in chosen],
                              {k for k, i in enumerate(chosen) if i in pop.heavy})
    claims = sorted(workload.claims(sub, n, seed=seed + 1), key=lambda c: (c.member, c.day))
    return st.ClaimColumns(
        member_ids=[m.member_id for m in sub.members],
        facility_ids=[f.facility_id for f in sub.facilities],
        member=[c.member for c in claims], facility=[c.facility for c in claims],
        kind=[c.kind for c in claims],
        service_date=[c.day.year * 10000 + c.day.month * 100 + c.day.day for c in claims],
        total_fen=[c.total for c in claims], full_selfpay_fen=[c.full_selfpay for c in claims],
        over_limit_fen=[c.over_limit for c in claims],
        pre_selfpay_fen=[c.pre_selfpay for c in claims],
        flags=[int(c.use_account) | int(c.out_of_area) << 2 for c in claims])


def batch_payloads(pop, mode: str, cfg: dict, client: int, tag: str):
    from server import _wire
    n, members = cfg["batch"], cfg.get("batch_members", 100)
    inner = [batch_columns(pop, n, members, cfg["seed"] * 7919 + client * 101 + v)
             .SerializeToString() for v in range(VARIANTS)]
    pre = mode.startswith("batch-presettle")
    method = ("/reimburse.v1.SettlementService/PreSettleBatch" if pre
              else "/reimburse.v1.SettlementService/SettleBatch")
    if pre:
        payloads = [_wire.length_delimited(1, b) for b in inner]
        return (lambda i: payloads[i % VARIANTS]), (lambda i: method)

    def make(i: int) -> bytes:
        ids = _wire.strings(13, [f"{tag}-{i}-{k}" for k in range(n)])
        return _wire.length_delimited(1, inner[i % VARIANTS] + ids)
    return make, (lambda i: method)
