"""Conformance through the wire: settle scenario files against a running server.

    python -m server.scenarios --target HOST:PORT (--ca FILE --token-file F | --insecure)
                               [--check] FILE...

Registers each scenario's member and facilities under fresh ids (a uuid suffix), settles its
claims in order with ``Settle`` and prints the same lines as ``python -m engine.scenarios``;
``--check`` compares with ``expected``, prints every difference to stderr and exits 1 on any.
Exit 2: a file cannot be read or the server refused a call.
"""
from __future__ import annotations

import argparse
import sys
import uuid

import grpc

from engine.scenarios import Scenario, result_line, run_files
from reimburse.v1 import registry_pb2 as reg
from server import convert
from server.client import Client
from server.tls import MissingSecurity, add_client_args, security_from_args


def register(client: Client, sc: Scenario, suffix: str) -> tuple[str, dict[str, str]]:
    """Upsert the scenario's facilities and member under fresh ids; return the ids used."""
    fac_ids = {fid: f"{fid}-{suffix}" for fid in sc.facilities}
    for fid, level in sc.facilities.items():
        raw = sc.raw["facilities"][fid]
        client.call(client.registry.UpsertFacility, reg.UpsertFacilityRequest(
            facility=reg.Facility(facility_id=fac_ids[fid], level=convert.LEVEL_WIRE[level],
                                  designated=raw.get("designated", True),
                                  district=raw.get("district", ""))))
    m = sc.member
    member_id = f"{sc.id}-{suffix}"
    wire = reg.Member(
        member_id=member_id, identity=convert.IDENTITY_WIRE[m.identity], retired=m.retired,
        groups=[convert.GROUP_WIRE[g] for g in sorted(m.groups)],
        maternity_eligible=m.maternity_eligible,
        primary_facility_id=fac_ids.get(m.primary_facility, m.primary_facility or ""),
        other_facility_id=fac_ids.get(m.other_facility, m.other_facility or ""),
        account_balance_fen=sc.opening_balance_fen, region=sc.region)
    convert.date_to_wire(m.continuous_since, wire.continuous_since)
    client.call(client.registry.UpsertMember, reg.UpsertMemberRequest(member=wire))
    return member_id, fac_ids


def run_scenario(client: Client, sc: Scenario) -> list[dict]:
    """Settle the scenario's claims through the service; one result line per claim."""
    suffix = uuid.uuid4().hex[:12]
    member_id, fac_ids = register(client, sc, suffix)
    settled: dict[str, str] = {}  # claim id -> settlement id, for referral chains
    out = []
    for c in sc.claims:
        req = convert.settle_request(
            c.claim, request_id=f"{c.id}-{suffix}", member_id=member_id,
            facility_id=fac_ids[c.claim.facility_id],
            referral_from=settled[c.referral_from] if c.referral_from else "")
        reply = client.call(client.settlement.Settle, req)
        settled[c.id] = reply.settlement.settlement_id
        out.append(result_line(c.id, convert.settlement_from_wire(reply.settlement)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.scenarios", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", metavar="FILE")
    ap.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the server")
    ap.add_argument("--check", action="store_true", help="compare with 'expected'; exit 1 on "
                                                         "any difference")
    add_client_args(ap)  # registering members and facilities needs the admin credential
    args = ap.parse_args(argv)
    try:
        security = security_from_args(args)
    except (MissingSecurity, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with Client(args.target, security=security) as client:
        return run_files(args.files, lambda sc: run_scenario(client, sc), args.check,
                         errors=(grpc.RpcError,), describe=_describe)


def _describe(e: Exception) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e)

if __name__ == "__main__":
    sys.exit(main())
