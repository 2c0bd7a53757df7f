"""The kernel against the reference on the same synthetic claims, measured in one run.

    python -m benchmarks.kernel            # a table
    python -m benchmarks.kernel --json     # one JSON line

Times are nanoseconds per claim, the best of several repeats (timings on a shared machine are
noisy; the ratio of two figures of the same run is what to compare). Every kernel run is checked
against the reference's results before anything is reported.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from array import array
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Callable

from engine import _kernel, kernel, reference
from engine.loader import store
from engine.model import GROUPS, Accumulators, Bill, Claim, Member

N_CLAIMS = 10_000
N_MEMBERS = 1_000
FACILITIES = (("P", "LEVEL_1"), ("O", "LEVEL_2"), ("H2", "LEVEL_2"), ("H3", "LEVEL_3"),
              ("X", "NON_DESIGNATED"))


@dataclass
class Workload:
    """Claims of many members in date order, and the same claims packed for the kernel."""

    policy: object
    members: list[Member]
    items: list[tuple[int, Claim]]      # (member index, claim)
    opening: list[int]                  # personal-account balance per member
    compiled: kernel.CompiledPolicy
    claims: array                       # packed claim rows (settle_batch)
    rows: list[array]                   # one claim row each (settle_one)
    slots: array                        # (member, year) state slot of each claim
    accounts: array                     # member index of each claim
    n_slots: int

    def __len__(self) -> int:
        return len(self.items)

    def fresh(self):
        """Zeroed accumulators, opening balances and an output matrix for one batch run."""
        cp = self.compiled
        return cp.new_state(self.n_slots), array("q", self.opening), cp.new_out(len(self))


def synthetic(n_claims: int = N_CLAIMS, n_members: int = N_MEMBERS, seed: int = 0) -> Workload:
    """A mix like a district's: mostly small outpatient visits, some admissions, a few huge."""
    rng = random.Random(seed)
    members = []
    for _ in range(n_members):
        employee = rng.random() < 0.6
        groups = [g for g in GROUPS if (not employee or g != "FIVE_GUARANTEE")
                  and rng.random() < 0.05]
        members.append(Member(
            "EMPLOYEE" if employee else "RESIDENT",
            date(2015, 1, 1) + timedelta(days=rng.randrange(3 * 365)),
            retired=employee and rng.random() < 0.25, groups=frozenset(groups),
            maternity_eligible=rng.random() < 0.1, primary_facility="P",
            other_facility="O" if employee else None))
    days = sorted(date(2018, 1, 1) + timedelta(days=rng.randrange(3 * 365))
                  for _ in range(n_claims))
    items = []
    for day in days:
        m = rng.randrange(n_members)
        fid, level = rng.choice(FACILITIES)
        if rng.random() < 0.7:
            claim = Claim("OUTPATIENT", day, fid, level, Bill(rng.randrange(50_000)),
                          use_account=rng.random() < 0.5,
                          referred_by_primary_on=(day - timedelta(days=rng.randrange(60))
                                                  if rng.random() < 0.3 else None))
        else:
            total = rng.choice((rng.randrange(100_000, 3_000_000), rng.randrange(30_000_000),
                                rng.randrange(1_000_000_000)))
            claim = Claim("INPATIENT", day, fid, level, Bill(total, rng.randrange(total // 5 + 1)),
                          use_account=rng.random() < 0.5, out_of_area_unfiled=rng.random() < 0.05,
                          referral=(ref := rng.random() < 0.1),
                          chain_deductible_fen=rng.randrange(90_000) if ref else 0)
        items.append((m, claim))
    policy = store().policy_for("jiangmen", days[0])
    assert all(store().policy_for("jiangmen", c.service_date) is policy for _, c in items)
    cp = kernel.compile_policy(policy)
    slot_of: dict[tuple[int, int], int] = {}
    slots = array("q", (slot_of.setdefault((m, c.service_date.year), len(slot_of))
                        for m, c in items))
    rows = [kernel.claim_row(members[m], c) for m, c in items]
    return Workload(policy, members, items, [rng.randrange(200_000) for _ in members], cp,
                    kernel.pack_claims(rows), [array("q", r) for r in rows], slots,
                    array("q", (m for m, _ in items)), len(slot_of))


# --- the runs; each returns the fund total of every claim, to compare -----------------------

def run_settle(w: Workload, settle: Callable = reference.settle) -> list[int]:
    """Claim by claim through a settle function (reference.settle or kernel.settle)."""
    years: dict[tuple[int, int], Accumulators] = {}
    balance = list(w.opening)
    funds = []
    for m, c in w.items:
        key = (m, c.service_date.year)
        s = settle(w.policy, w.members[m], c, years.get(key) or Accumulators(key[1]), balance[m])
        years[key] = s.accumulators_after
        balance[m] = s.balance_after_fen
        funds.append(s.fund_total_fen)
    return funds


def run_batch(w: Workload, state: array, balances: array, out: array) -> array:
    refused = kernel.settle_batch(w.compiled, w.claims, w.slots, state, balances, out,
                                  w.accounts)
    assert refused == 0
    return out


def batch_funds(w: Workload, out: array) -> list[int]:
    size = w.compiled.out_size
    return out[_kernel.O_FUND_TOTAL::size].tolist()


def single_calls(w: Workload):
    """(claim row, its slot's state) per claim with fresh state, and one output buffer."""
    states = [w.compiled.new_state() for _ in range(w.n_slots)]
    return [(row, states[s]) for row, s in zip(w.rows, w.slots)], w.compiled.new_out()


def run_single(w: Workload, calls, out: array) -> None:
    """The raw single-claim entry from Python, one call per claim, buffers preallocated."""
    settle_one, k = _kernel.settle_one, w.compiled.kernel
    for row, state in calls:
        settle_one(k, row, state, out)


def single_funds(w: Workload) -> list[int]:
    """run_single with fresh state, keeping each claim's fund total."""
    calls, out = single_calls(w)
    settle_one, k, at = _kernel.settle_one, w.compiled.kernel, _kernel.O_FUND_TOTAL
    funds = []
    for row, state in calls:
        assert settle_one(k, row, state, out) == _kernel.ST_OK
        funds.append(out[at])
    return funds


def _best_ns(fn: Callable[[], object], setup: Callable[[], tuple], repeat: int) -> int:
    best = None
    for _ in range(repeat):
        args = setup()
        gc.disable()   # as timeit does: collections are not the code's cost
        try:
            t0 = time.perf_counter_ns()
            fn(*args)
            dt = time.perf_counter_ns() - t0
        finally:
            gc.enable()
        best = dt if best is None else min(best, dt)
    return best


def measure(w: Workload, repeat: int = 20, repeat_python: int = 3) -> dict[str, float]:
    want = run_settle(w, reference.settle)
    # agreement first: figures of a kernel that disagrees are worthless
    assert run_settle(w, kernel.settle) == want, "kernel.settle disagrees with the reference"
    assert batch_funds(w, run_batch(w, *w.fresh())) == want, "settle_batch disagrees"
    assert single_funds(w) == want, "settle_one disagrees"
    n = len(w)
    ref = _best_ns(lambda: run_settle(w, reference.settle), tuple, repeat_python) / n
    adapter = _best_ns(lambda: run_settle(w, kernel.settle), tuple, repeat_python) / n
    batch = _best_ns(lambda *a: run_batch(w, *a), w.fresh, repeat) / n
    single = _best_ns(lambda *a: run_single(w, *a), lambda: single_calls(w), repeat) / n
    return {
        "kernel_batch_ns_per_claim": round(batch, 1),
        "kernel_single_call_ns": round(single, 1),
        "reference_ns_per_claim": round(ref, 1),
        "kernel_adapter_call_ns": round(adapter, 1),
        "batch_speedup_vs_reference": round(ref / batch, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--claims", type=int, default=N_CLAIMS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    w = synthetic(args.claims, seed=args.seed)
    r = measure(w)
    if args.json:
        print(json.dumps(r))
        return 0
    ref = r["reference_ns_per_claim"]
    print(f"{len(w):,} synthetic claims of {len(w.members):,} members, {w.n_slots:,} "
          f"member-years; best of repeats, ns per claim")
    print(f"{'':34}{'ns/claim':>12}{'vs reference':>14}")
    for label, key in (("reference.settle", "reference_ns_per_claim"),
                       ("kernel.settle (adapter)", "kernel_adapter_call_ns"),
                       ("kernel settle_one (raw call)", "kernel_single_call_ns"),
                       ("kernel settle_batch", "kernel_batch_ns_per_claim")):
        print(f"{label:34}{r[key]:>12,.1f}{ref / r[key]:>13.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
