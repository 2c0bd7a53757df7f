"""Who may call what: authentication (bearer tokens, client certificates) and the rules.

``Gatekeeper`` is a gRPC server interceptor that ``server.app.create_server`` always installs.
It does two things for every call:

1. A request whose bytes are not a valid message of the method's type is ``INVALID_ARGUMENT``
   (gRPC for Python would answer ``INTERNAL``: it is the caller's fault, not ours).
2. With an ``AuthConfig`` (every server not started with ``--insecure``), the caller is
   identified and the method's rule applied before the servicer runs:

   - Identity. ``authorization: Bearer <token>`` looked up in the tokens file (hashes only, see
     ``TokenStore``), or else the verified client certificate of mutual TLS: its subject CN is
     the facility id, or the admin role when listed in ``--tls-admin-cn``. A token that is sent
     must be valid, also next to a certificate. No identity: ``UNAUTHENTICATED``.
   - Rules (``RULES``; anything not listed needs the admin role, health checks and reflection
     are open to anyone). A refusal is ``PERMISSION_DENIED``:

     ====================================== =================================================
     PreSettle, Settle, Reverse, the batch   ``facility_id`` of the request (of every item of
     calls (SettleBatch, PreSettleBatch)     a batch, of every batch of a stream) must be the
     and their streams                       caller's own
     GetSettlement                           only the settling facility's (checked after the
                                             lookup, ``check_owner``: PERMISSION_DENIED, as a
                                             Reverse of another facility's settlement is)
     GetAccumulators, GetMember              any facility: a member may be treated anywhere
                                             and the hospital at checkout shows caps and
                                             balance; every read is logged with its caller
     GetFacility, GetPolicy                  any facility
     UpsertMember, UpsertFacility, the rest  admin only (registry and policy administration)
     ====================================== =================================================

     The admin role may do everything, including acting for any facility (operations,
     conformance runs): keep admin tokens out of hospital systems.

The caller of the call being served is in ``current()`` for the servicers and the log line.

Tokens file (``--tokens``), one token per line, ``#`` comments::

    sha256:<64 hex digits of SHA-256 of the token>  facility <facility id>
    sha256:<…>  admin

Make entries with ``python -m server.auth add --tokens FILE --facility H3`` (prints the new
token once; only its hash is stored). Tokens are 256-bit random, so an unsalted fast hash is
enough: nothing is learnt from the file. The file is re-read when it changes (checked at most
once a second), so tokens are added or revoked without a restart.
"""
from __future__ import annotations

import argparse
import contextvars
import hashlib
import logging
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import grpc
from google.protobuf.message import DecodeError

from server.ledger.base import Forbidden
from server.wire import RAW_REQUESTS

if TYPE_CHECKING:
    from server.tls import ServerTLS

log = logging.getLogger("reimburse.rpc")

ADMIN = "admin"
HASH_PREFIX = "sha256:"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a facility, or the admin role (``facility_id`` None)."""

    facility_id: str | None
    via: str = "token"                 # token | certificate

    @property
    def admin(self) -> bool:
        return self.facility_id is None

    def __str__(self) -> str:
        return ADMIN if self.admin else f"facility:{self.facility_id}"

    def may_act_for(self, facility_id: str) -> bool:
        return self.admin or facility_id == self.facility_id


_caller: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("caller",
                                                                           default=None)


def current() -> Principal | None:
    """The caller of the call being served; None when the server authenticates nobody."""
    return _caller.get()


def check_owner(facility_id: str, what: str) -> None:
    """Refuse (``Forbidden``: PERMISSION_DENIED) a facility other than ``facility_id``."""
    p = _caller.get()
    if p is not None and not p.may_act_for(facility_id):
        raise Forbidden(f"{what} belongs to another facility; {p} may not see it")


# --- tokens ----------------------------------------------------------------------------------

def hash_token(token: str) -> str:
    return HASH_PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_tokens(text: str, source: str = "tokens") -> dict[str, Principal]:
    out: dict[str, Principal] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        digest = parts[0].lower()
        hexpart = digest.removeprefix(HASH_PREFIX)
        if (not digest.startswith(HASH_PREFIX) or len(hexpart) != 64
                or any(c not in "0123456789abcdef" for c in hexpart)):
            raise ValueError(f"{source}:{n}: expected 'sha256:<64 hex digits>' first (the "
                             "hash of the token, never the token itself)")
        if len(parts) == 2 and parts[1] == ADMIN:
            p = Principal(None)
        elif len(parts) == 3 and parts[1] == "facility" and parts[2].strip():
            p = Principal(parts[2].strip())
        else:
            raise ValueError(f"{source}:{n}: expected 'admin' or 'facility <facility id>' "
                             "after the hash")
        if digest in out:
            raise ValueError(f"{source}:{n}: the same token hash is listed twice")
        out[digest] = p
    return out


class TokenStore:
    """Token hash -> principal, from a file re-read when it changes (at most once a second);
    a file that turns unreadable or invalid keeps the last good entries and logs an error."""

    def __init__(self, entries: dict[str, Principal], path: Path | None = None):
        self._entries = entries
        self._path = path
        self._stamp = self._stat()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenStore":
        p = Path(path)
        return cls(parse_tokens(p.read_text(encoding="utf-8"), str(p)), p)

    @classmethod
    def of(cls, tokens: dict[str, str]) -> "TokenStore":
        """From plaintext ``token -> facility id or "admin"`` (tests)."""
        return cls({hash_token(t): Principal(None if who == ADMIN else who)
                    for t, who in tokens.items()})

    def __len__(self) -> int:
        return len(self._entries)

    def _stat(self):
        if self._path is None:
            return None
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self._path is None or now - self._checked < 1.0:
            return
        with self._lock:
            if now - self._checked < 1.0:
                return
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp:
                return
            try:
                entries = parse_tokens(self._path.read_text(encoding="utf-8"), str(self._path))
            except (OSError, ValueError) as e:
                log.error({"event": "tokens not reloaded", "error": str(e)})
                return
            self._entries, self._stamp = entries, stamp
            log.info({"event": "tokens reloaded", "tokens": len(entries)})

    def lookup(self, token: str) -> Principal | None:
        self._maybe_reload()
        return self._entries.get(hash_token(token))


# --- configuration ---------------------------------------------------------------------------

@dataclass(frozen=True)
class AuthConfig:
    """How callers are identified: bearer tokens and/or (verified) client certificates."""

    tokens: TokenStore | None = None
    certificates: bool = False                 # the server runs mutual TLS
    admin_names: frozenset[str] = frozenset()  # certificate CNs with the admin role

    def __post_init__(self):
        if self.tokens is None and not self.certificates:
            raise ValueError("an AuthConfig needs tokens or client certificates")


@dataclass(frozen=True)
class Security:
    """What ``create_server`` needs: TLS (None: plaintext) and authentication (None: none)."""

    tls: "ServerTLS | None" = None
    auth: AuthConfig | None = None

    def weaknesses(self) -> list[str]:
        out = []
        if self.tls is None:
            out.append("plaintext (no TLS)" + (": bearer tokens travel in clear"
                                               if self.auth is not None else ""))
        if self.auth is None:
            out.append("no authentication: any caller may settle, reverse and change the "
                       "registry")
        return out


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """The security options of ``python -m server``."""
    env = os.environ.get
    ap.add_argument("--tls-cert", default=env("REIMBURSE_TLS_CERT"),
                    help="PEM certificate chain of the server ($REIMBURSE_TLS_CERT)")
    ap.add_argument("--tls-key", default=env("REIMBURSE_TLS_KEY"),
                    help="PEM private key of the server ($REIMBURSE_TLS_KEY)")
    ap.add_argument("--tls-client-ca", default=env("REIMBURSE_TLS_CLIENT_CA"),
                    help="PEM CA of client certificates: mutual TLS, every connection must "
                         "present a certificate whose subject CN is a facility id "
                         "($REIMBURSE_TLS_CLIENT_CA)")
    ap.add_argument("--tls-admin-cn", action="append",
                    default=[n for n in (env("REIMBURSE_TLS_ADMIN_CN") or "").split(",") if n],
                    help="a client certificate CN with the admin role; repeatable "
                         "($REIMBURSE_TLS_ADMIN_CN, comma-separated)")
    ap.add_argument("--tokens", default=env("REIMBURSE_TOKENS"),
                    help="bearer tokens file: 'sha256:<hash> facility <id>' or "
                         "'sha256:<hash> admin' per line; make entries with "
                         "`python -m server.auth add` ($REIMBURSE_TOKENS)")
    ap.add_argument("--insecure", action="store_true",
                    default=(env("REIMBURSE_INSECURE") or "").strip().lower()
                    in ("1", "true", "yes", "on"),
                    help="allow running without TLS and/or without authentication (local "
                         "development, tests, a trusted network); logged as a warning "
                         "($REIMBURSE_INSECURE=1)")


class InsecureRefused(ValueError):
    """Neither a complete secure configuration nor ``--insecure``."""


def security_from_args(args: argparse.Namespace) -> Security:
    """The Security the options ask for. Without ``--insecure`` it must be complete: TLS and
    at least one way to authenticate (tokens, client certificates); else ``InsecureRefused``."""
    from server.tls import ServerTLS
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InsecureRefused("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise InsecureRefused("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    tls = (ServerTLS.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
           if args.tls_cert else None)
    tokens = TokenStore.load(args.tokens) if args.tokens else None
    auth = (AuthConfig(tokens=tokens, certificates=bool(args.tls_client_ca),
                       admin_names=frozenset(args.tls_admin_cn))
            if tokens is not None or args.tls_client_ca else None)
    sec = Security(tls=tls, auth=auth)
    if sec.weaknesses() and not args.insecure:
        raise InsecureRefused(
            "refusing to start without TLS and authentication: give --tls-cert/--tls-key "
            "and --tokens FILE and/or --tls-client-ca FILE, or --insecure (REIMBURSE_INSECURE=1)"
            " to run without them on a trusted network (missing: "
            + "; ".join(sec.weaknesses()) + "). See docs/deployment.md")
    return sec


# --- rules -----------------------------------------------------------------------------------

OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")
FACILITY_FIELDS = ("facility_id", "facility_ids")
_has_facility_cache: dict[str, bool] = {}


def _repeated(field) -> bool:
    rep = getattr(field, "is_repeated", None)  # protobuf >= 5.28; older: label
    return rep if rep is not None else field.label == field.LABEL_REPEATED


def _is_facility_field(f) -> bool:
    return f.name in FACILITY_FIELDS and f.type == f.TYPE_STRING


def _has_facility(desc) -> bool:
    """Whether messages of this type can name a facility anywhere inside (cached per type)."""
    known = _has_facility_cache.get(desc.full_name)
    if known is not None:
        return known
    _has_facility_cache[desc.full_name] = False  # a recursive type: not through itself
    found = any(_is_facility_field(f) or (
        f.message_type is not None and not f.message_type.GetOptions().map_entry
        and _has_facility(f.message_type)) for f in desc.fields)
    _has_facility_cache[desc.full_name] = found
    return found


def _collect(msg, prefix: str, out: list) -> None:
    for f in msg.DESCRIPTOR.fields:
        name = prefix + f.name
        if _is_facility_field(f):
            value = getattr(msg, f.name)
            out.extend([(f"{name}[{i}]", v) for i, v in enumerate(value)]
                       if _repeated(f) else [(name, value)])
        elif (f.message_type is not None and not f.message_type.GetOptions().map_entry
              and _has_facility(f.message_type)):
            if _repeated(f):
                for i, item in enumerate(getattr(msg, f.name)):
                    _collect(item, f"{name}[{i}].", out)
            elif msg.HasField(f.name):
                _collect(getattr(msg, f.name), name + ".", out)


def _facility_ids(request) -> list[tuple[str, str]] | None:
    """(field path, facility id) of every ``facility_id``/``facility_ids`` in the request, at
    any depth (a batch's SettleRequests, its claim columns); None when its type has no place
    for a facility id at all (then nobody but admin may call)."""
    if not _has_facility(request.DESCRIPTOR):
        return None
    if not hasattr(request, "HasField") and hasattr(request, "message"):
        request = request.message()  # kept as bytes by the servicer (server.wire.RawRequest)
    out: list[tuple[str, str]] = []
    _collect(request, "", out)
    return out


def any_caller(p: Principal, request) -> str | None:
    return None


def admin_only(p: Principal, request) -> str | None:
    return None if p.admin else f"{p} may not call this: it needs the admin credential"


def as_itself(p: Principal, request) -> str | None:
    """Every facility_id of the request is the caller's own (admin: any)."""
    if p.admin:
        return None
    found = _facility_ids(request)
    if found is None:  # fail closed: a request that names no facility is the admin's
        return f"{p} may not call this: the request names no facility"
    for path, fid in found:
        if fid != p.facility_id:
            return f"{p} may act only as itself, not as {path} {fid!r}"
    return None


Rule = Callable[[Principal, object], "str | None"]
RULES: dict[str, Rule] = {
    "/reimburse.v1.SettlementService/PreSettle": as_itself,
    "/reimburse.v1.SettlementService/Settle": as_itself,
    "/reimburse.v1.SettlementService/SettleBatch": as_itself,
    "/reimburse.v1.SettlementService/PreSettleBatch": as_itself,
    "/reimburse.v1.SettlementService/SettleBatchStream": as_itself,       # each batch
    "/reimburse.v1.SettlementService/PreSettleBatchStream": as_itself,
    "/reimburse.v1.SettlementService/Reverse": as_itself,
    "/reimburse.v1.SettlementService/GetSettlement": any_caller,   # + check_owner in servicer
    "/reimburse.v1.SettlementService/GetAccumulators": any_caller,
    "/reimburse.v1.RegistryService/GetMember": any_caller,
    "/reimburse.v1.RegistryService/GetFacility": any_caller,
    "/reimburse.v1.PolicyService/GetPolicy": any_caller,
    "/reimburse.v1.RegistryService/UpsertMember": admin_only,
    "/reimburse.v1.RegistryService/UpsertFacility": admin_only,
}


def rule_for(method: str) -> Rule | None:
    """The rule of a full method name; None: open to anyone (health, reflection)."""
    service = method.lstrip("/").split("/", 1)[0]
    if service in OPEN_SERVICES:
        return None
    return RULES.get(method, admin_only)


# --- the interceptor ---------------------------------------------------------------------------

class _Malformed:
    def __init__(self, type_name: str, error: Exception):
        self.type_name, self.error = type_name, error


def _safe(deserializer, type_name: str):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 — any parse failure is the caller's bad bytes
            return _Malformed(type_name, e)
    return parse


def deny_malformed(context, method: str, type_name: str, error: Exception,
                   caller=None) -> None:
    """INVALID_ARGUMENT for bytes that are not a valid request message, logged (and raised:
    ``context.abort``). Also the answer of a method that parses its own bytes
    (``server.wire.RAW_REQUESTS``)."""
    _deny(context, method, grpc.StatusCode.INVALID_ARGUMENT,
          f"the request is not a valid {type_name} message: {type(error).__name__}", caller)


def _deny(context, method: str, code: grpc.StatusCode, message: str, caller=None) -> None:
    line = {"event": "rpc", "method": method.rsplit("/", 1)[-1], "code": code.name,
            "error": message, "peer": context.peer()}
    if caller is not None:
        line["caller"] = str(caller)
    log.info(line)
    context.abort(code, message)


class Gatekeeper(grpc.ServerInterceptor):
    def __init__(self, auth: AuthConfig | None = None):
        self.auth = auth
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    # -- identity --
    def identify(self, context) -> tuple[Principal | None, str]:
        """The caller, or None and why not."""
        a = self.auth
        header = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
                break
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None, "the authorization header must be 'Bearer <token>'"
            if a.tokens is None:
                return None, "this server accepts no bearer tokens (client certificates only)"
            p = a.tokens.lookup(token.strip())
            return (p, "") if p is not None else (None, "unknown or revoked bearer token")
        if a.certificates:
            names = context.auth_context().get("x509_common_name") or []
            if names:
                cn = names[0].decode("utf-8", "replace")
                return Principal(None if cn in a.admin_names else cn, via="certificate"), ""
        how = " or a client certificate" if a.certificates else ""
        return None, f"authentication required: send 'authorization: Bearer <token>'{how}"

    # -- wrapping --
    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        rule = rule_for(method) if self.auth is not None else None
        if h.request_streaming:
            return h if rule is None else self._guard_stream(method, h, rule)
        deser = h.request_deserializer
        # a method that parses its own bytes: the rule looks at them as a RawRequest
        raw = RAW_REQUESTS.get(method) if deser is None else None
        type_name = raw.DESCRIPTOR.full_name if raw is not None else _type_name(deser)
        kind = "unary_stream" if h.response_streaming else "unary_unary"
        behavior = getattr(h, kind)

        def guarded(request, context):
            caller = None
            if rule is not None:
                caller, why = self.identify(context)
                if caller is None:
                    _deny(context, method, grpc.StatusCode.UNAUTHENTICATED, why)
            if isinstance(request, _Malformed):
                deny_malformed(context, method, request.type_name, request.error, caller)
            if rule is None:
                return behavior(request, context)
            _check(context, method, rule, caller, request if raw is None else raw(request),
                   type_name)
            token = _caller.set(caller)
            try:
                return behavior(request, context)
            finally:
                _caller.reset(token)

        pool = getattr(behavior, "experimental_thread_pool", None)
        if pool is not None:   # server.wire.on_pool: the pool goes with the behaviour
            guarded.experimental_thread_pool = pool
        replaced = {kind: guarded}
        if deser is not None:
            replaced["request_deserializer"] = _safe(deser, type_name)
        return h._replace(**replaced)

    def _guard_stream(self, method, h, rule):
        """A client-streaming method: the caller identified once, the rule applied to each
        request as it arrives (an admin-only rule at once), the caller in ``current()`` while
        the servicer works on the stream."""
        kind = "stream_stream" if h.response_streaming else "stream_unary"
        behavior = getattr(h, kind)
        type_name = _type_name(h.request_deserializer)

        def guarded(request_iterator, context):
            caller, why = self.identify(context)
            if caller is None:
                _deny(context, method, grpc.StatusCode.UNAUTHENTICATED, why)
            if rule is admin_only and not caller.admin:
                _deny(context, method, grpc.StatusCode.PERMISSION_DENIED,
                      admin_only(caller, None), caller)

            def checked():
                for request in request_iterator:
                    _check(context, method, rule, caller, request, type_name)
                    yield request

            token = _caller.set(caller)
            try:
                out = behavior(checked(), context)
            finally:
                _caller.reset(token)
            if not h.response_streaming:
                return out
            return _each_as(caller, out)
        return h._replace(**{kind: guarded})


def _type_name(deserializer) -> str:
    """The request type's full name, from a message class's ``FromString``."""
    desc = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return desc.full_name if desc is not None else "request"


def _check(context, method: str, rule: Rule, caller: Principal, request, type_name: str):
    """The method's rule for this caller and request: PERMISSION_DENIED when it refuses,
    INVALID_ARGUMENT when the request, parsed only now, is not a valid message."""
    try:
        problem = rule(caller, request)
    except DecodeError as e:  # a request parsed lazily (server.wire.RawRequest)
        deny_malformed(context, method, type_name, e, caller)
    if problem:
        _deny(context, method, grpc.StatusCode.PERMISSION_DENIED, problem, caller)


def _each_as(caller, responses):
    """The responses of a streaming servicer, each computed with ``caller`` current: gRPC
    runs a response generator step by step, after the handler call has returned."""
    while True:
        token = _caller.set(caller)
        try:
            item = next(responses)
        except StopIteration:
            return
        finally:
            _caller.reset(token)
        yield item


# --- python -m server.auth ---------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m server.auth",
        description="Manage the tokens file of `python -m server --tokens FILE`.")
    sub = ap.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="make a new random token, store its hash, print it once")
    add.add_argument("--tokens", required=True, help="the tokens file (created if missing)")
    who = add.add_mutually_exclusive_group(required=True)
    who.add_argument("--facility", help="the facility id the token stands for")
    who.add_argument("--admin", action="store_true", help="the admin role")
    add.add_argument("--comment", default="", help="a note kept on the line above")
    h = sub.add_parser("hash", help="the file line for a token read from stdin")
    h.add_argument("--facility")
    h.add_argument("--admin", action="store_true")
    args = ap.parse_args(argv)
    if args.command == "hash" and bool(args.facility) == bool(args.admin):
        ap.error("hash: give exactly one of --facility or --admin")
    role = ADMIN if args.admin else f"facility {args.facility}"
    if args.command == "hash":
        token = sys.stdin.readline().strip()
        if not token:
            ap.error("hash: no token on stdin")
        print(f"{hash_token(token)} {role}")
        return 0
    token = secrets.token_urlsafe(32)
    path = Path(args.tokens)
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    parse_tokens(existing, str(path))  # refuse to append to a broken file
    line = (f"# {args.comment}\n" if args.comment else "") + f"{hash_token(token)} {role}\n"
    if existing and not existing.endswith("\n"):
        line = "\n" + line
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line)
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
