"""``python -m server --processes N``: N worker processes serving one port.

The supervisor (the process started) checks the configuration once (policies, database: it
opens the ledger, which creates or migrates the schema, and closes it), reserves the port with a
socket bound with ``SO_REUSEPORT`` (so that port 0 becomes one definite port all workers use),
then forks the workers before any gRPC object exists. Each worker is ``server.app.serve`` with
``--processes 1 --reuse-port --listen HOST:PORT``: its own gRPC server (``grpc.so_reuseport``),
its own ledger connections and committer, its own health service, its own log lines. The kernel
spreads new connections over the workers; a connection stays with one worker. On SQLite the
supervisor first forks one settlement writer process (``server.writer``) with channels for
every worker's threads: each worker gets its share, so the ``Settle`` calls of all workers
commit in one process, in groups together, instead of each worker's writer taking turns on
the database lock. The writer stops when the last worker has closed its channels, and the
supervisor reaps it.

Signals: SIGTERM or SIGINT to the supervisor is passed on to every worker, which drains as a
single server does (health NOT_SERVING, in-flight calls get ``--grace``); the supervisor exits 0
once all workers exited 0. A worker that dies on its own makes the supervisor stop the others
and exit 1: a half-capacity service is not hidden behind a healthy port. A supervisor that
dies (SIGKILL, the OOM killer) has the kernel send every worker SIGTERM: they drain and exit.

Sharing the ledger: PostgreSQL as with separate servers (row locks). SQLite: every worker
opens the same WAL file; writers of all processes take turns on the database write lock
(``BEGIN IMMEDIATE``, waiting up to ``busy_timeout``), so durable writes do not scale with
workers (each worker's group commit still batches its own callers), and a waiting writer sleeps
in SQLite's busy handler (milliseconds) rather than queueing. ``memory://`` is refused: each
process would have a ledger of its own.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import threading
import time
from typing import Callable

from server.logs import setup_logging, stop_logging

log = logging.getLogger("reimburse.server")
PR_SET_PDEATHSIG = 1   # <linux/prctl.h>


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT, not listening: it holds the port."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host.strip("[]") or "0.0.0.0", port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)
    return sock


def supervise(args: argparse.Namespace, argv: list[str],
              serve: Callable[..., int]) -> int:
    n = args.processes
    if n < 1:
        log.error({"event": "cannot start", "error": f"--processes must be >= 1, got {n}"})
        return 2
    if args.database == "memory://":
        log.error({"event": "cannot start", "error": "--processes > 1 needs a shared database "
                   "(SQLite file or PostgreSQL): each process would have its own memory://"})
        return 2
    from engine.loader import BUNDLED, store
    from server.app import _redact, engine_impl, open_database, wants_writer
    from server.writer import start_writer
    from server.auth import InsecureRefused, security_from_args
    try:  # refuse once, here, rather than once per forked worker
        security_from_args(args)
    except (InsecureRefused, OSError, ValueError) as e:
        log.error({"event": "cannot start", "error": str(e)})
        return 2
    writer = None
    try:
        policies = store(args.policies) if args.policies != str(BUNDLED) else store()
        open_database(args.database).close()   # creates or migrates the schema once
        if wants_writer(args):   # one settlement writer for all workers, each its share
            writer = start_writer(args.database, policies, engine_impl(args),
                                  channels=n * args.workers, log_level=args.log_level)
    except Exception as e:
        log.error({"event": "cannot start", "error": f"{type(e).__name__}: {e}"})
        return 2
    shares = writer.split(n) if writer is not None else [None] * n
    host, _, port_text = args.listen.rpartition(":")
    try:
        holder = reserve_port(host, int(port_text))
    except (OSError, ValueError) as e:
        log.error({"event": "cannot listen", "address": args.listen, "error": str(e)})
        _close_shares(shares)
        if writer is not None:
            writer.close()
        return 2
    port = holder.getsockname()[1]
    worker_argv = [*argv, "--listen", f"{host}:{port}", "--processes", "1", "--reuse-port"]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    # Fork with no other thread alive: the log writer could hold stderr's lock (a worker
    # would then hang on its first line) and its unwritten lines would be written twice.
    stop_logging()
    pids: list[int] = []
    supervisor = os.getpid()
    for i in range(n):
        pid = os.fork()
        if pid == 0:                                  # a worker
            code = 1
            try:
                holder.close()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                _stop_with(supervisor)
                _close_shares(shares, keep=i)    # the other workers' channels
                code = serve(worker_argv, writer=shares[i])
            except BaseException:                     # noqa: BLE001 — report, then exit
                log.exception("worker %d failed", i)
            finally:
                stop_logging()
                logging.shutdown()
                os._exit(code)
        pids.append(pid)
    _close_shares(shares)   # the workers hold them now: the writer stops when all closed
    setup_logging(args.log_level)
    log.info({"event": "supervising", "processes": n, "pids": pids, "port": port,
              "address": f"{host}:{port}", "database": _redact(args.database)})
    codes: dict[int, int] = {}
    forwarded = False
    failed = False
    while len(codes) < n:
        if stop.is_set() and not forwarded:
            forwarded = True
            log.info({"event": "stopping workers", "pids": pids})
            _signal_all(pids, codes, signal.SIGTERM)
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.05)
            continue
        if writer is not None and pid == writer.pid:   # the workers settle without it
            log.error({"event": "writer process exited", "pid": pid,
                       "code": os.waitstatus_to_exitcode(status)})
            continue
        if pid not in pids:
            continue
        codes[pid] = os.waitstatus_to_exitcode(status)
        if not forwarded and not stop.is_set():   # a worker stopped on its own: stop the
            # rest and report the failure
            failed = True
            log.error({"event": "worker exited", "pid": pid, "code": codes[pid]})
            stop.set()
    holder.close()
    if writer is not None:
        writer.close()   # the workers closed its channels: it stops; reap it
    ok = not failed and all(c == 0 for c in codes.values())
    log.info({"event": "stopped", "codes": [codes.get(p) for p in pids]})
    return 0 if ok else 1


def _stop_with(supervisor: int) -> None:
    """Have the kernel send this worker SIGTERM when the supervisor dies, however it dies
    (Linux ``prctl(PR_SET_PDEATHSIG)``): a worker drains and exits rather than go on serving
    the port without it (and holding the settlement writer's channels open)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):   # not Linux: workers outlive a killed supervisor
        return
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if os.getppid() != supervisor:      # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _close_shares(shares: list, keep: int | None = None) -> None:
    """Close this process's copies of the workers' writer channels, but worker ``keep``'s."""
    for j, share in enumerate(shares):
        if j != keep and share is not None:
            share.close()


def _signal_all(pids: list[int], done: dict[int, int], sig: int) -> None:
    for pid in pids:
        if pid not in done:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
