"""The service's log: one JSON object per line on stderr, written by one thread.

``setup_logging`` installs ``BufferedLineHandler`` with ``JsonFormatter`` on the root logger;
``info_of`` is the per-call line's fast way in; ``stop_logging`` writes out what
is left (at exit, and in the supervisor before it forks workers).
"""
from __future__ import annotations

import atexit
import collections
import json
import logging
import sys
import threading
import time
from typing import Callable

from server._logline import line as json_line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a dict message is merged into it."""

    _second: tuple[int, str] = (-1, "")   # the last second formatted (one line per call)

    def format(self, record: logging.LogRecord) -> str:
        fields = record.msg if isinstance(record.msg, dict) else {"msg": record.getMessage()}
        if record.exc_info:
            fields = {**fields, "exc": self.formatException(record.exc_info)}
        return self.line(record.name, record.levelname, fields, record.created)

    def line(self, logger: str, level: str, fields: dict, created: float) -> str:
        sec = int(created)
        second = self._second
        if second[0] != sec:
            second = self._second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
        millis = int((created - sec) * 1000)
        if "ts" in fields or "level" in fields or "logger" in fields:
            return json.dumps({"ts": f"{second[1]}.{millis:03d}Z", "level": level,
                               "logger": logger, **fields}, ensure_ascii=False)
        # json.dumps's text, written in C (server._logline: 0.8 µs against 3.5 in Python for
        # a call's line)
        return json_line(second[1], millis, level, logger, fields)


def setup_logging(level: str) -> None:
    # The JSON lines use none of these: not collecting them saves a few µs per call (the
    # logging HOWTO's "Optimization" list).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    stop_logging()
    global _LOG_HANDLER
    _LOG_HANDLER = BufferedLineHandler(sys.stderr)
    _LOG_HANDLER.setFormatter(JsonFormatter())
    root.handlers[:] = [_LOG_HANDLER]
    root.setLevel(level.upper())


class BufferedLineHandler(logging.Handler):
    """Log lines written out by one thread every 20 ms: records formatted by the thread that
    logs, the per-call lines of ``info_of`` built and formatted by the writer itself.

    One write to stderr per line, under the handler's lock, made the threads serving calls
    queue behind each other (the GIL is let go during the write and the lock is not): about
    half of a PreSettle's cost with 16 threads (docs/performance.md). Here a line costs a
    deque append (and a record its formatting); lines reach stderr at most ``interval`` later, and
    ``stop_logging`` (at exit, in workers before they exit) writes out what is left."""

    def __init__(self, stream, interval: float = 0.02):
        super().__init__()
        self.stream, self.interval = stream, interval
        self._lines: collections.deque = collections.deque()   # lines, or info's fields
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._writer.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # no handler lock: deque.append and popleft are atomic, and format touches no shared
        # state. (Swapping a list for an empty one could lose a line: one appended to the old
        # list after the writer had joined it.)
        if self.filter(record):
            try:
                self._lines.append(self.format(record) + "\n")
            except Exception:  # noqa: BLE001 — logging must never fail a call
                self.handleError(record)
            return True
        return False

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def defer(self, logger: str, make, args: tuple, created: float) -> None:
        """Queue the INFO line of fields ``make(*args)``, to be built and formatted by the
        writer (``info_of``): the calling thread only appends. ``args`` must not change
        afterwards."""
        self._lines.append((logger, make, args, created))

    def flush(self) -> None:
        pending, lines = self._lines, []
        while pending:
            try:
                item = pending.popleft()
            except IndexError:   # another flush took the last one
                break
            lines.append(item if type(item) is str else self._format_deferred(*item))
        if lines:
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def _format_deferred(self, logger: str, make, args: tuple, created: float) -> str:
        try:
            fields = make(*args)
        except Exception as e:  # noqa: BLE001 — the writer must go on: say what was lost
            fields = {"event": "log_error", "error": f"{make.__name__}: {e!r}"}
        try:
            return self.formatter.line(logger, "INFO", fields, created) + "\n"
        except Exception:  # noqa: BLE001 — a value json cannot write: its repr, not the line lost
            return self.formatter.line(logger, "INFO", {k: v if isinstance(
                v, (str, int, float, bool, type(None))) else repr(v)
                for k, v in fields.items()}, created) + "\n"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()
        self.flush()

    def close(self) -> None:
        self._stop.set()
        if self._writer.is_alive() and threading.current_thread() is not self._writer:
            self._writer.join(5)
        self.flush()
        super().close()


_LOG_HANDLER: BufferedLineHandler | None = None


def stop_logging() -> None:
    """Write out every buffered log line and stop the writer thread (at exit, in workers)."""
    global _LOG_HANDLER
    if _LOG_HANDLER is not None:
        handler, _LOG_HANDLER = _LOG_HANDLER, None
        handler.close()


atexit.register(stop_logging)


def info_of(logger: logging.Logger, make: Callable[..., dict], *args) -> None:
    """``logger.info(make(*args))`` — the line of every call. When this module's writer is the
    only handler on the logger's way (a server as ``setup_logging`` made it), ``make`` and its
    arguments are queued, and the writer thread builds the fields and formats them: the same
    line, without a LogRecord, the handler chain, or building and formatting the fields in
    the calling thread (docs/performance.md). ``args`` must not change afterwards. Any other
    handler (a test's capture, an operator's) gets the record as usual."""
    if not logger.isEnabledFor(logging.INFO):
        return
    h = _LOG_HANDLER
    if h is not None and _only_writer(logger, h):
        h.defer(logger.name, make, args, time.time())
    else:
        logger.info(make(*args))


def _only_writer(logger: logging.Logger, h: "BufferedLineHandler") -> bool:
    c: logging.Logger | None = logger
    while c is not None:
        if c.filters:
            return False
        if c.handlers:
            return (c.handlers == [h] and c.parent is None and not h.filters
                    and h.level <= logging.INFO)
        if not c.propagate:
            return False
        c = c.parent
    return False
