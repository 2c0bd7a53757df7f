"""Serving the settlement service with replies that may already be serialized.

``add_settlement_service`` registers ``SettlementService`` as the generated
``add_SettlementServiceServicer_to_server`` does, except that a method may return its response
as ``bytes`` (already encoded) instead of a message: ``Settle`` answers with the ledger's stored
reply plus two appended fields (``settlement_response``) and never parses it, and the batch
methods encode their columns themselves (``server.batch``).

``PreSettle`` and ``Settle`` are registered without a deserializer: gRPC runs a deserializer
on its one event thread, which every call waits for, and their fast path reads the bytes in C
anyway (``SettlementServicer._wire``). ``RAW_REQUESTS`` names such methods with the
``RawRequest`` type an interceptor that must look inside gets (``server.auth``).

``add_echo_service`` registers the load harness's baseline, ``reimburse.bench.v1.EchoService/Echo``:
the request bytes back, nothing else. It is off unless the server is started with
``--bench-echo`` (``REIMBURSE_BENCH_ECHO=1``): a benchmark's reference point, not an API, and
left out of reflection.
"""
from __future__ import annotations

import functools
from concurrent import futures

import grpc

from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty

SERVICE = "reimburse.v1.SettlementService"
PRE_SETTLE = f"/{SERVICE}/PreSettle"
SETTLE = f"/{SERVICE}/Settle"
ECHO_SERVICE = "reimburse.bench.v1.EchoService"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"


class RawRequest:
    """A request kept as its bytes. It shows its message type (``DESCRIPTOR``) and, parsed on
    demand, the message (``message()``, which raises DecodeError for bytes that are not one)
    to interceptors that look."""

    TYPE: type = None   # the message class, set by each subclass
    __slots__ = ("data", "_msg")

    def __init__(self, data: bytes):
        self.data, self._msg = data, None

    @classmethod
    def FromString(cls, data: bytes):
        return cls(data)

    def message(self):
        if self._msg is None:
            self._msg = self.TYPE.FromString(self.data)
        return self._msg


class RawSettle(RawRequest):
    TYPE = st.SettleRequest
    DESCRIPTOR = TYPE.DESCRIPTOR
    __slots__ = ()


# methods registered without a deserializer: full method name -> what their bytes are
RAW_REQUESTS: dict[str, type[RawRequest]] = {PRE_SETTLE: RawSettle, SETTLE: RawSettle}


def _serializer(cls):
    encode = cls.SerializeToString

    def serialize(response) -> bytes:
        return response if type(response) is bytes else encode(response)
    return serialize


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string_field(number: int, text: str) -> bytes:
    data = text.encode("utf-8")
    return varint(number << 3 | 2) + varint(len(data)) + data


_STATUS = {"SETTLED": ty.SETTLEMENT_STATUS_SETTLED, "REVERSED": ty.SETTLEMENT_STATUS_REVERSED}


def stored_settlement(result: bytes, settlement_id: str, status: str) -> bytes:
    """A journal record's reply as an encoded ``Settlement``: the stored bytes (which carry
    neither) followed by ``settlement_id`` (field 1) and ``status`` (field 7). Fields may come
    in any order on the wire; parsers take them as if set on the message."""
    return (result + _string_field(1, settlement_id)
            + b"\x38" + varint(_STATUS[status]))          # 0x38: field 7, varint


def settlement_response(result: bytes, settlement_id: str, status: str,
                        replayed: bool) -> bytes:
    """An encoded ``SettleResponse`` {settlement: stored reply, replayed}."""
    s = stored_settlement(result, settlement_id, status)
    return b"\x0a" + varint(len(s)) + s + (b"\x10\x01" if replayed else b"")


def on_pool(behavior, pool: futures.ThreadPoolExecutor | None):
    """``behavior`` run by ``pool``'s threads instead of the server's (None: the server's).

    grpc's synchronous server takes a method's pool from its behaviour's
    ``experimental_thread_pool`` (grpc/_server.py, ``_select_thread_pool_for_behavior``);
    ``server.auth.Gatekeeper`` carries it over to the behaviour it wraps, and
    tests/test_presettle_pool.py checks that the calls do run there."""
    if pool is None:
        return behavior
    run = functools.partial(behavior)   # a bound method takes no attributes; a partial does
    run.experimental_thread_pool = pool
    return run


def add_settlement_service(servicer, server: grpc.Server, extra: dict | None = None,
                           presettle_pool: futures.ThreadPoolExecutor | None = None) -> None:
    """The generated registration, with responses that may be bytes; ``extra`` adds handlers
    (method name -> grpc.RpcMethodHandler) of methods served on the side (the batch ones)."""
    def unary(method, req, rep):
        return grpc.unary_unary_rpc_method_handler(
            method, request_deserializer=req.FromString, response_serializer=_serializer(rep))

    handlers = {
        "PreSettle": grpc.unary_unary_rpc_method_handler(   # bytes in (the module docstring)
            on_pool(servicer.PreSettleWire, presettle_pool),
            response_serializer=_serializer(st.SettleResponse)),
        "Settle": grpc.unary_unary_rpc_method_handler(
            servicer.SettleWire, response_serializer=_serializer(st.SettleResponse)),
        "Reverse": unary(servicer.Reverse, st.ReverseRequest, st.ReverseResponse),
        "GetSettlement": unary(servicer.GetSettlement, st.GetSettlementRequest,
                               st.GetSettlementResponse),
        "GetAccumulators": unary(servicer.GetAccumulators, st.GetAccumulatorsRequest,
                                 ty.Accumulators),
        **(extra or {}),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _echo(request: bytes, context) -> bytes:
    return request


def add_echo_service(server: grpc.Server,
                     pool: futures.ThreadPoolExecutor | None = None) -> None:
    """The bare echo baseline (see the module docstring), on ``pool`` where PreSettle has
    one: the baseline goes through the same stack as the call it is compared with."""
    handlers = {"Echo": grpc.unary_unary_rpc_method_handler(on_pool(_echo, pool))}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(ECHO_SERVICE, handlers),))
    server.add_registered_method_handlers(ECHO_SERVICE, handlers)
