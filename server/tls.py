"""TLS for the server and for our clients: credentials from PEM files, command-line flags.

Server side (``python -m server``): ``--tls-cert`` and ``--tls-key`` (the certificate chain and
its key) turn TLS on; ``--tls-client-ca`` additionally makes every connection present a client
certificate signed by that CA (mutual TLS). gRPC for Python has no "verify if presented" mode: a
client without a certificate cannot connect at all then (it sees UNAVAILABLE), health checks
included, so give the health probe a certificate too.

Client side (``reimburse``, ``python -m server.scenarios``, ``python -m server.healthcheck``,
``server.client.Client``): ``ClientSecurity`` says how to reach a server: plaintext only when
asked for (``insecure``), else TLS verified against ``ca`` (or the system roots), optionally
with a client certificate (mTLS) and/or a bearer token sent as ``authorization: Bearer …``.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import grpc


def _read(path: str | os.PathLike | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


# --- server ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerTLS:
    """PEM bytes: the server's certificate chain and key, and the CA of client certificates."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: str, key: str, client_ca: str | None = None) -> "ServerTLS":
        return cls(_read(cert), _read(key), _read(client_ca))

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None)


# --- client ----------------------------------------------------------------------------------

class TokenHeader(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call of a channel (TLS or not)."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d):
        md = list(d.metadata or ())
        md.append(self._header)
        return d._replace(metadata=md) if hasattr(d, "_replace") else _Details(d, md)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)
        self.metadata = metadata


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches the server. ``insecure``: plaintext (the token, if any, is then sent
    in clear: only for loopback or a trusted network). Otherwise TLS verified against ``ca``
    (None: the system roots), with ``cert``/``key`` for mutual TLS; ``server_name`` overrides the
    name checked against the server certificate (e.g. when dialling an IP address)."""

    insecure: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    token: str | None = None
    server_name: str | None = None

    def channel(self, target: str, options: list | None = None) -> grpc.Channel:
        opts = list(options or [])
        if self.insecure:
            channel = grpc.insecure_channel(target, options=opts)
        else:
            if self.server_name:
                opts.append(("grpc.ssl_target_name_override", self.server_name))
            creds = grpc.ssl_channel_credentials(_read(self.ca), _read(self.key),
                                                 _read(self.cert))
            channel = grpc.secure_channel(target, creds, options=opts)
        if self.token:
            channel = grpc.intercept_channel(channel, TokenHeader(self.token))
        return channel


class MissingSecurity(ValueError):
    """A client was asked to connect without saying whether plaintext is meant."""


def add_client_args(ap: argparse.ArgumentParser) -> None:
    """The connection flags every command-line client of ours takes."""
    g = ap.add_argument_group("connection security (one of --insecure, --ca, --tls)")
    g.add_argument("--insecure", action="store_true",
                   help="plaintext, no TLS: only for a server started with --insecure "
                        "($REIMBURSE_INSECURE=1 when no TLS flag is given)")
    g.add_argument("--ca", default=os.environ.get("REIMBURSE_CA"),
                   help="TLS: PEM file of the CA that signed the server certificate "
                        "($REIMBURSE_CA)")
    g.add_argument("--tls", action="store_true",
                   help="TLS verified against the system's root certificates")
    g.add_argument("--cert", default=os.environ.get("REIMBURSE_CLIENT_CERT"),
                   help="client certificate PEM for mutual TLS ($REIMBURSE_CLIENT_CERT)")
    g.add_argument("--key", default=os.environ.get("REIMBURSE_CLIENT_KEY"),
                   help="its private key PEM ($REIMBURSE_CLIENT_KEY)")
    g.add_argument("--token", default=os.environ.get("REIMBURSE_TOKEN"),
                   help="bearer token naming the caller ($REIMBURSE_TOKEN; prefer --token-file: "
                        "an argument is visible to other users in the process table)")
    g.add_argument("--token-file", default=os.environ.get("REIMBURSE_TOKEN_FILE"),
                   help="file holding the bearer token ($REIMBURSE_TOKEN_FILE)")
    g.add_argument("--server-name", default=os.environ.get("REIMBURSE_TLS_SERVER_NAME"),
                   help="name to verify in the server certificate instead of the target host "
                        "($REIMBURSE_TLS_SERVER_NAME)")


def security_from_args(args: argparse.Namespace) -> ClientSecurity:
    """The ClientSecurity the flags of ``add_client_args`` ask for; ``MissingSecurity`` when
    neither TLS nor plaintext was chosen (plaintext is never a silent default)."""
    tls = bool(args.ca or args.tls or args.cert)
    token = (args.token or "").strip() or None
    if args.token_file:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
    insecure = args.insecure or (not tls and _truthy(os.environ.get("REIMBURSE_INSECURE")))
    if args.insecure and tls:
        raise MissingSecurity("--insecure contradicts --ca/--tls/"
                              "--cert: choose plaintext or TLS")
    if not insecure and not tls:
        raise MissingSecurity("say how to connect: --ca FILE (or --tls) for TLS, or --insecure "
                              "for a plaintext server on a trusted network "
                              "(env REIMBURSE_CA / REIMBURSE_INSECURE=1)")
    if bool(args.cert) != bool(args.key):
        raise MissingSecurity("--cert and --key go together")
    return ClientSecurity(insecure=insecure, ca=args.ca, cert=args.cert, key=args.key,
                          token=token, server_name=args.server_name)
