"""The settlement writer process: Settle's transactions committed by a process of their own.

Why a process. In one process the SQLite committer thread (``server.ledger.sqlite``) shares
the GIL with gRPC's poller and the RPC threads. Under load it held the GIL for about a third of
its time and waited for it most of the rest: every release around a SQLite call, and every
switch interval, handed it to another thread, and it took turns with all of them. Settle's
throughput was the committer's speed, and that was set by the wait, not by its own work
(docs/performance.md, "A writer process"). A forked process has an interpreter and a GIL of its
own: there the committer waits for no one.

How. ``start_writer`` forks before the server makes any gRPC object or thread, with one
``socketpair`` per RPC thread (``channels``: no address another process could connect to, so
the messages they carry come only from these two processes). The child opens its own ``SqliteLedger`` on the same database and a ``Core`` over the
same policies, and loops: wait until some channels hold a request, read one ``SettleJob`` from
each, settle them all together (``SqliteLedger.settle_many``: one group, one transaction, one
fsync), answer each channel with its ``SettleResult`` or the exception ``settle`` raised. A
Settle in the parent takes an idle channel, sends its job and waits for the answer: the one
hand-off, and a blocking read that lets the GIL go.

What does not change. The same ledger code settles (the same checks, in the same order; the
same transaction, rolled back whole on a failure; the same journal rows), and the server's
other writes (upserts, reversals, batches) still go through the parent's own ledger: SQLite's
write lock orders the two writers, as it orders several worker processes'. Reads in the parent
see the child's commits at once (the read cache watches the database file, not this process).

Failures. A writer that exits or breaks a channel fails the Settle calls waiting on it with
``LedgerUnavailable`` (UNAVAILABLE: the settlement may or may not have committed; resending it
with the same request id is safe, a replay if it did) and is not used again: later Settle calls
go through the parent's ledger, and an error line says so. The child ignores SIGINT and SIGTERM
(the parent drains first, then closes the channels) and exits once the parent's ends of the
channels are all closed, whatever ended the parent: only the parent holds them.
"""
from __future__ import annotations

import logging
import marshal
import os
import pickle
import selectors
import signal
import socket
import struct
import threading
import time
from datetime import date, datetime
from typing import Any

from server.ledger.base import BatchItem, LedgerUnavailable, SettlementRecord, SettleResult
from server.service import SettleJob

log = logging.getLogger("reimburse.server")

_LEN = struct.Struct("<I")
_READY = b"ready"
START_TIMEOUT_S = 60.0      # opening (and migrating) the database in the child
STOP_TIMEOUT_S = 30.0       # after the channels close: the group in hand, then close


# A message's first byte says how the rest is written. A Settle's job of the C path's kind
# and a settlement answered go as plain values (marshal); anything else as a pickle. Pickling
# the named tuples and the dataclass cost 3-5 µs a message each way, in both processes, where
# marshal takes under 1 (docs/performance.md, "2026-12-07, second pass").
_PLAIN, _PICKLED = b"M", b"P"


def _encode(obj: Any) -> bytes:
    plain = _plain(obj)
    if plain is not None:
        try:
            return _PLAIN + marshal.dumps(plain, 2)   # version 2: no back-references, faster
        except ValueError:           # a value marshal cannot write: pickled below
            pass
    return _PICKLED + pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)


def _plain(obj: Any) -> tuple | None:
    """``obj`` as builtins only (_decode rebuilds it), or None where it is not a message of
    the two kinds."""
    if type(obj) is tuple and len(obj) == 2 and obj[0] is True:     # (True, SettleResult)
        r = obj[1]
        if isinstance(r, SettleResult) and type(r.record.deltas) is dict:
            rec = r.record
            return ("result", (*rec[:-2], _iso(rec.created_at), _iso(rec.reversed_at)),
                    r.created)
        return None
    req = getattr(obj, "req", None)
    if type(req) is tuple and obj.call is None and obj.chain_fen == 0:   # a C path SettleJob
        return ("job", tuple(obj.item), (*req[:4], req[4].toordinal(), *req[5:]), obj.data)
    return None


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _decode(body: bytes) -> Any:
    if body[:1] == _PICKLED:
        return pickle.loads(body[1:])
    kind, *rest = marshal.loads(body[1:])
    if kind == "result":
        flat, created = rest
        *fields, created_at, reversed_at = flat
        return True, SettleResult(SettlementRecord(
            *fields, None if created_at is None else datetime.fromisoformat(created_at),
            None if reversed_at is None else datetime.fromisoformat(reversed_at)), created)
    item, req, data = rest
    return SettleJob(BatchItem(*item), (*req[:4], date.fromordinal(req[4]), *req[5:]), data)


def _send(ch: socket.socket, obj: Any) -> None:
    body = _encode(obj)
    ch.sendall(_LEN.pack(len(body)) + body)


def _recv(ch: socket.socket) -> Any:
    """One message; EOFError if the other end closed before a whole one came."""
    buf = ch.recv(65536)
    if len(buf) < _LEN.size:
        buf += _exactly(ch, _LEN.size - len(buf))
    (n,) = _LEN.unpack_from(buf)
    body = buf[_LEN.size:]
    if len(body) < n:
        body += _exactly(ch, n - len(body))
    return _decode(body)


def _exactly(ch: socket.socket, n: int) -> bytes:
    parts = []
    while n:
        b = ch.recv(n)
        if not b:
            raise EOFError("the other end closed the channel")
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


class SettlementWriter:
    """The parent's side: ``settle`` sends a job to the writer process and returns its answer."""

    def __init__(self, pid: int, channels: list[socket.socket], reaps: bool = True):
        self.pid = pid
        self._idle = list(channels)
        self._all = list(channels)     # closing them all stops the child
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._reaps = reaps            # the writer is this process's child: close waits for it

    def split(self, n: int) -> list[SettlementWriter]:
        """The channels in ``n`` equal shares, one per worker process of ``--processes``
        (``server.workers``), each a writer that does not reap the process. This one keeps
        none: ``close`` then only waits for the process, once every share is closed in every
        process that holds it."""
        with self._lock:
            channels, self._all, self._idle = self._all, [], []
        k = len(channels) // n
        return [SettlementWriter(self.pid, channels[i * k:(i + 1) * k], reaps=False)
                for i in range(n)]

    def settle(self, job) -> SettleResult | None:
        """The writer's answer to ``job`` (a ``server.service.SettleJob``): its
        ``SettleResult``, or the exception the ledger raised, raised here. None when the
        writer is not used any more or every channel is busy: then the caller settles itself.
        """
        if self._broken is not None:
            return None
        with self._lock:
            ch = self._idle.pop() if self._idle else None
        if ch is None:
            return None
        try:
            _send(ch, job)
            ok, value = _recv(ch)
        except Exception as e:     # noqa: BLE001 — the channel may be out of step: never again
            self._break(f"{type(e).__name__}: {e}")
            raise LedgerUnavailable(
                "the settlement writer process failed while settling this call: it may or "
                "may not have committed; resend it (same request id)") from e
        with self._lock:
            self._idle.append(ch)
        if ok:
            return value
        raise value

    def _break(self, why: str) -> None:
        with self._lock:
            if self._broken is not None:
                return
            self._broken = why
        log.error({"event": "writer process lost", "pid": self.pid, "error": why,
                   "then": "Settle commits in the server process"})

    def close(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Close this process's channels (after the server drained: no call waits on them);
        the writer stops once every channel is closed. Where it is this process's child, wait
        for it: its exit code, None if it had to be killed."""
        with self._lock:
            if self._broken is None:
                self._broken = "closed"
            channels, self._all, self._idle = self._all, [], []
        for ch in channels:
            ch.close()
        if not self._reaps:
            return None
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                log.error({"event": "writer process killed", "pid": self.pid,
                           "after_s": timeout})
                return None
            time.sleep(0.01)


def start_writer(database: str, policies, impl: str | None, channels: int,
                 log_level: str = "INFO") -> SettlementWriter:
    """Fork the writer process over the SQLite file ``database`` with ``channels`` channels
    (one per RPC thread; more concurrent Settle calls than that commit in the parent). Call it
    with no other thread running and before any gRPC object exists (a forked child inherits
    neither safely); it returns once the child has opened the ledger, and raises
    ``RuntimeError`` if it could not."""
    from server.logs import setup_logging, stop_logging
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(channels)]
    stop_logging()                      # no thread alive across the fork (server.workers)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for parent_end, _ in pairs:
                parent_end.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            setup_logging(log_level)
            code = _child(database, policies, impl, [c for _, c in pairs])
        except BaseException:           # noqa: BLE001 — report, then exit
            log.exception("the settlement writer process failed")
        finally:
            stop_logging()
            logging.shutdown()
            os._exit(code)
    setup_logging(log_level)
    for _, child_end in pairs:
        child_end.close()
    writer = SettlementWriter(pid, [p for p, _ in pairs])
    first = writer._all[0]
    first.settimeout(START_TIMEOUT_S)
    try:
        ready = _recv(first)
    except (OSError, EOFError) as e:
        ready = e
    finally:
        first.settimeout(None)
    if ready != _READY:
        writer.close(timeout=5)
        raise RuntimeError(f"the settlement writer process did not start ({ready})")
    log.info({"event": "writer process started", "pid": pid, "channels": channels})
    return writer


def _child(database: str, policies, impl: str | None, channels: list[socket.socket]) -> int:
    from server.ledger.base import open_ledger
    from server.service import Core
    ledger = open_ledger(database)
    if not hasattr(ledger, "settle_many"):
        ledger.close()
        raise ValueError(f"{type(ledger).__name__}: the writer process is for SQLite only")
    try:
        core = Core(ledger, policies, impl)
        _send(channels[0], _READY)
        _serve(ledger, core, channels)
    finally:
        ledger.close()
    return 0


def _serve(ledger, core, channels: list[socket.socket]) -> None:
    sel = selectors.DefaultSelector()
    for ch in channels:
        sel.register(ch, selectors.EVENT_READ)
    open_channels = len(channels)
    while open_channels:
        asking, jobs = [], []
        for key, _ in sel.select():
            ch = key.fileobj
            try:
                job = _recv(ch)
            except (OSError, EOFError):     # the parent closed it (stopping) or is gone
                sel.unregister(ch)
                ch.close()
                open_channels -= 1
                continue
            asking.append(ch)
            jobs.append(job)
        if not jobs:
            continue
        results = ledger.settle_many([j.item for j in jobs], [j.evaluation(core) for j in jobs])
        for ch, r in zip(asking, results):
            try:
                _send(ch, _answer(r))
            except OSError:                 # the parent went away mid-answer
                return


def _answer(r) -> tuple[bool, Any]:
    """(True, result) or (False, exception); an exception that would not arrive as itself
    (it cannot be pickled and unpickled) goes as a RuntimeError naming it."""
    if not isinstance(r, BaseException):
        return True, r
    try:
        back = pickle.loads(pickle.dumps(r, pickle.HIGHEST_PROTOCOL))
        if type(back) is type(r) and str(back) == str(r):
            return False, r
    except Exception:                       # noqa: BLE001 — any failure: send the stand-in
        pass
    return False, RuntimeError(f"{type(r).__name__}: {r}")
