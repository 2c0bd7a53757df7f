"""The service's log handler: records formatted by the calling thread, per-call lines queued by
it and built and formatted by the one writer, which writes them all."""
from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from server.logs import BufferedLineHandler, JsonFormatter


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


_ASCII = st.text(st.characters(max_codepoint=127), max_size=12)   # server._logline copies these
_VALUES = st.one_of(st.text(max_size=12), _ASCII, st.integers(), st.floats(), st.booleans(),
                    st.none(), st.lists(st.integers(), max_size=2),
                    st.sampled_from(['a"b', "a\\b", "\n", "\x7f", "\x1f"]),
                    # two of these overflow _logline's buffer: the line is written item by item
                    st.text("xy", min_size=1000, max_size=1100))


@settings(max_examples=400, deadline=None)
@given(fields=st.dictionaries(st.one_of(st.text(max_size=6), _ASCII,
                                        st.sampled_from(["ts", "level"])),
                              _VALUES, max_size=6),
       logger=st.text(max_size=8), created=st.floats(0, 4e9))
def test_a_line_is_json_dumps_text_of_its_fields(fields, logger, created):
    # JsonFormatter writes plain values itself; the line must stay exactly json.dumps's
    line = JsonFormatter().line(logger, "INFO", fields, created)
    sec = int(created)
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + \
        f".{int((created - sec) * 1000):03d}Z"
    assert line == json.dumps({"ts": ts, "level": "INFO", "logger": logger, **fields},
                              ensure_ascii=False)


def test_a_deferred_line_is_written_in_order_and_never_lost(monkeypatch):
    # logs.info_of queues what makes the fields and the writer builds and formats them: the
    # lines come out in the order they were logged, records and deferred lines alike; a value
    # JSON cannot write is written as its repr, and fields that fail to be built as an error
    # line, rather than the line being dropped
    from server import logs
    out = io.StringIO()
    handler = BufferedLineHandler(out, interval=3600)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    monkeypatch.setattr(logs, "_LOG_HANDLER", handler)
    log = logging.getLogger("test.deferred")
    try:
        logs.info_of(log, dict, {"event": "rpc", "n": 1})
        log.warning({"event": "direct"})
        logs.info_of(log, dict, {"event": "rpc", "odd": {1, 2}})
        logs.info_of(log, lambda name, n: {"event": name, "n": n + 1}, "made", 2)

        def broken(n):
            raise KeyError(n)
        logs.info_of(log, broken, 7)
        assert out.getvalue() == ""              # nothing built, formatted or written yet
        handler.flush()
    finally:
        handler.close()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["event"] for x in lines] == ["rpc", "direct", "rpc", "made", "log_error"]
    assert lines[3]["n"] == 3 and lines[4]["error"] == "broken: KeyError(7)"
    assert lines[0] == {"ts": lines[0]["ts"], "level": "INFO", "logger": "test.deferred",
                        "event": "rpc", "n": 1}
    assert lines[2]["odd"] == "{1, 2}" and lines[1]["level"] == "WARNING"
