"""The servicers: validate -> load member and facility -> evaluate (pure) -> commit -> reply.

Thin on purpose: the numbers come from ``engine``, persistence and locking from the ledger,
validation from ``server.convert``. Every method goes through ``rpc`` which maps domain errors
to status codes (``server.errors``) and writes one JSON log line per call. PreSettle and
Settle are served from the request's bytes (``SettlementServicer._wire``): most requests in C
(``server._single``), the others through the same ``rpc`` methods, with the same mapping and
log line.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from datetime import date
from typing import Callable, NamedTuple

import grpc
from google.protobuf.message import DecodeError

from engine.evaluate import resolve_impl, settle as evaluate
from engine.loader import PolicyStore
from engine.errors import InvalidInput
from reimburse.v1 import policy_pb2_grpc, registry_pb2_grpc, settlement_pb2_grpc
from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from server import _single, auth, convert, fastpath, logs, wire
from server.errors import DeadlinePassed, NotCovered, to_status
from server.ledger.base import (
    BatchItem, Ledger, MemberRecord, MemberState, Outcome, ReferralReversed, SettleResult,
)
from server.views import accumulators_view, policy_view

log = logging.getLogger("reimburse.rpc")

STATUS_WIRE = {"SETTLED": ty.SETTLEMENT_STATUS_SETTLED, "REVERSED": ty.SETTLEMENT_STATUS_REVERSED}


_LOGGED = ("request_id", "member_id", "facility_id", "settlement_id")
_NESTED = (("member", "member_id"), ("facility", "facility_id"))
_FIELDS_OF: dict[type, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {}


def _call_fields(request) -> dict:
    """Request id, member and facility of any of our requests, for the log line."""
    spec = _FIELDS_OF.get(type(request))
    if spec is None:   # which of the names the request type has, found once per type
        spec = _FIELDS_OF[type(request)] = (
            tuple(n for n in _LOGGED if hasattr(request, n)),
            tuple((w, k) for w, k in _NESTED if hasattr(request, w)))
    direct, nested = spec
    out = {}
    for name in direct:
        v = getattr(request, name)
        if v:
            out[name] = v
    for wrapper, key in nested:
        v = getattr(getattr(request, wrapper), key, "")
        if v:
            out[key] = v
    return out


def _status(e: Exception, name: str) -> tuple[grpc.StatusCode, str, object]:
    """The code, details and status of an exception a servicer raised (one table,
    ``server.errors``); call it in the ``except`` block."""
    status = to_status(e)
    if status is None:  # a bug here, not the caller's: don't leak its text
        log.exception("internal error in %s", name)
        return grpc.StatusCode.INTERNAL, "internal error", None
    return status.code, status.details, status


def _abort(context, code: grpc.StatusCode, error: str, status) -> None:
    if status is None:
        context.abort(code, error)
    context.abort_with_status(status)


_CODE_NAME = {c: c.name for c in grpc.StatusCode}   # Enum.name is a property: 0.3 µs a call


def _log_call(name: str, fields: dict | tuple, start: float, code: grpc.StatusCode,
              error: str | None) -> None:
    """The call's log line, of its fields or of the request server._single.parse_settle read.
    The writer thread builds it (logs.info_of): the call only queues what it is made of."""
    logs.info_of(log, _call_line, name, fields, int((time.perf_counter() - start) * 1e6),
                 code, auth.current(), error)


def _call_line(name: str, fields: dict | tuple, latency_us: int, code: grpc.StatusCode,
               caller, error: str | None) -> dict:
    if type(fields) is tuple:
        fields = _parsed_fields(fields)
    line = {"event": "rpc", "method": name, **fields, "code": _CODE_NAME[code],
            "latency_ms": latency_us / 1e3}
    if caller is not None:
        line["caller"] = str(caller)
    if error:
        line["error"] = error
    return line


def rpc(method):
    """Map domain errors to their status (one table) and log one line per call."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self, request, context):
        start = time.perf_counter()
        code, error = grpc.StatusCode.OK, None
        try:
            return method(self, request, context)
        except Exception as e:
            code, error, status = _status(e, name)
            _abort(context, code, error, status)
        finally:
            _log_call(name, _call_fields(request), start, code, error)
    return wrapper


def _parsed_fields(req: tuple) -> dict:
    """_call_fields of a request server._single.parse_settle read."""
    request_id, member_id, facility_id = req[:3]
    out = {"request_id": request_id} if request_id else {}
    out["member_id"], out["facility_id"] = member_id, facility_id
    return out


def _check_deadline(context) -> None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlinePassed("the call's deadline passed before it was settled")


def check_covered(m: MemberRecord, day: date) -> None:
    """The member's benefit period and contribution run must include the service date."""
    why = m.not_covered_on(day)
    if why:
        raise NotCovered("NOT_COVERED", f"members/{m.member_id}",
                         f"member {m.member_id!r} is not covered on {day}: {why}")


class SettleJob(NamedTuple):
    """A Settle as data: its idempotency key and member-year, and what its evaluation needs.
    Plain values, so that the settlement writer process (``server.writer``) can be sent one
    and evaluate it with its own ``Core``."""

    item: BatchItem
    req: tuple | None = None      # server._single.parse_settle's tuple: the C path ...
    data: bytes = b""             # ... and the request's bytes, for the general one
    call: convert.SettleCall | None = None   # else the validated request
    chain_fen: int = 0            # and its referral chain's deductible (Core.referral_chain)

    def evaluation(self, core: Core) -> Callable[[MemberState], Outcome]:
        """The ledger's callback: the settlement over the member's state as committed."""
        req, data, call, chain = self.req, self.data, self.call, self.chain_fen
        if req is None:
            return lambda state: core.evaluate(
                call, convert.rule_level(state.facility), chain, state)[0]

        def evaluate(state: MemberState) -> Outcome:
            out = fastpath.settle_wire(core, req, state)
            if out is None:   # the general evaluation, which says why it refuses
                call = convert.validate_settle(st.SettleRequest.FromString(data),
                                               require_request_id=True)
                out = core.evaluate(call, convert.rule_level(state.facility), 0, state)[0]
            return out
        return evaluate


class Core:
    """What the servicers share: the ledger, the policies and the evaluator choice."""

    def __init__(self, ledger: Ledger, policies: PolicyStore, impl: str | None = None,
                 writer=None):
        self.ledger, self.policies, self.impl = ledger, policies, impl
        # server.writer.SettlementWriter: Settle's transactions in a process of their own
        self.writer = writer
        # the kernel's wire path (server.fastpath) unless the reference is asked for
        self.fast = resolve_impl(impl) == "kernel"
        # One call at a time runs its Python inside the gate. The GIL lets only one run
        # anyway; threads waiting on a lock sleep, while threads waiting for the GIL force it
        # to change hands every switch interval (docs/performance.md: PreSettle +15 % calls/s,
        # a lower p99). Only where reads answer from this process: a read over the network
        # inside the gate would keep every other call waiting through it.
        self.gate = (threading.Lock() if getattr(ledger, "local_reads", False)
                     else contextlib.nullcontext())

    def evaluate(self, call: convert.SettleCall, level: str, chain_fen: int,
                 state: MemberState, commit: bool = True) -> tuple[Outcome, ty.Settlement]:
        """Pure: the settlement of ``call`` over ``state``, as the reply and ledger outcome
        (``commit=False``: a pre-settlement, whose outcome's ``result`` is left empty)."""
        m = state.member
        check_covered(m, call.service_date)
        policy = self.policies.policy_for(m.region, call.service_date)
        if self.fast and not call.want_trace:
            return fastpath.settle(fastpath.plan_for(policy), call, m, level, chain_fen,
                                   state.accumulators, state.balance_fen, serialize=commit)
        member = convert.engine_member(m)
        s = evaluate(policy, member, call.claim(level, chain_fen), state.accumulators,
                     state.balance_fen, impl=self.impl, trace=call.want_trace)
        view = accumulators_view(policy, member, m.member_id, s.accumulators_after,
                                 call.service_date, s.balance_after_fen)
        msg = convert.settlement_to_wire(call, m, s, view)
        return Outcome(deltas=s.deltas(state.accumulators), account_paid_fen=s.account_paid_fen,
                       chain_deductible_after_fen=s.chain_deductible_after_fen,
                       policy_version=s.policy_version, result=msg.SerializeToString(),
                       fund_total_fen=s.fund_total_fen), msg

    def settle(self, job: SettleJob) -> SettleResult:
        """Commit ``job``'s settlement: through the settlement writer process where there is
        one and it takes the call, else through this process's ledger."""
        if self.writer is not None:
            got = self.writer.settle(job)
            if got is not None:
                return got
        it = job.item
        return self.ledger.settle(
            facility_id=it.facility_id, request_id=it.request_id, request_hash=it.request_hash,
            member_id=it.member_id, year=it.year, referral_from=it.referral_from,
            evaluate=job.evaluation(self))

    def referral_chain(self, call: convert.SettleCall) -> int:
        """Deductible already paid along the chain of the admission this one was referred from."""
        if not call.referral_from:
            return 0
        rec = self.ledger.get_settlement(call.referral_from)
        field = "referral_from_settlement_id"
        if rec.member_id != call.member_id:
            raise InvalidInput(field, f"settlement {rec.settlement_id!r} is another member's")
        if ty.Settlement.FromString(rec.result).kind != ty.CLAIM_KIND_INPATIENT:
            raise InvalidInput(field, f"settlement {rec.settlement_id!r} is not an inpatient "
                                      "settlement")
        if rec.status != "SETTLED":
            raise ReferralReversed(rec.settlement_id)   # checked again as it commits
        return rec.chain_deductible_after_fen

    def stored(self, rec) -> ty.Settlement:
        """A journal record's reply: the stored bytes plus what the ledger assigned."""
        msg = ty.Settlement.FromString(rec.result)
        msg.settlement_id = rec.settlement_id
        msg.status = STATUS_WIRE[rec.status]
        return msg


class SettlementServicer(settlement_pb2_grpc.SettlementServiceServicer):
    def __init__(self, core: Core):
        self.core = core

    # PreSettle and Settle as the server registers them: from the request's bytes (server.wire)
    def PreSettleWire(self, data: bytes, context):
        return self._wire("PreSettle", data, context, self._pre_settle_fast, self.PreSettle)

    def SettleWire(self, data: bytes, context):
        return self._wire("Settle", data, context, self._settle_fast, self.Settle)

    def _wire(self, name: str, data: bytes, context, fast, general):
        """A request of the fast path's kind (server._single.parse_settle) answered by
        ``fast`` in C (docs/performance.md: a PreSettle 6 µs against 45), any other, and any
        ``fast`` leaves (None), parsed and answered by ``general``: the same reply and the
        same log line either way."""
        req = _single.parse_settle(data) if self.core.fast else None
        if req is not None:
            start = time.perf_counter()
            try:
                reply = fast(req, data, context)
            except Exception as e:
                code, error, status = _status(e, name)
                _log_call(name, req, start, code, error)
                _abort(context, code, error, status)
            if reply is not None:
                _log_call(name, req, start, grpc.StatusCode.OK, None)
                return reply
        try:
            request = st.SettleRequest.FromString(data)
        except DecodeError as e:
            auth.deny_malformed(context, f"/{wire.SERVICE}/{name}",
                                st.SettleRequest.DESCRIPTOR.full_name, e, auth.current())
        return general(request, context)

    def _pre_settle_fast(self, req: tuple, data: bytes, context) -> bytes | None:
        with self.core.gate:
            return fastpath.pre_settle_wire(self.core, req)

    def _settle_fast(self, req: tuple, data: bytes, context) -> bytes | None:
        request_id, member_id, facility_id, _, day, *_ = req
        if not request_id:
            return None    # required: the general path says so
        with self.core.gate:
            request_hash = _single.request_digest(req)
        _check_deadline(context)
        res = self.core.settle(SettleJob(
            BatchItem(facility_id, request_id, request_hash, member_id, day.year), req, data))
        rec = res.record
        return wire.settlement_response(rec.result, rec.settlement_id, rec.status,
                                        not res.created)

    @rpc
    def PreSettle(self, request, context):
        with self.core.gate:
            return self._pre_settle(request)

    def _pre_settle(self, request):
        reads = self.core.ledger.reads()   # registry and accumulators as of one moment
        call = convert.validate_settle(request, require_request_id=False)
        level = convert.rule_level(reads.get_facility(call.facility_id))
        chain = self.core.referral_chain(call)
        m = reads.get_member(call.member_id)
        acc = reads.accumulators(call.member_id, call.service_date.year)
        _, msg = self.core.evaluate(call, level, chain, MemberState(m, acc, m.account_balance_fen),
                                    commit=False)
        msg.status = ty.SETTLEMENT_STATUS_PRE_SETTLED
        return st.SettleResponse(settlement=msg)

    @rpc
    def Settle(self, request, context):
        with self.core.gate:   # not while waiting for the ledger
            call = convert.validate_settle(request, require_request_id=True)
            chain = self.core.referral_chain(call)
            request_hash = convert.request_hash(request)
        _check_deadline(context)  # a caller that gave up must not find a settlement later
        # The facility comes with the member's state, from the ledger's transaction: no read
        # of it (and of the read cache's validity) before.
        res = self.core.settle(SettleJob(
            BatchItem(call.facility_id, call.request_id, request_hash, call.member_id,
                      call.service_date.year, call.referral_from), call=call, chain_fen=chain))
        rec = res.record   # the stored reply as is, its id and status appended (server.wire)
        return wire.settlement_response(rec.result, rec.settlement_id, rec.status,
                                        not res.created)

    @rpc
    def Reverse(self, request, context):
        sid = convert.check_id(request.settlement_id, "settlement_id")
        fid = convert.check_id(request.facility_id, "facility_id")
        convert.check_id(request.request_id, "request_id", required=False)
        rec = self.core.ledger.reverse(settlement_id=sid, facility_id=fid)
        return st.ReverseResponse(settlement=self.core.stored(rec))

    @rpc
    def GetSettlement(self, request, context):
        sid = convert.check_id(request.settlement_id, "settlement_id")
        rec = self.core.ledger.get_settlement(sid)
        auth.check_owner(rec.facility_id, f"settlement {sid!r}")  # only the settling facility
        return st.GetSettlementResponse(settlement=self.core.stored(rec))

    @rpc
    def GetAccumulators(self, request, context):
        mid = convert.check_id(request.member_id, "member_id")
        year = request.year
        if not 1 <= year <= 9999:
            raise InvalidInput("year", "is required (1..9999)")
        as_of = convert.date_from_wire(request.as_of, request, "as_of", "as_of")
        if as_of is None:
            today = date.today()
            as_of = (today if today.year == year else
                     date(year, 12, 31) if year < today.year else date(year, 1, 1))
        elif as_of.year != year:
            raise InvalidInput("as_of", f"must be within the year {year}")
        m = self.core.ledger.get_member(mid)
        policy = self.core.policies.policy_for(m.region, as_of)
        acc = self.core.ledger.accumulators(mid, year)
        return accumulators_view(policy, convert.engine_member(m), mid, acc, as_of,
                                 m.account_balance_fen)


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, core: Core):
        self.core = core

    @rpc
    def UpsertMember(self, request, context):
        if not request.HasField("member"):
            raise InvalidInput("member", "is required")
        rec = convert.member_from_wire(request.member)
        if rec.region not in self.core.policies.files:
            raise InvalidInput("member.region", f"unknown region {rec.region!r}; known: "
                                                f"{self.core.policies.regions()}")
        stored = self.core.ledger.upsert_member(rec, keep_balance=request.keep_account_balance)
        return convert.member_to_wire(stored)

    @rpc
    def GetMember(self, request, context):
        rec = self.core.ledger.get_member(convert.check_id(request.member_id, "member_id"))
        return convert.member_to_wire(rec)

    @rpc
    def UpsertFacility(self, request, context):
        if not request.HasField("facility"):
            raise InvalidInput("facility", "is required")
        rec = convert.facility_from_wire(request.facility)
        self.core.ledger.upsert_facility(rec)
        return convert.facility_to_wire(rec)

    @rpc
    def GetFacility(self, request, context):
        rec = self.core.ledger.get_facility(convert.check_id(request.facility_id, "facility_id"))
        return convert.facility_to_wire(rec)


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, core: Core):
        self.core = core

    @rpc
    def GetPolicy(self, request, context):
        region = convert.check_id(request.region, "region", required=False) or \
            convert.DEFAULT_REGION
        day = convert.date_from_wire(request.date, request, "date", "date", required=True)
        return policy_view(self.core.policies.policy_for(region, day))
