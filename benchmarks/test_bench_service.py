"""pytest-benchmark: the service's settlement paths in process (no gRPC), in one group.

    .venv/bin/python -m pytest benchmarks/test_bench_service.py

What a call costs the server besides the transport: PreSettle through the servicer (the
general path over engine objects, the kernel wire path of ``server.fastpath`` and the
request's bytes answered in C by ``server._single``), and a
1000-claim PreSettleBatch (C decode, kernel batch, C encode). Over the wire, with the echo RPC
as the baseline, see ``python -m benchmarks.load`` and tests/test_performance_ratios.py. No
test asserts a time.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from benchmarks import batchload, workload
from engine.loader import store
from reimburse.v1 import settlement_pb2 as st
from server import _wire, batch
from server.ledger.sqlite import SqliteLedger
from server.service import Core, SettlementServicer

GROUP = "service paths in process"


class _Ctx:
    def time_remaining(self):
        return None

    def abort(self, *a):
        raise RuntimeError(a)

    def abort_with_status(self, s):
        raise RuntimeError(s)


@pytest.fixture(scope="module")
def setup():
    d = tempfile.mkdtemp()
    ledger = SqliteLedger(Path(d) / "ledger.db")
    pop = workload.population(2000, seed=5, prefix="P")
    workload.register_in(ledger, pop)
    reqs = [workload.settle_request(pop, c).SerializeToString()
            for c in workload.claims(pop, 512, seed=6)]
    cols = batchload.batch_columns(pop, 1000, 100, 7)
    yield ledger, reqs, _wire.length_delimited(1, cols.SerializeToString())
    ledger.close()


def _presettle(servicer, reqs):
    ctx = _Ctx()
    for raw in reqs:
        servicer.PreSettle(st.SettleRequest.FromString(raw), ctx).SerializeToString()


def _presettle_wire(servicer, reqs):
    ctx = _Ctx()
    for raw in reqs:
        servicer.PreSettleWire(raw, ctx)


@pytest.mark.parametrize("path", ["general", "fast", "wire"])
def test_presettle_512_claims_through_the_servicer(benchmark, setup, path):
    # general: engine objects and views; fast: the kernel wire path in Python
    # (server.fastpath.settle); wire: the request's bytes in and the reply's out, in C for
    # these claims (server._single), as the server calls it
    ledger, reqs, _ = setup
    core = Core(ledger, store(), "kernel")
    core.fast = path != "general"
    benchmark.group = GROUP
    benchmark.pedantic(_presettle_wire if path == "wire" else _presettle,
                       args=(SettlementServicer(core), reqs), rounds=10)


def test_presettle_batch_of_1000_claims(benchmark, setup):
    ledger, _, data = setup
    svc = batch.BatchService(Core(ledger, store(), "kernel"))
    benchmark.group = GROUP
    out = benchmark.pedantic(lambda: svc.pre_settle(batch.RawBatch(data), _Ctx()), rounds=50)
    res = st.SettleBatchResponse.FromString(out).results
    assert len(res.code) == 1000 and not any(res.code)


def test_decode_a_batch_of_1000_claims(benchmark, setup):
    _, _, data = setup
    benchmark.group = GROUP
    benchmark(_wire.decode_batch, data)
