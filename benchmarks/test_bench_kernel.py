"""pytest-benchmark: reference vs kernel on the same 10,000 synthetic claims.

    .venv/bin/python -m pytest benchmarks/test_bench_kernel.py

One group, so the table compares them; each run also checks its results against the
reference's. No test asserts a time: timings on a shared machine are noisy.
"""
from __future__ import annotations

import pytest

from benchmarks.kernel import (
    batch_funds, run_batch, run_settle, run_single, single_calls, single_funds, synthetic,
)
from engine import kernel, reference

GROUP = "settle 10,000 synthetic claims"


@pytest.fixture(scope="module")
def work():
    return synthetic()


@pytest.fixture(scope="module")
def want(work):
    return run_settle(work, reference.settle)


def test_reference_settles_claim_by_claim(benchmark, work, want):
    benchmark.group = GROUP
    assert benchmark.pedantic(run_settle, args=(work, reference.settle), rounds=3) == want


def test_kernel_adapter_settles_claim_by_claim(benchmark, work, want):
    benchmark.group = GROUP
    assert benchmark.pedantic(run_settle, args=(work, kernel.settle), rounds=5) == want


def test_kernel_single_call_per_claim(benchmark, work, want):
    benchmark.group = GROUP
    assert single_funds(work) == want
    benchmark.pedantic(run_single, setup=lambda: ((work, *single_calls(work)), {}), rounds=30)


def test_kernel_batch(benchmark, work, want):
    benchmark.group = GROUP
    out = benchmark.pedantic(run_batch, setup=lambda: ((work, *work.fresh()), {}), rounds=100)
    assert batch_funds(work, out) == want
