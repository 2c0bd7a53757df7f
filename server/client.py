"""A small client: one channel, the three service stubs and a default deadline."""
from __future__ import annotations

import grpc

from reimburse.v1 import policy_pb2_grpc, registry_pb2_grpc, settlement_pb2_grpc
from server.tls import ClientSecurity

DEFAULT_TIMEOUT_S = 10.0


class Client:
    def __init__(self, target: str | None = None, timeout: float = DEFAULT_TIMEOUT_S, *,
                 channel: grpc.Channel | None = None, security: ClientSecurity | None = None):
        """Connect to ``target`` as ``security`` says (``server.tls.ClientSecurity``: TLS, client
        certificate, bearer token; None: plaintext without credentials, for a server started
        with --insecure), or use an existing ``channel`` (not closed here)."""
        self._owned = channel is None
        if channel is None:
            channel = (security or ClientSecurity(insecure=True)).channel(target)
        self.channel = channel
        self.timeout = timeout
        self.settlement = settlement_pb2_grpc.SettlementServiceStub(self.channel)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self.policy = policy_pb2_grpc.PolicyServiceStub(self.channel)

    def call(self, method, request, **kw):
        """Call a stub method with the default deadline (every call has one)."""
        kw.setdefault("timeout", self.timeout)
        return method(request, **kw)

    def close(self) -> None:
        if self._owned:
            self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
