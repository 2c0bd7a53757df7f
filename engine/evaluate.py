"""Choose the evaluator: the reference (readable spec) or the Cython kernel (same results).

``impl`` is "reference", "kernel" or "auto" (the default, also read from the environment
variable ``REIMBURSE_ENGINE``): auto takes the kernel when it is built, else the reference.
"""
from __future__ import annotations

import os

from engine import reference
from engine.model import Accumulators, Claim, Member, Settlement
from engine.policy import Policy

IMPLS = ("reference", "kernel")


def kernel_available() -> bool:
    try:
        import engine._kernel  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str | None = None) -> str:
    impl = impl or os.environ.get("REIMBURSE_ENGINE", "auto")
    if impl == "auto":
        return "kernel" if kernel_available() else "reference"
    if impl not in IMPLS:
        raise ValueError(f"unknown engine implementation {impl!r}; expected one of "
                         f"{IMPLS + ('auto',)}")
    return impl


def settle(policy: Policy, member: Member, claim: Claim, acc: Accumulators,
           balance_fen: int = 0, *, impl: str | None = None, trace: bool = False) -> Settlement:
    """Settle one claim. ``trace=True`` always uses the reference, which explains itself."""
    if trace or resolve_impl(impl) == "reference":
        return reference.settle(policy, member, claim, acc, balance_fen)
    from engine import kernel
    return kernel.settle(policy, member, claim, acc, balance_fen)
