"""Domain errors -> gRPC status codes, in one table, with google.rpc error details.

Anything a client sent wrong ends here as INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
PERMISSION_DENIED or FAILED_PRECONDITION; only a bug in the server is INTERNAL.
"""
from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from engine.errors import InvalidInput, NoPolicyInForce
from server.ledger.base import (
    Conflict, Forbidden, LedgerUnavailable, NotFound, ReferralReversed,
)


class NotCovered(Exception):
    """The request is valid but the member or claim is not covered (FAILED_PRECONDITION)."""

    def __init__(self, kind: str, subject: str, reason: str):
        self.kind, self.subject, self.reason = kind, subject, reason
        super().__init__(reason)

    def __reduce__(self):   # pickled by its fields (the writer process sends it)
        return type(self), (self.kind, self.subject, self.reason)


class DeadlinePassed(Exception):
    """The caller's deadline passed before the work started: nothing was done."""


# The one table. Looked up along the exception's class hierarchy, most specific first, so
# NoPolicyInForce (a kind of InvalidInput in the engine) is a precondition on the wire.
STATUS: dict[type[BaseException], grpc.StatusCode] = {
    NoPolicyInForce: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotCovered: grpc.StatusCode.FAILED_PRECONDITION,
    ReferralReversed: grpc.StatusCode.FAILED_PRECONDITION,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Conflict: grpc.StatusCode.ALREADY_EXISTS,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    DeadlinePassed: grpc.StatusCode.DEADLINE_EXCEEDED,
    LedgerUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def code_of(e: BaseException) -> grpc.StatusCode | None:
    for cls in type(e).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return None


def _pack(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _precondition(kind: str, subject: str, description: str):
    return error_details_pb2.PreconditionFailure(violations=[
        error_details_pb2.PreconditionFailure.Violation(
            type=kind, subject=subject, description=description)])


def to_status(e: BaseException) -> grpc.Status | None:
    """The rich status for a domain error, or None for anything else (a server bug)."""
    code = code_of(e)
    if code is None:
        return None
    details = []
    if isinstance(e, NoPolicyInForce):
        field = "service_date" if e.field == "date" else e.field
        details.append(_precondition("NO_POLICY_IN_FORCE", field, e.problem))
        message = f"no policy in force: {e.problem}"
    elif isinstance(e, InvalidInput):
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=e.field, description=e.problem)]))
        message = f"{e.field}: {e.problem}"
    elif isinstance(e, NotCovered):
        details.append(_precondition(e.kind, e.subject, e.reason))
        message = e.reason
    elif isinstance(e, ReferralReversed):
        message = str(e)
        details.append(_precondition(e.kind, f"settlements/{e.settlement_id}", message))
    else:
        message = str(e)
    return rpc_status.to_status(status_pb2.Status(
        code=getattr(code_pb2, code.name), message=message,
        details=[_pack(d) for d in details]))
