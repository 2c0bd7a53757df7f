"""CI guard of issue 4's performance goals, measured as ratios within one run (about 55 s an
attempt).

Servers are ``python -m server`` subprocesses with a fresh SQLite ledger (synchronous=FULL),
driven by the load harness (``benchmarks.load``) on 127.0.0.1, every loop bounded in time.
Each figure is compared with the echo RPC (or PreSettle) measured in the same run, because
absolute timings on this machine are noisy.

Every goal is listed with two numbers (docs/performance.md has the measurements behind them):

- ``goal``: what issue 4 asks;
- ``floor``: what this code is known to reach here. Where the goal is met the floor IS the
  goal; where it is not, the floor is the level measured (docs/performance.md says so, with
  numbers) — the guard then protects what was achieved and prints that the goal is unmet.

One figure has no goal in the issue: PreSettle's gain from a pool of its own
(``--presettle-threads``), held at its floor like the others.

The test fails when a figure falls more than ``MARGIN`` (25 %) below its floor (for the p99
ratio: rises more than 25 % above it), the allowance for noise on a shared 2-core machine, in
each of ``ATTEMPTS`` measurements.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest

from benchmarks.load import SpawnedServer, default_channels, ratios, register, run_mode

MARGIN = 0.25
ECHO_CEILING_ISSUE = 3300.0   # echo calls/s per process in the issue, to turn absolute goals
#                               into ratios: 1,000,000 claims/s = 300 x echo calls/s, etc.


@dataclass(frozen=True)
class Goal:
    key: str
    goal: float | None   # None: a figure the guard holds that the issue set no goal for
    floor: float
    higher_is_better: bool
    what: str

    def limit(self) -> float:
        return self.floor * (1 - MARGIN) if self.higher_is_better else self.floor * (1 + MARGIN)

    def met(self, value: float) -> bool:
        return value >= self.goal if self.higher_is_better else value <= self.goal

    def stated(self, value: float) -> str:
        if self.goal is None:
            return "no goal in the issue"
        sign = ">=" if self.higher_is_better else "<="
        return f"goal {sign} {self.goal:g}, goal {'met' if self.met(value) else 'NOT met'}"

    def ok(self, value: float) -> bool:
        return value >= self.limit() if self.higher_is_better else value <= self.limit()


GOALS = (
    # 0.77-0.93 in the guard since the claim context and the log line in C (docs/performance.md,
    # "2026-12-07, second pass"), 0.69-0.84 in harness runs: not reliably at the goal
    Goal("presettle_vs_echo", 0.80, 0.70, True,
         "PreSettle calls/s over echo calls/s, 64 in flight, one process"),
    # met since Settle commits in the settlement writer process (docs/performance.md,
    # "A writer process"): the floor is the goal
    Goal("settle_vs_presettle", 0.70, 0.70, True,
         "durable Settle (synchronous=FULL) calls/s over PreSettle's, 64 in flight"),
    Goal("presettle_p99_vs_echo_p99", 1.30, 1.50, False,
         "PreSettle p99 latency over echo p99, 64 in flight"),
    Goal("two_processes_vs_one", 1.70, 1.70, True,
         "PreSettle calls/s with --processes 2 over one process, two client processes "
         "(the load generator shares the machine's 2 cores)"),
    Goal("batch_presettle_vs_echo_calls", 1_000_000 / ECHO_CEILING_ISSUE, 180.0, True,
         "PreSettleBatch claims/s (1000-claim batches, 2 in flight) over echo calls/s; "
         "the goal 1,000,000 claims/s is 300 x the issue's echo figure"),
    Goal("batch_settle_vs_echo_calls", 40_000 / ECHO_CEILING_ISSUE, 6.0, True,
         "durable SettleBatch claims/s (1000-claim batches, 2 in flight) over echo calls/s; "
         "the goal 40,000 claims/s is 12 x the issue's echo figure"),
    Goal("batch_presettle_stream_vs_echo_calls", 1_000_000 / ECHO_CEILING_ISSUE, 220.0, True,
         "PreSettleBatchStream claims/s (1000-claim batches, 2 in flight on one stream) over "
         "echo calls/s"),
    Goal("batch_settle_stream_vs_echo_calls", 40_000 / ECHO_CEILING_ISSUE, 6.0, True,
         "durable SettleBatchStream claims/s (1000-claim batches, 2 in flight on one stream) "
         "over echo calls/s"),
    # not one of the issue's goals: what --presettle-threads (off by default) is for
    # (docs/performance.md, "2026-12-07": 1.5-1.9 x)
    Goal("presettle_pool_vs_rpc_threads", None, 1.3, True,
         "PreSettle calls/s with --presettle-threads 2 over PreSettle on the 16 RPC threads"),
)
BATCH_MODES = {"batch-presettle": "batch_presettle_vs_echo_calls",
               "batch-settle": "batch_settle_vs_echo_calls",
               "batch-presettle-stream": "batch_presettle_stream_vs_echo_calls",
               "batch-settle-stream": "batch_settle_stream_vs_echo_calls"}
# The issue's batch goals in claims/s, printed beside their ratios (not asserted): echo here
# ranges about 1,900-5,700 calls/s, so a ratio to it can miss a goal whose claims/s were met,
# or the other way round (docs/performance.md, "2026-12-07").
ABSOLUTE_CLAIMS_PER_S = {"batch-presettle": 1_000_000, "batch-settle": 40_000,
                         "batch-presettle-stream": 1_000_000, "batch-settle-stream": 40_000}


def _cfg(**kw) -> dict:
    cfg = {"members": 600, "seed": 3, "prefix": "G", "run": f"g{os.getpid()}",
           "concurrency": 64, "rate": 0, "clients": 1, "channels": 1, "duration": 3.0,
           "warmup": 0.5, "max_requests": 200_000, "timeout": 30.0, "batch": 1000,
           "batch_members": 100, "subprocess_client": False}
    cfg.update(kw)
    return cfg


def _median(rows: list[dict], key: str = "calls_per_s") -> dict:
    rows = sorted(rows, key=lambda r: r[key])
    return rows[len(rows) // 2]


def measure() -> dict:
    figures: dict = {}
    # the 1-process and 2-process PreSettle runs both come first after registration, so
    # that the two servers are compared in the same state
    # 2 clients x 4 connections: with 2 connections each, one run in eight had all four on one
    # process (SO_REUSEPORT hashes connections) and measured 1.0 x (benchmarks.load)
    two_client = _cfg(clients=2, channels=default_channels(2), run=f"g{os.getpid()}p1")
    one = SpawnedServer(1)
    try:
        register(one.target, 600, 3, "G")
        one_proc = run_mode(one.target, "presettle", two_client, one)
        by: dict[str, list[dict]] = {}
        for r in range(2):                      # interleaved rounds, median kept
            for mode in ("echo", "presettle", "settle"):
                by.setdefault(mode, []).append(run_mode(one.target, mode,
                                                        _cfg(run=f"g{os.getpid()}r{r}"), one))
        rows = {m: _median(v) for m, v in by.items()}
        for mode in BATCH_MODES:
            rows[mode] = run_mode(one.target, mode, _cfg(concurrency=2,
                                                         run=f"g{os.getpid()}b"), one)
    finally:
        one.stop()
        one.cleanup()
    pooled = SpawnedServer(1, extra=("--presettle-threads", "2"))
    try:
        register(pooled.target, 600, 3, "G")
        on_pool = {m: run_mode(pooled.target, m, _cfg(run=f"g{os.getpid()}q"), pooled)
                   for m in ("echo", "presettle")}
    finally:
        pooled.stop()
        pooled.cleanup()
    two = SpawnedServer(2)
    try:
        register(two.target, 600, 3, "G")
        two_proc = run_mode(two.target, "presettle", dict(two_client, run=f"g{os.getpid()}p2"),
                            two)
    finally:
        assert two.stop() == 0
        two.cleanup()
    figures.update(ratios(list(rows.values())))
    echo = rows["echo"]["calls_per_s"]
    for mode, key in BATCH_MODES.items():
        figures[key] = round(rows[mode]["claims_per_s"] / echo, 2)
    figures["two_processes_vs_one"] = round(two_proc["calls_per_s"] / one_proc["calls_per_s"], 3)
    figures["presettle_pool_vs_rpc_threads"] = round(
        on_pool["presettle"]["calls_per_s"] / rows["presettle"]["calls_per_s"], 3)
    figures["absolute"] = {m: {k: r[k] for k in ("calls_per_s", "claims_per_s", "p50_ms",
                                                 "p99_ms", "errors")}
                           for m, r in {**rows, "presettle x1 (2 clients)": one_proc,
                                        "presettle x2 processes": two_proc,
                                        **{f"{m} on the PreSettle pool": r
                                           for m, r in on_pool.items()}}.items()}
    return figures


ATTEMPTS = 2  # a figure fails only if it misses its floor in every attempt: one noisy burst
#              from a neighbour on the shared machine is not a regression, two in a row are


@pytest.mark.timeout(400)
def test_performance_ratios_hold_their_floors():
    failing = {g.key for g in GOALS}
    for attempt in range(ATTEMPTS):
        figures = measure()
        lines = []
        for g in GOALS:
            v = figures[g.key]
            lines.append(f"{g.key}: {v} ({g.stated(v)}; guard "
                         f"{'>=' if g.higher_is_better else '<='} {g.limit():.3g}) — {g.what}")
            if g.ok(v):
                failing.discard(g.key)
        for mode, row in figures["absolute"].items():
            lines.append(f"  {mode}: {row}")
            if mode in ABSOLUTE_CLAIMS_PER_S:
                want, got = ABSOLUTE_CLAIMS_PER_S[mode], row["claims_per_s"]
                lines.append(f"    {got:,.0f} claims/s against the issue's {want:,}: "
                             f"{'met' if got >= want else 'NOT met'} in claims/s")
            assert not row["errors"], f"{mode} had errors: {row['errors']}"
        print(f"attempt {attempt + 1}:\n" + "\n".join(lines))
        if os.environ.get("REIMBURSE_PERF_REPORT"):
            with open(os.environ["REIMBURSE_PERF_REPORT"], "w") as f:
                json.dump(figures, f, indent=1)
        if not failing:
            return
    assert not failing, ("below the floor by more than the margin in every attempt: "
                         + ", ".join(sorted(failing)))
