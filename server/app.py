"""Assemble and run the gRPC server.

``create_server(address, ledger, policies) -> (server, port)`` builds a server bound to
``address`` (``127.0.0.1:0`` picks a free port) and is what tests use; ``serve()`` adds the
process concerns: configuration, logging, signals and a graceful drain.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.loader import BUNDLED, PolicyStore, store
from reimburse.v1 import policy_pb2, policy_pb2_grpc, registry_pb2, registry_pb2_grpc
from reimburse.v1 import settlement_pb2
from server.auth import (
    Gatekeeper, InsecureRefused, Security, add_server_args, security_from_args,
)
from server.ledger.base import Ledger, is_postgres, open_ledger
from server.service import Core, PolicyServicer, RegistryServicer, SettlementServicer
from server.batch import batch_handlers
from server.logs import setup_logging
from server.writer import SettlementWriter, start_writer
from server.wire import add_echo_service, add_settlement_service

log = logging.getLogger("reimburse.server")

MAX_MESSAGE_BYTES = 4 * 1024 * 1024   # 10,000 line items fit in well under 1 MiB
GC_GEN0 = 10_000   # allocations between young collections (Python's default 700)
SERVICES = (
    settlement_pb2.DESCRIPTOR.services_by_name["SettlementService"].full_name,
    registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
    policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,
)


def create_server(address: str, ledger: Ledger, policies: PolicyStore, *, workers: int = 16,
                  impl: str | None = None, health_servicer: health.HealthServicer | None = None,
                  max_message_bytes: int = MAX_MESSAGE_BYTES,
                  security: Security | None = None, bench_echo: bool = False,
                  reuse_port: bool = False, writer: SettlementWriter | None = None,
                  presettle_threads: int = 0) -> tuple[grpc.Server, int]:
    """A server (not started) with our services, health and reflection, bound to ``address``.

    ``security`` (``server.auth.Security``): TLS credentials and the authentication of callers;
    None is plaintext without authentication (tests; ``python -m server`` only with --insecure).
    ``bench_echo`` adds the load harness's bare echo RPC (``server.wire``); ``reuse_port`` lets
    several worker processes share the port (``python -m server --processes N``); ``writer``
    commits Settle calls in the settlement writer process (``server.writer``);
    ``presettle_threads`` serves PreSettle on a pool of its own (``presettle_pool``).
    """
    security = security or Security()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        interceptors=[Gatekeeper(security.auth)],
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes),
                 # one process owns its port unless multi-process serving asks otherwise
                 ("grpc.so_reuseport", 1 if reuse_port else 0)])
    core = Core(ledger, policies, impl, writer)
    settlement = SettlementServicer(core)
    pool = presettle_pool(ledger, presettle_threads)
    add_settlement_service(settlement, server, batch_handlers(settlement), presettle_pool=pool)
    if bench_echo:   # the baseline runs where PreSettle runs: the same stack
        add_echo_service(server, pool=pool)
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(core), server)
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(core), server)
    hs = health_servicer or health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    for name in ("", *SERVICES):
        hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = (server.add_secure_port(address, security.tls.credentials()) if security.tls
            else server.add_insecure_port(address))
    if not port:
        raise OSError(f"cannot listen on {address}")
    return server, port


def presettle_threads(ledger: Ledger, threads: int) -> int:
    """The threads of PreSettle's own pool: ``threads`` where reads answer from this process
    (SQLite, ``memory://``), else 0 (PostgreSQL: a read may wait on the network, and a couple
    of threads would cap the calls in flight)."""
    return threads if getattr(ledger, "local_reads", False) else 0


def presettle_pool(ledger: Ledger, threads: int) -> futures.ThreadPoolExecutor | None:
    """A pool for PreSettle (``presettle_threads``), or None where it has none and shares the
    server's RPC threads.

    A PreSettle holds the GIL from start to end when its reads answer from this process, so
    more than a couple of threads only add contenders for it: 16 threads handing one GIL
    around spent about half the server's CPU switching between them (docs/performance.md,
    "2026-12-07"). Settle keeps the RPC threads: its calls wait on the writer, and a commit
    group is as large as the number of waiting threads."""
    n = presettle_threads(ledger, threads)
    return (futures.ThreadPoolExecutor(max_workers=n, thread_name_prefix="presettle")
            if n > 0 else None)


def open_database(url: str) -> Ledger:
    """``memory://`` (nothing durable: tests and demos), a SQLite path or a PostgreSQL URL."""
    if url == "memory://":
        from server.ledger.memory import MemoryLedger
        return MemoryLedger()
    return open_ledger(url)




def engine_impl(args: argparse.Namespace) -> str | None:
    """The evaluator ``--engine`` asks for (None: the kernel when built)."""
    return None if args.engine == "auto" else args.engine


def wants_writer(args: argparse.Namespace) -> bool:
    """A settlement writer process (``server.writer``): asked for, and the database SQLite."""
    return (args.writer_process == "on" and args.database != "memory://"
            and not is_postgres(args.database))


def _env(name: str, default: str) -> str:
    return os.environ.get(f"REIMBURSE_{name}", default)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m server",
        description="Run the settlement service. Every option can also be set by the "
                    "environment variable named in its help.")
    ap.add_argument("--listen", default=_env("LISTEN", "127.0.0.1:50051"),
                    help="HOST:PORT to listen on ($REIMBURSE_LISTEN; default %(default)s)")
    ap.add_argument("--database", default=_env("DATABASE", "reimburse.db"),
                    help="SQLite file path, postgresql:// URL or memory:// "
                         "($REIMBURSE_DATABASE; default %(default)s)")
    ap.add_argument("--policies", default=_env("POLICIES", str(BUNDLED)),
                    help="policy folder <region>/<effective>.yaml ($REIMBURSE_POLICIES; "
                         "default: the bundled policies)")
    ap.add_argument("--workers", type=int, default=int(_env("WORKERS", "16")),
                    help="worker threads ($REIMBURSE_WORKERS; default %(default)s)")
    ap.add_argument("--presettle-threads", type=int,
                    default=int(_env("PRESETTLE_THREADS", "0")),
                    help="PreSettle on a pool of its own of this many threads, with SQLite "
                         "or memory:// (see docs/performance.md); 0: on the worker threads "
                         "($REIMBURSE_PRESETTLE_THREADS; default %(default)s)")
    ap.add_argument("--grace", type=float, default=float(_env("GRACE_SECONDS", "10")),
                    help="seconds in-flight calls get to finish on SIGTERM "
                         "($REIMBURSE_GRACE_SECONDS; default %(default)s)")
    ap.add_argument("--engine", default=_env("ENGINE", "auto"),
                    choices=("auto", "reference", "kernel"),
                    help="evaluator ($REIMBURSE_ENGINE; default %(default)s)")
    ap.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"),
                    help="DEBUG, INFO, WARNING… ($REIMBURSE_LOG_LEVEL; default %(default)s)")
    add_server_args(ap)  # TLS, tokens, client certificates, --insecure (server.auth)
    ap.add_argument("--processes", type=int, default=int(_env("PROCESSES", "1")),
                    help="worker processes sharing the port, forked before any server starts "
                         "($REIMBURSE_PROCESSES; default %(default)s; see server.workers)")
    ap.add_argument("--bench-echo", action="store_true",
                    default=_env("BENCH_ECHO", "") not in ("", "0"),
                    help="also serve the load harness's bare echo RPC "
                         "($REIMBURSE_BENCH_ECHO=1; benchmarks only)")
    ap.add_argument("--writer-process", default=_env("WRITER_PROCESS", "on"),
                    choices=("on", "off"),
                    help="SQLite: commit Settle calls in a process of their own (server.writer)"
                         " ($REIMBURSE_WRITER_PROCESS; default %(default)s)")
    ap.add_argument("--gil-switch-us", type=int, default=int(_env("GIL_SWITCH_US", "100")),
                    help="interpreter switch interval in microseconds ($REIMBURSE_GIL_SWITCH_US;"
                         " default %(default)s; Python's own default is 5000)")
    ap.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a worker
    args = ap.parse_args(argv)
    if args.presettle_threads < 0:
        ap.error(f"--presettle-threads: {args.presettle_threads} is negative (0 turns it off)")
    return args


def serve(argv: list[str] | None = None, writer: SettlementWriter | None = None) -> int:
    """``python -m server``. ``writer``: a worker's share of its supervisor's settlement
    writer process (``server.workers``); without it a server on SQLite starts its own."""
    args = parse_args(argv)
    setup_logging(args.log_level)
    # Hand the GIL on sooner than the default 5 ms: gRPC's poller thread, waiting for it
    # while a worker runs Python, otherwise delays every other call (docs/performance.md).
    sys.setswitchinterval(args.gil_switch_us / 1e6)
    if args.processes != 1:   # a supervisor: forks the workers, each runs this function
        from server.workers import supervise
        return supervise(args, sys.argv[1:] if argv is None else list(argv), serve)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        security = security_from_args(args)
    except (InsecureRefused, OSError, ValueError) as e:
        log.error({"event": "cannot start", "error": str(e)})
        return 2
    for weakness in security.weaknesses():  # only with --insecure: say so, loudly
        log.warning({"event": "INSECURE", "warning": f"INSECURE MODE: {weakness}",
                     "listen": args.listen})
    impl = engine_impl(args)
    try:
        policies = store(args.policies) if args.policies != str(BUNDLED) else store()
        if writer is None and wants_writer(args):
            # the schema created or migrated once, before the writer and the server open it
            open_database(args.database).close()
            writer = start_writer(args.database, policies, impl, channels=args.workers,
                                  log_level=args.log_level)
        ledger = open_database(args.database)
    except Exception as e:  # a bad policy folder or database: say which, exit 2
        if writer is not None:
            writer.close()
        log.error({"event": "cannot start", "error": f"{type(e).__name__}: {e}"})
        return 2
    hs = health.HealthServicer()
    try:
        server, port = create_server(args.listen, ledger, policies, workers=args.workers,
                                     impl=impl, health_servicer=hs, security=security,
                                     bench_echo=args.bench_echo, reuse_port=args.reuse_port,
                                     writer=writer, presettle_threads=args.presettle_threads)
    except (OSError, RuntimeError) as e:  # grpc reports a port it cannot bind as RuntimeError
        if writer is not None:
            writer.close()
        ledger.close()
        log.error({"event": "cannot listen", "address": args.listen, "error": str(e)})
        return 2
    # What exists now (policies, modules, descriptors) lives as long as the process: out of
    # the collector's sight, and young collections less often. Under load this took the
    # collector from ~1.5 % of the server's CPU to ~0.2 % and its longest pause from 33 to
    # 18-23 ms (docs/performance.md).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, *gc.get_threshold()[1:])
    server.start()
    host = args.listen.rsplit(":", 1)[0]
    log.info({"event": "listening", "address": f"{host}:{port}", "port": port,
              "database": _redact(args.database), "policies": args.policies,
              "regions": policies.regions(), "workers": args.workers,
              "presettle_threads": presettle_threads(ledger, args.presettle_threads),
              "tls": "mutual" if security.tls and security.tls.mutual else
                     "on" if security.tls else "off",
              "auth": ("off" if security.auth is None else
                       "+".join(k for k, on in (("tokens", security.auth.tokens is not None),
                                                ("certificates", security.auth.certificates))
                                if on))})
    stop.wait()
    # Drain: health says NOT_SERVING, new calls are refused, in-flight ones get the grace.
    log.info({"event": "stopping", "grace_s": args.grace})
    hs.enter_graceful_shutdown()
    server.stop(args.grace).wait()
    if writer is not None:
        writer.close()
    ledger.close()
    log.info({"event": "stopped"})
    return 0


def _redact(url: str) -> str:
    """A database URL without its password, for the log."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url
