"""Pure settlement engine: policy rules as data, a reference evaluator and a Cython kernel.

Knows nothing of gRPC or SQL. Typical use::

    from engine import store, settle
    policy = store().policy_for("jiangmen", claim.service_date)
    result = settle(policy, member, claim, accumulators, balance_fen)
"""
from engine.errors import EngineError, InvalidInput, NoPolicyInForce, PolicyFileError  # noqa: F401
from engine.evaluate import resolve_impl, settle  # noqa: F401
from engine.loader import PolicyStore, load_policy_file, store  # noqa: F401
from engine.model import (  # noqa: F401
    Accumulators, Bill, Claim, LayerPayment, LineItem, Member, Settlement, Step,
)
