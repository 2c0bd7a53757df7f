"""The load harness measures what it says: every settling call it makes is a new settlement.

A request id sent twice is answered from the journal (a replay), which costs the server less
than a settlement: a harness that repeated its warm-up's ids in the measured phase, or one
mode's ids in the next, would report replays as settlements.
"""
from __future__ import annotations

from benchmarks.load import register, run_mode
from server.ledger.base import SettleResult
from server.ledger.memory import MemoryLedger
from service_fixtures import running_server


class CountingLedger(MemoryLedger):
    """The fake ledger, counting the settlements it makes and the replays it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.created = self.replays = 0

    def _count(self, res) -> None:
        if isinstance(res, SettleResult):
            if res.created:
                self.created += 1
            else:
                self.replays += 1

    def settle(self, **kw):
        res = super().settle(**kw)
        self._count(res)
        return res

    def settle_batch(self, items, evaluate):
        results = super().settle_batch(items, evaluate)
        for res in results:
            self._count(res)
        return results


def test_no_call_of_a_run_replays_an_earlier_one():
    ledger = CountingLedger()
    cfg = {"members": 40, "seed": 3, "prefix": "H", "run": "t1", "concurrency": 2, "rate": 0,
           "clients": 1, "channels": 1, "duration": 0.4, "warmup": 0.3,
           "max_requests": 10_000, "timeout": 30.0, "batch": 20, "batch_members": 5,
           "subprocess_client": False}
    with running_server(ledger) as r:
        register(r.target, cfg["members"], cfg["seed"], cfg["prefix"])
        sent = {}
        # the same run id for every mode, as one round of the harness has
        for mode in ("settle", "mix", "batch-settle", "batch-settle-stream"):
            row = run_mode(r.target, mode, cfg)
            assert not row["errors"], (mode, row["errors"])
            assert row["sent"] > row["calls"] > 0, (mode, row)   # warm-up calls were made too
            sent[mode] = row["sent"]
    assert ledger.replays == 0
    # every settling call settled: one per Settle, 3 in 10 of the mix, every claim of a batch
    # that the policy accepts (the synthetic claims are all settleable)
    mix_settles = sum(1 for i in range(sent["mix"]) if i % 10 in (0, 3, 6))
    assert ledger.created == (sent["settle"] + mix_settles
                              + cfg["batch"] * (sent["batch-settle"]
                                                + sent["batch-settle-stream"]))
