"""Helpers and fixtures for the service tests: real servers on 127.0.0.1, in-process or not.

Import what a test module needs: ``from service_fixtures import memory_server, ...`` (pytest
puts tests/ on sys.path). In-process servers run on a thread pool inside the test process; a
``ServerProcess`` is ``python -m server`` in a subprocess, for signals and restarts.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from engine.loader import store
from reimburse.v1 import registry_pb2 as reg
from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from server.app import create_server
from server.client import Client
from server.ledger.memory import MemoryLedger

ROOT = Path(__file__).resolve().parent.parent


def golden_files() -> list[Path]:
    """tests/golden/*.json, or ../shared/golden when the copy is not there."""
    for d in (ROOT / "tests" / "golden", ROOT.parent / "shared" / "golden"):
        files = sorted(d.glob("*.json"))
        if files:
            return files
    raise FileNotFoundError("no golden scenario files in tests/golden or ../shared/golden")


def sqlite_ledger(path: Path):
    """The real SQLite ledger (server/ledger/sqlite.py)."""
    from server.ledger.sqlite import SqliteLedger
    return SqliteLedger(str(path))


def pg_url(request) -> str:
    """The session's scratch PostgreSQL database (``ledger_fixtures.pg_database``: skipped
    with the reason when unreachable, a failure when CI is set), its tables dropped."""
    from ledger_fixtures import Backend
    url = request.getfixturevalue("pg_database")
    Backend("postgres", url).reset()
    return url


def pg_ledger(url: str, **kw):
    """The real PostgreSQL ledger (server/ledger/postgres.py) on ``url``."""
    from server.ledger.postgres import PostgresLedger
    return PostgresLedger(url, **kw)


# The backends every service test runs on; "postgres" is marked (pytest -m "not postgres").
BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
DURABLE_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def ledger_for(kind: str, request, tmp_path: Path, **kw):
    """A fresh, empty ledger of ``kind`` (memory, sqlite or postgres) for one test."""
    if kind == "memory":
        return MemoryLedger()
    if kind == "sqlite":
        return sqlite_ledger(tmp_path / "ledger.db")
    return pg_ledger(pg_url(request), **kw)


def database_for(kind: str, request, tmp_path: Path) -> str:
    """A fresh, empty database for ``python -m server --database``: an SQLite path or the
    scratch PostgreSQL URL (tables dropped)."""
    return str(tmp_path / "ledger.db") if kind == "sqlite" else pg_url(request)


@dataclass
class Running:
    server: grpc.Server
    port: int
    ledger: object
    client: Client

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextmanager
def running_server(ledger, policies=None, **kw) -> Iterator[Running]:
    server, port = create_server("127.0.0.1:0", ledger, policies or store(), **kw)
    server.start()
    client = Client(f"127.0.0.1:{port}")
    try:
        yield Running(server, port, ledger, client)
    finally:
        client.close()
        server.stop(None).wait()
        ledger.close()


@pytest.fixture
def memory_server() -> Iterator[Running]:
    with running_server(MemoryLedger()) as r:
        yield r


@pytest.fixture
def sqlite_server(tmp_path) -> Iterator[Running]:
    with running_server(sqlite_ledger(tmp_path / "ledger.db")) as r:
        yield r


@pytest.fixture(params=BACKENDS)
def any_server(request, tmp_path) -> Iterator[Running]:
    """The same service tests on the in-memory fake and on the real SQLite and PostgreSQL
    ledgers."""
    with running_server(ledger_for(request.param, request, tmp_path)) as r:
        yield r


# --- building requests -------------------------------------------------------------------

def d(text: str) -> ty.Date:
    x = date.fromisoformat(text)
    return ty.Date(year=x.year, month=x.month, day=x.day)


def add_facility(client: Client, facility_id: str, level=ty.FACILITY_LEVEL_3,
                 designated: bool | None = None) -> reg.Facility:
    f = reg.Facility(facility_id=facility_id, level=level)
    if designated is not None:
        f.designated = designated
    return client.call(client.registry.UpsertFacility, reg.UpsertFacilityRequest(facility=f))


def add_member(client: Client, member_id: str, **fields) -> reg.Member:
    """An employee contributing since 2010 unless told otherwise; dates as ISO strings."""
    fields.setdefault("identity", ty.IDENTITY_EMPLOYEE)
    fields.setdefault("continuous_since", "2010-01-01")
    for k in ("continuous_since", "benefit_start", "benefit_end"):
        if k in fields:
            fields[k] = d(fields[k])
    m = reg.Member(member_id=member_id, **fields)
    return client.call(client.registry.UpsertMember, reg.UpsertMemberRequest(member=m))


def inpatient(request_id: str, member_id: str, facility_id: str, total_fen: int,
              day: str = "2018-03-05", **fields) -> st.SettleRequest:
    """An inpatient claim of one pre-aggregated, all-in-scope amount."""
    return st.SettleRequest(request_id=request_id, member_id=member_id,
                            facility_id=facility_id, kind=ty.CLAIM_KIND_INPATIENT,
                            service_date=d(day), amounts=st.BillAmounts(total_fen=total_fen),
                            **fields)


def accumulators(client: Client, member_id: str, year: int = 2018, as_of: str = "2018-12-31"):
    return client.call(client.settlement.GetAccumulators, st.GetAccumulatorsRequest(
        member_id=member_id, year=year, as_of=d(as_of)))


# --- a server in a subprocess ------------------------------------------------------------

class ServerProcess:
    """``python -m server`` on 127.0.0.1:0; its port read from the "listening" log line."""

    def __init__(self, database: str | None, *args: str, env: dict | None = None,
                 insecure: bool = True):
        """``database`` None: neither --listen nor --database is passed (configure by env).
        ``insecure``: pass --insecure (plaintext, no authentication), as tests on 127.0.0.1 do
        unless they test TLS and authentication."""
        self.lines: list[str] = []
        self._listening = threading.Event()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        where = [] if database is None else ["--listen", "127.0.0.1:0", "--database", database]
        if insecure:
            where.append("--insecure")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", *where, *args], cwd=ROOT, env=full_env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.port = 0
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(30):
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "listening":
                self.port = rec["port"]
                self._listening.set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def records(self) -> list[dict]:
        out = []
        for line in list(self.lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def wait_for(self, predicate, timeout: float = 5) -> dict:
        """The first log record matching ``predicate`` (log lines arrive asynchronously)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for rec in self.records():
                if predicate(rec):
                    return rec
            time.sleep(0.02)
        raise AssertionError("no such log line:\n" + "\n".join(self.lines))


def process_exited(pid: int) -> bool:
    """Gone from the process table, or a zombie waiting for its parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


# --- reflection ----------------------------------------------------------------------------

def reflected_services(target: str) -> list[str]:
    """The services a server lists through reflection, as grpcurl sees them."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
    with grpc.insecure_channel(target) as channel:
        return sorted(ProtoReflectionDescriptorDatabase(channel).get_services())


def call_json(target: str, method: str, body: dict) -> dict:
    """Call ``package.Service/Method`` with a JSON body using only reflection (no stubs),
    which is what grpcurl does."""
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
    service, name = method.rsplit("/", 1)
    with grpc.insecure_channel(target) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        m = pool.FindServiceByName(service).FindMethodByName(name)
        req_cls = message_factory.GetMessageClass(m.input_type)
        rep_cls = message_factory.GetMessageClass(m.output_type)
        rpc = channel.unary_unary(f"/{service}/{name}",
                                  request_serializer=req_cls.SerializeToString,
                                  response_deserializer=rep_cls.FromString)
        reply = rpc(json_format.ParseDict(body, req_cls()), timeout=10)
        return json_format.MessageToDict(reply)


def assert_cap_paid_exactly(results, clients, cap_fen: int, layer: str = "inpatient_tier1"):
    """Concurrent settlements at one member whose cap binds: each settled once, together they
    paid the cap exactly, every server sees it used up, and no two evaluations overlapped
    (each saw a different cap remaining)."""
    paid = [p.amount_fen for s in results for p in s.layers if p.layer_id == layer]
    assert len(paid) == len(results) and sum(paid) == cap_fen
    assert len({s.settlement_id for s in results}) == len(results)
    for c in clients:
        acc = {v.layer_id: v for v in accumulators(c, "M").layers}
        assert acc[layer].paid_fen == cap_fen
        assert acc[layer].remaining_fen == 0
    seen = [p.cap_remaining_fen for s in results for p in s.layers
            if p.layer_id == layer and p.cap_remaining_fen]
    assert cap_fen in seen and len(set(seen)) == len(seen)
