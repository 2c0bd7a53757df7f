"""PreSettle on a pool of its own (``--presettle-threads``, ``server.app.presettle_pool``).

grpc's synchronous server runs a method on the pool its behaviour names in
``experimental_thread_pool``; these tests check, through a real server and the Gatekeeper
interceptor, that PreSettle (and the echo baseline) do run there, that the replies are byte
for byte those of a server without the pool, and that the pool is made only where reads answer
from this process.
"""
from __future__ import annotations

import threading

import grpc
import pytest

from benchmarks import workload
from engine.loader import store
from server import fastpath, wire
from server.app import create_server, presettle_pool
from server.ledger.memory import MemoryLedger
from service_fixtures import sqlite_ledger

PRESETTLE = "/reimburse.v1.SettlementService/PreSettle"


def _serve(tmp_path, name: str, pop, **kw):
    ledger = sqlite_ledger(tmp_path / f"{name}.db")
    workload.register_in(ledger, pop)
    server, port = create_server("127.0.0.1:0", ledger, store(), bench_echo=True, **kw)
    server.start()
    return server, port, ledger


def _threads_of(monkeypatch, module, name: str) -> list[str]:
    """Record the name of the thread that runs ``module.name`` at each call."""
    seen: list[str] = []
    original = getattr(module, name)

    def recording(*a, **kw):
        seen.append(threading.current_thread().name)
        return original(*a, **kw)
    monkeypatch.setattr(module, name, recording)
    return seen


def test_presettle_and_echo_run_on_the_pool_and_answer_as_without_it(tmp_path, monkeypatch):
    pop = workload.population(40, seed=11, prefix="Q")
    reqs = [workload.settle_request(pop, c).SerializeToString()
            for c in workload.claims(pop, 60, seed=12)]
    presettled = _threads_of(monkeypatch, fastpath, "pre_settle_wire")
    echoed = _threads_of(monkeypatch, wire, "_echo")     # looked up as the server is made
    replies, names = {}, {}
    for label, threads in (("pool", 2), ("rpc", 0)):
        server, port, ledger = _serve(tmp_path, label, pop, presettle_threads=threads)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.unary_unary(PRESETTLE)
                replies[label] = [call(r, timeout=10) for r in reqs]
                assert ch.unary_unary(wire.ECHO_METHOD)(b"ping", timeout=10) == b"ping"
        finally:
            server.stop(None).wait()
            ledger.close()
        names[label] = (set(presettled), set(echoed))
        presettled.clear()
        echoed.clear()
    assert replies["pool"] == replies["rpc"]
    assert all(len(r) > 20 for r in replies["rpc"])     # real settlements, not empty replies
    pool_pre, pool_echo = names["pool"]
    assert pool_pre and all(n.startswith("presettle_") for n in pool_pre), pool_pre
    assert len(pool_pre) <= 2
    assert pool_echo and all(n.startswith("presettle_") for n in pool_echo), pool_echo
    rpc_pre, rpc_echo = names["rpc"]
    assert rpc_pre and not any(n.startswith("presettle_") for n in rpc_pre | rpc_echo)


class _NetworkReads(MemoryLedger):
    local_reads = False    # as PostgreSQL: a read may wait on the network


@pytest.mark.parametrize("ledger, threads, made", [
    (MemoryLedger, 2, True),
    (MemoryLedger, 0, False),
    (_NetworkReads, 2, False),
])
def test_a_pool_only_where_reads_answer_from_this_process(ledger, threads, made):
    pool = presettle_pool(ledger(), threads)
    assert (pool is not None) == made
    if pool is not None:
        assert pool._max_workers == threads
        pool.shutdown()


def test_the_option_and_its_environment_variable(monkeypatch, capsys):
    from server.app import parse_args
    assert parse_args([]).presettle_threads == 0            # off unless asked for
    monkeypatch.setenv("REIMBURSE_PRESETTLE_THREADS", "2")
    assert parse_args([]).presettle_threads == 2
    assert parse_args(["--presettle-threads", "3"]).presettle_threads == 3
    with pytest.raises(SystemExit) as e:
        parse_args(["--presettle-threads", "-1"])
    assert e.value.code == 2
    assert "--presettle-threads: -1 is negative" in capsys.readouterr().err
