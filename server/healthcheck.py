"""Exit 0 iff the server's grpc.health.v1 says SERVING (for container HEALTHCHECKs).

    python -m server.healthcheck [--target HOST:PORT] [--service NAME] [--timeout SECONDS]
                                 (--insecure | --ca FILE [--cert F --key F] [--server-name N])

Health is open to every caller, so no token is needed; a server running mutual TLS needs a
client certificate for any connection at all. The flags default from the environment
(REIMBURSE_INSECURE=1, REIMBURSE_CA, REIMBURSE_CLIENT_CERT/KEY, REIMBURSE_TLS_SERVER_NAME), so a
container's HEALTHCHECK follows the server's configuration. A bad configuration exits 1, as an
unhealthy server does (exit 2 is reserved by Docker's HEALTHCHECK).
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.tls import ClientSecurity, MissingSecurity, add_client_args, security_from_args


def check(target: str, service: str = "", timeout: float = 3.0,
          security: ClientSecurity | None = None) -> bool:
    """``security`` None: plaintext (a server started with --insecure)."""
    with (security or ClientSecurity(insecure=True)).channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            print(f"{target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{target}: {status}", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.healthcheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=os.environ.get("REIMBURSE_LISTEN", "127.0.0.1:50051"))
    ap.add_argument("--service", default="", help="service name; default: the whole server")
    ap.add_argument("--timeout", type=float, default=3.0)
    add_client_args(ap)
    args = ap.parse_args(argv)
    try:
        security = security_from_args(args)
    except (MissingSecurity, OSError) as e:
        print(f"healthcheck: {e}", file=sys.stderr)
        return 1
    return 0 if check(args.target, args.service, args.timeout, security) else 1


if __name__ == "__main__":
    sys.exit(main())
