"""``python -m server --processes N``: workers forked before any server, one port, one ledger."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from server.client import Client
from server.ledger.sqlite import SqliteLedger
from server.ledger.verify import verify
from service_fixtures import (
    ROOT, ServerProcess, add_facility, add_member, inpatient, process_exited,
)


def _insecure() -> tuple[str, ...]:
    help_text = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60).stdout
    return ("--insecure",) if "--insecure" in help_text.split() else ()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _two_workers(db) -> tuple[ServerProcess, dict]:
    """``--processes 2`` on ``db``, once both workers listen; and the supervisor's line."""
    srv = ServerProcess(str(db), "--processes", "2", *_insecure())
    try:
        sup = srv.wait_for(lambda r: r.get("event") == "supervising", timeout=30)
        srv.wait_for(lambda r: len([x for x in srv.records()
                                    if x.get("event") == "listening"]) >= 2, timeout=30)
    except BaseException:
        srv.proc.kill()
        raise
    return srv, sup


@pytest.mark.timeout(120)
def test_two_workers_share_the_port_and_the_ledger_and_drain_on_sigterm(tmp_path):
    db = tmp_path / "ledger.db"
    srv, sup = _two_workers(db)
    try:
        workers = sup["pids"]
        assert len(workers) == 2 and srv.proc.pid not in workers
        ports = {r["port"] for r in srv.records() if r.get("event") == "listening"}
        assert ports == {srv.port}
        # several connections: the kernel spreads them over the two workers
        clients = [Client(srv.target, channel=grpc.insecure_channel(
            srv.target, options=[("grpc.use_local_subchannel_pool", 1)])) for _ in range(8)]
        try:
            add_facility(clients[0], "H1", ty.FACILITY_LEVEL_1)
            add_member(clients[0], "M", account_balance_fen=1000)
            ids = []
            for k, c in enumerate(clients):
                r = c.call(c.settlement.Settle, inpatient(f"r{k}", "M", "H1", 300_000,
                                                          use_personal_account=True))
                ids.append(r.settlement.settlement_id)
            for c in clients:           # every settlement visible through every connection
                for sid in ids:
                    got = c.call(c.settlement.GetSettlement,
                                 st.GetSettlementRequest(settlement_id=sid))
                    assert got.settlement.settlement_id == sid
            # the same request again, through another connection: a replay
            r = clients[3].call(clients[3].settlement.Settle,
                                inpatient("r0", "M", "H1", 300_000, use_personal_account=True))
            assert r.replayed and r.settlement.settlement_id == ids[0]
        finally:
            for c in clients:
                c.channel.close()
        assert srv.stop(signal.SIGTERM) == 0
        end = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < end:
            time.sleep(0.05)
        assert not any(_alive(p) for p in workers)
        assert len([r for r in srv.records() if r.get("event") == "stopped"]) >= 3
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    ledger = SqliteLedger(db)
    try:
        assert len(list(ledger.journal())) == 8
        assert ledger.get_member("M").account_balance_fen == 0
        assert verify(ledger) == []
    finally:
        ledger.close()


def test_several_processes_refuse_a_memory_ledger(tmp_path):
    p = subprocess.run([sys.executable, "-m", "server", "--listen", "127.0.0.1:0", "--database",
                        "memory://", "--processes", "2", *_insecure()], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "memory://" in p.stderr


@pytest.mark.timeout(120)
def test_the_workers_settle_through_one_writer_process(tmp_path):
    db = tmp_path / "ledger.db"
    srv, sup = _two_workers(db)
    try:
        started = [r for r in srv.records() if r.get("event") == "writer process started"]
        assert len(started) == 1 and started[0]["channels"] == 2 * 16
        writer = started[0]["pid"]
        assert writer not in sup["pids"] and writer != srv.proc.pid
        clients = [Client(srv.target, channel=grpc.insecure_channel(
            srv.target, options=[("grpc.use_local_subchannel_pool", 1)])) for _ in range(8)]
        try:
            add_facility(clients[0], "H1", ty.FACILITY_LEVEL_1)
            add_member(clients[0], "M", account_balance_fen=1000)
            # With the writer stopped no worker can commit a Settle: every one waits for it.
            os.kill(writer, signal.SIGSTOP)
            try:
                for k, c in enumerate(clients):
                    with pytest.raises(grpc.RpcError) as e:
                        c.call(c.settlement.Settle, inpatient(f"r{k}", "M", "H1", 300_000),
                               timeout=0.5)
                    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            finally:
                os.kill(writer, signal.SIGCONT)
            # they commit once it goes on: the resends are replays, each settled once
            for k, c in enumerate(clients):
                r = c.call(c.settlement.Settle, inpatient(f"r{k}", "M", "H1", 300_000))
                assert r.settlement.request_id == f"r{k}"
        finally:
            for c in clients:
                c.channel.close()
        assert srv.stop(signal.SIGTERM) == 0
        end = time.monotonic() + 10
        while _alive(writer) and time.monotonic() < end:
            time.sleep(0.05)
        assert not _alive(writer)      # stopped with the last worker, reaped
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    ledger = SqliteLedger(db)
    try:
        assert sorted(r.request_id for r in ledger.journal()) == [f"r{k}" for k in range(8)]
        assert verify(ledger) == []
    finally:
        ledger.close()


@pytest.mark.timeout(120)
def test_workers_and_the_writer_stop_when_the_supervisor_is_killed(tmp_path):
    srv, sup = _two_workers(tmp_path / "ledger.db")
    try:
        writer = srv.wait_for(lambda r: r.get("event") == "writer process started")["pid"]
        with Client(srv.target) as c:
            add_facility(c, "H1", ty.FACILITY_LEVEL_1)
            add_member(c, "M")
            c.call(c.settlement.Settle, inpatient("r1", "M", "H1", 300_000))
        srv.proc.kill()                  # SIGKILL: the supervisor cannot pass anything on
        srv.proc.wait(10)
        end = time.monotonic() + 20
        left = [*sup["pids"], writer]
        while left and time.monotonic() < end:
            left = [p for p in left if not process_exited(p)]
            time.sleep(0.05)
        assert left == []
        # the workers drained: each said so
        assert len([r for r in srv.records() if r.get("event") == "stopped"]) >= 2
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()

