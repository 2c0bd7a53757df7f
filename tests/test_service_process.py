"""``python -m server`` as a process: health, reflection, logs, SIGTERM, restart on one db."""
from __future__ import annotations

import signal
import subprocess
import sys

import grpc
import pytest

from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from server.client import Client
from service_fixtures import (
    ROOT, ServerProcess, accumulators, add_facility, add_member, call_json, inpatient,
    reflected_services,
)


@pytest.fixture
def memory_process():
    p = ServerProcess("memory://")
    yield p
    if p.proc.poll() is None:
        p.stop(signal.SIGKILL)


def healthcheck(target: str) -> int:
    return subprocess.run([sys.executable, "-m", "server.healthcheck", "--target", target,
                           "--timeout", "2", "--insecure"], cwd=ROOT,
                          capture_output=True).returncode


def test_health_says_serving_and_reflection_lists_every_service(memory_process):
    assert healthcheck(memory_process.target) == 0
    services = reflected_services(memory_process.target)
    assert {"reimburse.v1.SettlementService", "reimburse.v1.RegistryService",
            "reimburse.v1.PolicyService", "grpc.health.v1.Health"} <= set(services)


def test_healthcheck_fails_when_nothing_listens():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert healthcheck(f"127.0.0.1:{port}") == 1


def test_a_json_client_using_only_reflection_can_settle(memory_process):
    t = memory_process.target
    call_json(t, "reimburse.v1.RegistryService/UpsertFacility",
              {"facility": {"facility_id": "H3", "level": "FACILITY_LEVEL_3"}})
    call_json(t, "reimburse.v1.RegistryService/UpsertMember",
              {"member": {"member_id": "M1", "identity": "IDENTITY_EMPLOYEE",
                          "continuous_since": {"year": 2010, "month": 1, "day": 1}}})
    reply = call_json(t, "reimburse.v1.SettlementService/Settle", {
        "request_id": "H3-0001", "member_id": "M1", "facility_id": "H3",
        "kind": "CLAIM_KIND_INPATIENT", "service_date": {"year": 2018, "month": 3, "day": 5},
        "amounts": {"total_fen": "1000000"}})
    assert reply["settlement"]["layers"][0]["amountFen"] == "500500"  # 55% × (10000 − 900) yuan


def test_every_call_is_one_json_log_line(memory_process):
    with Client(memory_process.target) as c:
        add_facility(c, "H3")
        with pytest.raises(grpc.RpcError):
            c.call(c.settlement.Settle, inpatient("req-42", "NOBODY", "H3", 1_000))
    rec = memory_process.wait_for(lambda r: r.get("request_id") == "req-42")
    assert rec["event"] == "rpc" and rec["method"] == "Settle"
    assert rec["member_id"] == "NOBODY" and rec["code"] == "NOT_FOUND"
    assert isinstance(rec["latency_ms"], float)
    assert memory_process.stop() == 0


def test_configuration_from_environment_variables(tmp_path):
    p = ServerProcess(None, env={"REIMBURSE_LISTEN": "127.0.0.1:0",
                                 "REIMBURSE_DATABASE": "memory://",
                                 "REIMBURSE_WORKERS": "3"})
    try:
        assert healthcheck(p.target) == 0
        assert p.wait_for(lambda r: r.get("event") == "listening")["workers"] == 3
    finally:
        assert p.stop() == 0


def test_settle_stop_restart_then_reverse_restores_the_state_before(tmp_path):
    db = str(tmp_path / "ledger.db")
    p = ServerProcess(db)
    try:
        with Client(p.target) as c:
            add_facility(c, "H3", ty.FACILITY_LEVEL_3)
            add_member(c, "M1", account_balance_fen=50_000)
            c.call(c.settlement.Settle, inpatient("r0", "M1", "H3", 500_000))
            before = accumulators(c, "M1")
            s = c.call(c.settlement.Settle, inpatient("r1", "M1", "H3", 2_000_000,
                                                      use_personal_account=True)).settlement
            after = accumulators(c, "M1")
    finally:
        assert p.stop(signal.SIGTERM) == 0
    assert any(r.get("event") == "stopped" for r in p.records())
    p = ServerProcess(db)
    try:
        with Client(p.target) as c:
            assert accumulators(c, "M1") == after
            got = c.call(c.settlement.GetSettlement,
                         st.GetSettlementRequest(settlement_id=s.settlement_id)).settlement
            assert got == s
            again = c.call(c.settlement.Settle, inpatient("r1", "M1", "H3", 2_000_000,
                                                          use_personal_account=True))
            assert again.replayed and again.settlement == s
            c.call(c.settlement.Reverse, st.ReverseRequest(settlement_id=s.settlement_id,
                                                           facility_id="H3"))
            assert accumulators(c, "M1") == before
            assert accumulators(c, "M1").account_balance_fen == 50_000
    finally:
        assert p.stop(signal.SIGINT) == 0


def test_sigterm_under_load_exits_0_and_loses_no_acknowledged_settlement(tmp_path):
    """Settle in a loop, SIGTERM meanwhile: every acknowledged settlement survives; the call
    cut off by the shutdown is refused (UNAVAILABLE or CANCELLED) and safe to resend."""
    import threading
    db = str(tmp_path / "ledger.db")
    p = ServerProcess(db)
    outcomes: dict[str, object] = {}
    with Client(p.target) as c:
        add_facility(c, "H3")
        add_member(c, "M1")
        started = threading.Event()

        def many():
            for i in range(500):
                try:
                    c.call(c.settlement.Settle, inpatient(f"d{i}", "M1", "H3", 10_000))
                    outcomes[f"d{i}"] = "ok"
                except grpc.RpcError as e:
                    outcomes[f"d{i}"] = e.code()
                    return
                finally:
                    started.set()

        t = threading.Thread(target=many)
        t.start()
        started.wait(10)
        assert p.stop() == 0
        t.join()
    refused = [code for code in outcomes.values() if code != "ok"]
    assert refused in ([], [grpc.StatusCode.UNAVAILABLE], [grpc.StatusCode.CANCELLED])
    p = ServerProcess(db)
    try:
        with Client(p.target) as c:
            for rid, outcome in outcomes.items():
                reply = c.call(c.settlement.Settle, inpatient(rid, "M1", "H3", 10_000))
                if outcome == "ok":
                    assert reply.replayed, rid
    finally:
        assert p.stop() == 0


def test_stopping_lets_a_call_in_flight_finish():
    """What serve() does on SIGTERM: health NOT_SERVING, then stop(grace) drains."""
    import threading
    import time

    from grpc_health.v1 import health
    from engine.loader import store
    from server.app import create_server
    from server.ledger.memory import MemoryLedger

    class SlowLedger(MemoryLedger):
        def settle(self, **kw):
            time.sleep(0.5)
            return super().settle(**kw)

    ledger = SlowLedger()
    hs = health.HealthServicer()
    server, port = create_server("127.0.0.1:0", ledger, store(), health_servicer=hs)
    server.start()
    with Client(f"127.0.0.1:{port}") as c:
        add_facility(c, "H3")
        add_member(c, "M1")
        result = {}
        t = threading.Thread(target=lambda: result.update(
            r=c.call(c.settlement.Settle, inpatient("slow", "M1", "H3", 10_000))))
        t.start()
        time.sleep(0.2)  # the call is inside the ledger now
        hs.enter_graceful_shutdown()
        server.stop(5).wait()
        t.join()
    assert result["r"].settlement.settlement_id
    assert [r.request_id for r in ledger.journal()] == ["slow"]


def test_an_address_it_cannot_bind_exits_2_saying_why():
    r = subprocess.run([sys.executable, "-m", "server", "--listen", "256.1.1.1:5",
                        "--database", "memory://", "--insecure"], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and '"event": "cannot listen"' in r.stderr
