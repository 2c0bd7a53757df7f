"""Several server processes on one database never exceed a cap: two ``python -m server``
processes (different ports, one PostgreSQL database — and, for good measure, one SQLite file)
hammered at one member sum exactly to the cap."""
from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from reimburse.v1 import types_pb2 as ty
from server.client import Client
from service_fixtures import (
    DURABLE_BACKENDS, ServerProcess, add_facility, add_member, database_for,
    assert_cap_paid_exactly, inpatient,
)

CALLS_PER_PROCESS = 30
CAP_FEN = 20_000_000 * 5000 // 10_000   # resident, first year: tier-1 cap × 50%
PER_CLAIM_FEN = 212_500                  # 85% × (3000 − 500) yuan at LEVEL_1


@pytest.mark.parametrize("kind", DURABLE_BACKENDS)
def test_two_server_processes_at_one_member_pay_the_cap_exactly(kind, request, tmp_path):
    db = database_for(kind, request, tmp_path)
    servers = [ServerProcess(db, "--workers", "32") for _ in range(2)]
    try:
        assert servers[0].port != servers[1].port
        clients = [Client(s.target, timeout=60) for s in servers]
        add_facility(clients[0], "H1", ty.FACILITY_LEVEL_1)
        add_member(clients[1], "M", identity=ty.IDENTITY_RESIDENT, continuous_since="2018-01-01")
        total = 2 * CALLS_PER_PROCESS
        assert total * PER_CLAIM_FEN > CAP_FEN  # the cap binds
        start = threading.Barrier(total)

        def one(i: int):
            c = clients[i % 2]
            start.wait(timeout=60)
            return c.call(c.settlement.Settle,
                          inpatient(f"r{i}", "M", "H1", 300_000, day="2018-06-01")).settlement

        with ThreadPoolExecutor(total) as pool:
            results = list(pool.map(one, range(total)))
        assert_cap_paid_exactly(results, clients, CAP_FEN)  # both processes see it
        # and the same request id sent to the other process is a replay, not a second payment
        again = clients[1].call(clients[1].settlement.Settle,
                                inpatient("r0", "M", "H1", 300_000, day="2018-06-01"))
        assert again.replayed and again.settlement == results[0]
        for c in clients:
            c.close()
    finally:
        for s in servers:
            if s.proc.poll() is None:
                assert s.stop(signal.SIGTERM) == 0
    from server.ledger.base import open_ledger
    from server.ledger.verify import verify
    ledger = open_ledger(db)
    try:
        assert verify(ledger) == []
    finally:
        ledger.close()
