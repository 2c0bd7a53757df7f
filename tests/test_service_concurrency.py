"""Concurrent Settle calls at one member never exceed a cap: they sum to it exactly."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from reimburse.v1 import types_pb2 as ty
from service_fixtures import (
    BACKENDS, add_facility, add_member, assert_cap_paid_exactly, inpatient,
    ledger_for, running_server,
)

CALLS = 60
# A resident in the first year of contributions: tier-1 cap 200,000 yuan × 50%.
CAP_FEN = 20_000_000 * 5000 // 10_000
TOTAL_FEN = 300_000  # per claim at LEVEL_1: 85% × (3000 − 500 yuan) = 2125 yuan of tier 1


@pytest.mark.parametrize("kind", BACKENDS)
def test_sixty_concurrent_settlements_at_one_member_pay_the_cap_exactly(kind, request,
                                                                         tmp_path):
    ledger = ledger_for(kind, request, tmp_path)
    with running_server(ledger, workers=CALLS + 4) as srv:
        c = srv.client
        add_facility(c, "H1", ty.FACILITY_LEVEL_1)
        add_member(c, "M", identity=ty.IDENTITY_RESIDENT, continuous_since="2018-01-01")
        assert CALLS * 212_500 > CAP_FEN  # the cap binds
        start = threading.Barrier(CALLS)

        def one(i: int):
            start.wait()
            return c.call(c.settlement.Settle,
                          inpatient(f"r{i}", "M", "H1", TOTAL_FEN, day="2018-06-01"),
                          timeout=60).settlement

        with ThreadPoolExecutor(CALLS) as pool:
            results = list(pool.map(one, range(CALLS)))
        assert_cap_paid_exactly(results, [c], CAP_FEN)
