"""The service's log handler: lines formatted by the calling thread, written by one writer."""
from __future__ import annotations

import io
import logging
import sys
import threading

from server.logs import BufferedLineHandler


class _Message(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def test_no_line_is_lost_or_doubled_while_the_writer_flushes_concurrently():
    # The writer flushing every 0 s and an interpreter switch every microsecond make the
    # writer take the pending lines between any two steps of a logging thread.
    out = io.StringIO()
    handler = BufferedLineHandler(out, interval=0)
    handler.setFormatter(_Message())
    logger = logging.getLogger("test.log_lines")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        def log_many(t: int) -> None:
            for i in range(5000):
                logger.info("%d-%d", t, i)
        threads = [threading.Thread(target=log_many, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
        logger.removeHandler(handler)
        handler.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 20_000
    assert set(lines) == {f"{t}-{i}" for t in range(4) for i in range(5000)}
