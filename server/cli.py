"""The command line for people: settle claims, reverse, look things up, import registries.

    reimburse [--target HOST:PORT] (--ca FILE [--token-file F] | --insecure) COMMAND ...
                                                      (also: python -m server.cli)

    presettle CLAIM.json [--trace] [--json]    compute, commit nothing
    settle CLAIM.json [--trace] [--json]       compute and commit (idempotent by request_id)
    reverse SETTLEMENT_ID --facility ID        undo a settlement
    settlement SETTLEMENT_ID                   show a settlement as returned, current status
    accumulators MEMBER_ID [--year Y] [--as-of YYYY-MM-DD]
    member MEMBER_ID | facility FACILITY_ID    show a registry entry
    settle-batch CLAIMS.jsonl [--batch N] [--max-rate CLAIMS_PER_S]
                                               settle every claim of a file (one a line)
    presettle-batch CLAIMS.jsonl [--batch N]   over one stream of batches; a JSON line each
    import members|facilities FILE.csv|FILE.jsonl
    policy show [--region R] [--date YYYY-MM-DD]

A claim file is a scenario claim (shared/spec/scenarios.md) plus the ids:
    {"request_id": "H3-20180305-0001", "member_id": "M1", "facility_id": "H3",
     "kind": "INPATIENT", "date": "2018-03-05",
     "items": [{"category": "A", "amount": "30000.00"}], "use_account": false}
with "referral_from" naming the settlement id of the referring admission. A batch file holds
one such object a line; the whole file is checked before anything is sent, and each claim's
result is printed as a JSON line (its line number, request id, code and amounts, or its error).
The stream's deadline is --timeout for each batch (plus the time --max-rate paces it to).
Amounts are printed in yuan; --json prints the reply as protobuf JSON (amounts in fen).

Import columns (CSV header or JSONL keys; only the ids and the first two are required):
  members:    member_id, identity (EMPLOYEE|RESIDENT), continuous_since (YYYY-MM-DD),
              retired, groups (CSV: separated by ';'), maternity_eligible, benefit_start,
              benefit_end, district, primary_facility, other_facility,
              account_balance (yuan, e.g. 1200.50; without it an existing member's
              balance is kept, a new member's is 0), region (default jiangmen)
  facilities: facility_id, level (LEVEL_1|LEVEL_2|LEVEL_3|NON_DESIGNATED), designated
              (default true), district, name
Booleans in CSV: true/false, 1/0, yes/no or empty (false; designated: true).
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Iterator

import grpc
from google.protobuf import json_format
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from engine.claims import check_enum, check_keys, parse_bill, parse_date, parse_flag
from engine.errors import EngineError, InvalidInput
from engine.model import CLAIM_KINDS, GROUPS, IDENTITIES, LEVELS, Claim
from engine.money import format_yuan, parse_yuan
from engine.scenarios import CLAIM_OPTIONAL
from reimburse.v1 import policy_pb2 as pol
from reimburse.v1 import registry_pb2 as reg
from reimburse.v1 import settlement_pb2 as st
from reimburse.v1 import types_pb2 as ty
from server import convert
from server.client import DEFAULT_TIMEOUT_S, Client
from server.tls import MissingSecurity, add_client_args, security_from_args

NHSA = {"total_fen": "medfee_sumamt", "full_selfpay_fen": "fulamt_ownpay_amt",
        "over_limit_fen": "overlmt_selfpay", "pre_selfpay_fen": "preselfpay_amt",
        "in_scope_fen": "inscp_scp_amt", "deductible_fen": "act_pay_dedc"}


# --- claim files ---------------------------------------------------------------------------

def read_claim(path: str) -> tuple[dict, Claim]:
    """A claim file: the ids, and the claim validated as the engine validates scenario claims."""
    return claim_from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def claim_from_json(raw: Any) -> tuple[dict, Claim]:
    """One claim object (a claim file's, a line of a batch file's)."""
    if not isinstance(raw, dict):
        raise InvalidInput("claim", "must be a JSON object")
    check_keys(raw, "claim", {"request_id", "member_id", "facility_id", "kind", "date"},
               CLAIM_OPTIONAL)
    kind = check_enum(raw["kind"], "claim.kind", CLAIM_KINDS, "claim kind")
    bill, items = parse_bill(raw, "claim")
    referred = raw.get("referred_by_primary_on")
    flags = {k: parse_flag(raw.get(k, False), f"claim.{k}")
             for k in ("home_bed_after_transfer", "out_of_area_unfiled", "childbirth",
                       "use_account")}
    claim = Claim(kind=kind, service_date=parse_date(raw["date"], "claim.date"),
                  facility_id=str(raw["facility_id"]), facility_level="", bill=bill,
                  items=items,
                  referred_by_primary_on=(None if referred is None else
                                          parse_date(referred, "claim.referred_by_primary_on")),
                  **flags)
    ids = {k: str(raw[k]) for k in ("request_id", "member_id", "facility_id")}
    ids["referral_from"] = str(raw.get("referral_from") or "")
    return ids, claim


def settle_request(ids: dict, claim: Claim, trace: bool = False) -> st.SettleRequest:
    return convert.settle_request(claim, request_id=ids["request_id"],
                                  member_id=ids["member_id"], facility_id=ids["facility_id"],
                                  referral_from=ids["referral_from"], want_trace=trace)


# --- batch files ---------------------------------------------------------------------------

def _claim_lines(path: str) -> Iterator[tuple[int, st.SettleRequest]]:
    """The claims of a JSONL file, one object a line (blank lines skipped), as requests;
    ``InvalidInput`` naming the line of the first bad one."""
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield line, settle_request(*claim_from_json(json.loads(text)))
            except json.JSONDecodeError as e:
                raise InvalidInput("claim", f"{path}:{line}: not JSON: {e}") from None
            except InvalidInput as e:
                raise InvalidInput(e.field, f"{path}:{line}: {e.problem}") from None


def do_batch(client: Client, path: str, size: int, commit: bool, max_rate: float = 0) -> int:
    """Every claim of a JSONL file through one stream of batches of ``size``
    (SettleBatchStream, or PreSettleBatchStream): one JSON line per claim on stdout, in
    order, and a summary on stderr. The whole file is checked before anything is sent.
    ``max_rate`` (claims/s, 0: none) paces the batches sent, to leave the ledger's writer to
    checkout (docs/deployment.md, "Bulk runs beside checkout")."""
    if size < 1:
        raise InvalidInput("--batch", "must be at least 1")
    if not max_rate >= 0:   # also NaN
        raise InvalidInput("--max-rate", "must be a number of claims per second, 0 for none")
    claims = sum(1 for _ in _claim_lines(path))
    batches = -(-claims // size)
    sent: collections.deque = collections.deque()    # (lines, request ids) of each batch
    paced = claims / max_rate if max_rate else 0.0   # seconds the pacing alone takes

    def requests():
        pending: list = []
        start, count = time.monotonic(), 0
        for line, req in _claim_lines(path):
            pending.append((line, req))
            if len(pending) == size:
                yield _batch(pending, start, count)
                count += len(pending)
                pending = []
        if pending:
            yield _batch(pending, start, count)

    def _batch(pending, start: float, before: int) -> st.SettleBatchRequest:
        if max_rate:   # this batch goes when the claims before it have had their time
            time.sleep(max(0.0, start + before / max_rate - time.monotonic()))
        sent.append([(line, req.request_id) for line, req in pending])
        return st.SettleBatchRequest(requests=[req for _, req in pending])

    method = client.settlement.SettleBatchStream if commit else \
        client.settlement.PreSettleBatchStream
    done = "settled" if commit else "pre-settled"
    counts = {done: 0, "replayed": 0, "refused": 0}
    answered = 0
    try:
        for reply in method(requests(), timeout=client.timeout * max(1, batches) + paced):
            for row in _batch_rows(sent.popleft(), reply.results):
                counts["refused" if row["code"] != "OK" else
                       "replayed" if row.get("replayed") else done] += 1
                print(json.dumps(row, ensure_ascii=False))
            answered += 1
    except grpc.RpcError as e:
        so_far = ", ".join(f"{v} {k}" for k, v in counts.items())
        print(f"{describe_error(e)}\nthe stream ended after {answered} of {batches} batches "
              f"({so_far}); claims from line {sent[0][0][0] if sent else '?'} on were not "
              f"handled: run the file again (settled claims are answered as replays)",
              file=sys.stderr)
        return 1
    print(", ".join(f"{v} {k}" for k, v in counts.items())
          + f" ({claims} claims, {batches} batches)", file=sys.stderr)
    return 1 if counts["refused"] else 0


def _batch_rows(meta: list[tuple[int, str]], res: st.SettlementColumns) -> Iterator[dict]:
    errors = {e.index: e for e in res.errors}
    for i, (line, rid) in enumerate(meta):
        row: dict[str, Any] = {"line": line, "request_id": rid}
        e = errors.get(i)
        if e is not None:
            row["code"] = code_pb2.Code.Name(e.code)
            row["error"] = e.message
            for name in ("field", "reason"):
                if getattr(e, name):
                    row[name] = getattr(e, name)
            yield row
            continue
        row["code"] = "OK"
        if res.settlement_ids:
            row["settlement_id"] = res.settlement_ids[i]
            row["replayed"] = res.replayed[i]
        for name in ("fund_total", "patient_total", "account_paid", "cash"):
            row[name] = format_yuan(getattr(res, f"{name}_fen")[i])
        yield row


# --- printing ------------------------------------------------------------------------------

def _date(d: ty.Date) -> str:
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}"


def format_settlement(s: ty.Settlement, trace: bool = False) -> str:
    status = ty.SettlementStatus.Name(s.status).removeprefix("SETTLEMENT_STATUS_")
    kind = ty.ClaimKind.Name(s.kind).removeprefix("CLAIM_KIND_")
    lines = [f"settlement {s.settlement_id or '(pre-settlement, nothing committed)'}  {status}",
             f"  member {s.member_id}  facility {s.facility_id}  {kind}  "
             f"{_date(s.service_date)}  request {s.request_id or '-'}",
             f"  policy {s.policy_version}"]
    row = "  {:<40}{:>14}"
    b = s.breakdown
    for name, label in (("total_fen", "total"), ("full_selfpay_fen", "full self-pay"),
                        ("over_limit_fen", "over limit"), ("pre_selfpay_fen", "pre-self-pay"),
                        ("in_scope_fen", "in scope"), ("deductible_fen", "deductible")):
        lines.append(row.format(f"{label} ({NHSA[name]})", format_yuan(getattr(b, name))))
    lines.append("  funds (setldetail)")
    for p in s.layers:
        cap = (f"   cap left before {format_yuan(p.cap_remaining_fen)}"
               if p.HasField("cap_remaining_fen") else "")
        lines.append(row.format(f"  {p.fund_code} [{p.layer_id}]", format_yuan(p.amount_fen))
                     + cap)
    for label, nhsa, v in (("fund total", "fund_pay_sumamt", s.fund_total_fen),
                           ("patient total", "psn_part_amt", s.patient_total_fen),
                           ("personal account", "acct_pay", s.account_paid_fen),
                           ("cash", "psn_cash_pay", s.cash_fen),
                           ("account balance after", "balc", s.balance_after_fen)):
        lines.append(row.format(f"{label} ({nhsa})", format_yuan(v)))
    if trace:
        lines.append("  trace")
        for step in s.trace:
            inputs = ", ".join(f"{k}={v}" for k, v in step.inputs.items())
            lines.append(f"    {step.what} = {step.result}   ({inputs})")
            lines.append(f"      {step.clause}")
    return "\n".join(lines)


def format_accumulators(a: ty.Accumulators) -> str:
    lines = [f"member {a.member_id}  year {a.year}  as of {_date(a.as_of)}  "
             f"continuous months {a.continuous_months}  cap scale {a.cap_scale_bp / 100:g}%",
             f"  policy {a.policy_version}",
             f"  personal account balance {format_yuan(a.account_balance_fen)}",
             "  {:<28}{:>14}{:>14}{:>14}{:>16}{:>8}{:>16}".format(
                 "layer", "paid", "limit", "remaining", "cumul. base", "rate", "to next band")]
    for v in a.layers:
        def opt(name, fmt=format_yuan):
            return fmt(getattr(v, name)) if v.HasField(name) else "-"
        lines.append("  {:<28}{:>14}{:>14}{:>14}{:>16}{:>8}{:>16}".format(
            v.layer_id, format_yuan(v.paid_fen), opt("limit_fen"), opt("remaining_fen"),
            format_yuan(v.cumulative_base_fen) if v.cumulative_base_fen else "-",
            opt("current_rate_bp", lambda bp: f"{bp / 100:g}%"), opt("to_next_band_fen")))
    return "\n".join(lines)


def show(msg, as_json: bool, text: str | None = None) -> None:
    if as_json or text is None:
        print(json_format.MessageToJson(msg, ensure_ascii=False,
                                        preserving_proto_field_name=True))
    else:
        print(text)


# --- registry imports ----------------------------------------------------------------------

def _rows(path: str) -> Iterator[tuple[int, dict]]:
    p = Path(path)
    if p.suffix == ".csv":
        with p.open(encoding="utf-8", newline="") as f:
            for i, row in enumerate(csv.DictReader(f), start=2):
                yield i, {k: v for k, v in row.items() if v not in (None, "")}
    elif p.suffix in (".jsonl", ".ndjson"):
        with p.open(encoding="utf-8") as f:
            for i, text in enumerate(f, start=1):
                if text.strip():
                    yield i, json.loads(text)
    else:
        raise InvalidInput("file", f"{path}: expected a .csv or .jsonl file")


def _flag(v: Any, field: str, default: bool = False) -> bool:
    if v is None:
        return default
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "1", "yes", "y"):
            return True
        if s in ("false", "0", "no", "n", ""):
            return False
    return parse_flag(v, field)


def member_row(r: dict) -> reg.UpsertMemberRequest:
    """A members file's row as the upsert it asks for. Without an account balance (no
    column, or an empty cell) an existing member's balance stays as it is; a new member's is
    0."""
    check_keys(r, "member", {"member_id", "identity", "continuous_since"},
               {"retired", "groups", "maternity_eligible", "benefit_start", "benefit_end",
                "district", "primary_facility", "other_facility", "account_balance", "region"})
    groups = r.get("groups", [])
    if isinstance(groups, str):
        groups = [g.strip() for g in groups.split(";") if g.strip()]
    m = reg.Member(
        member_id=str(r["member_id"]),
        identity=convert.IDENTITY_WIRE[check_enum(r["identity"], "identity", IDENTITIES,
                                                  "identity")],
        retired=_flag(r.get("retired"), "retired"),
        groups=[convert.GROUP_WIRE[check_enum(g, "groups", GROUPS, "group")] for g in groups],
        maternity_eligible=_flag(r.get("maternity_eligible"), "maternity_eligible"),
        district=str(r.get("district", "")), primary_facility_id=str(r.get("primary_facility", "")),
        other_facility_id=str(r.get("other_facility", "")),
        region=str(r.get("region", "")))
    balance = r.get("account_balance")
    keep = balance is None or balance == ""
    if not keep:
        m.account_balance_fen = parse_yuan(balance, "account_balance")
    for name in ("continuous_since", "benefit_start", "benefit_end"):
        if r.get(name):
            convert.date_to_wire(parse_date(r[name], name), getattr(m, name))
    return reg.UpsertMemberRequest(member=m, keep_account_balance=keep)


def facility_row(r: dict) -> reg.Facility:
    check_keys(r, "facility", {"facility_id", "level"}, {"designated", "district", "name"})
    return reg.Facility(
        facility_id=str(r["facility_id"]),
        level=convert.LEVEL_WIRE[check_enum(r["level"], "level", LEVELS, "level")],
        designated=_flag(r.get("designated"), "designated", default=True),
        district=str(r.get("district", "")), name=str(r.get("name", "")))


def do_import(client: Client, what: str, path: str) -> int:
    ok = failed = 0
    for line, row in _rows(path):
        try:
            if what == "members":
                client.call(client.registry.UpsertMember, member_row(row))
            else:
                client.call(client.registry.UpsertFacility,
                            reg.UpsertFacilityRequest(facility=facility_row(row)))
            ok += 1
        except EngineError as e:
            failed += 1
            print(f"{path}:{line}: {e}", file=sys.stderr)
        except grpc.RpcError as e:
            failed += 1
            print(f"{path}:{line}: {describe_error(e)}", file=sys.stderr)
    print(f"imported {ok} {what}" + (f", {failed} refused" if failed else ""))
    return 1 if failed else 0


# --- errors --------------------------------------------------------------------------------

def describe_error(e: grpc.RpcError) -> str:
    """The status code and message, with every field violation of a BadRequest."""
    text = f"{e.code().name}: {e.details()}"
    status = rpc_status.from_call(e)
    if status is not None:
        for d in status.details:
            if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                d.Unpack(br)
                text += "".join(f"\n  {v.field}: {v.description}" for v in br.field_violations)
    return text


# --- main ----------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="reimburse", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=os.environ.get("REIMBURSE_TARGET", "127.0.0.1:50051"),
                    help="HOST:PORT of the server ($REIMBURSE_TARGET; default %(default)s)")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                    help="deadline of each call in seconds (default %(default)s)")
    add_client_args(ap)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("presettle", "settle"):
        p = sub.add_parser(name, help=f"{name} a claim JSON file")
        p.add_argument("claim")
        p.add_argument("--trace", action="store_true", help="print the explanation trace")
        p.add_argument("--json", action="store_true", help="print the reply as JSON")
    for name in ("presettle-batch", "settle-batch"):
        p = sub.add_parser(name, help=f"{name.split('-')[0]} every claim of a JSONL file "
                                      "over one stream of batches")
        p.add_argument("claims", help="one claim object a line")
        p.add_argument("--batch", type=int, default=1000, help="claims a batch (%(default)s)")
        p.add_argument("--max-rate", type=float, default=0, metavar="CLAIMS_PER_S",
                       help="send at most this many claims a second (default: no limit)")
    p = sub.add_parser("reverse", help="reverse a settlement")
    p.add_argument("settlement_id")
    p.add_argument("--facility", required=True, help="the facility that settled it")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("settlement", help="show a settlement")
    p.add_argument("settlement_id")
    p.add_argument("--trace", action="store_true")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("accumulators", help="a member's caps, allowances and bands for a year")
    p.add_argument("member_id")
    p.add_argument("--year", type=int, default=date.today().year)
    p.add_argument("--as-of", help="YYYY-MM-DD within the year")
    p.add_argument("--json", action="store_true")
    for name in ("member", "facility"):
        p = sub.add_parser(name, help=f"show a {name}")
        p.add_argument("id")
    p = sub.add_parser("import", help="import members or facilities from CSV or JSONL")
    p.add_argument("what", choices=("members", "facilities"))
    p.add_argument("file")
    p = sub.add_parser("policy", help="the policy in force")
    p.add_argument("action", choices=("show",))
    p.add_argument("--region", default=convert.DEFAULT_REGION)
    p.add_argument("--date", default=date.today().isoformat(), help="YYYY-MM-DD")
    return ap


def run(client: Client, args: argparse.Namespace) -> int:
    c = args.command
    if c in ("presettle-batch", "settle-batch"):
        return do_batch(client, args.claims, args.batch, commit=c == "settle-batch",
                        max_rate=args.max_rate)
    if c in ("presettle", "settle"):
        req = settle_request(*read_claim(args.claim), trace=args.trace)
        method = client.settlement.PreSettle if c == "presettle" else client.settlement.Settle
        reply = client.call(method, req)
        text = format_settlement(reply.settlement, args.trace)
        if reply.replayed:
            text += "\n  (replayed: this request id was already settled; nothing more settled)"
        show(reply, args.json, text)
    elif c == "reverse":
        reply = client.call(client.settlement.Reverse, st.ReverseRequest(
            settlement_id=args.settlement_id, facility_id=args.facility))
        show(reply, args.json, format_settlement(reply.settlement))
    elif c == "settlement":
        reply = client.call(client.settlement.GetSettlement,
                            st.GetSettlementRequest(settlement_id=args.settlement_id))
        show(reply, args.json, format_settlement(reply.settlement, args.trace))
    elif c == "accumulators":
        req = st.GetAccumulatorsRequest(member_id=args.member_id, year=args.year)
        if args.as_of:
            convert.date_to_wire(parse_date(args.as_of, "--as-of"), req.as_of)
        reply = client.call(client.settlement.GetAccumulators, req)
        show(reply, args.json, format_accumulators(reply))
    elif c == "member":
        show(client.call(client.registry.GetMember, reg.GetMemberRequest(member_id=args.id)),
             True)
    elif c == "facility":
        show(client.call(client.registry.GetFacility,
                         reg.GetFacilityRequest(facility_id=args.id)), True)
    elif c == "import":
        return do_import(client, args.what, args.file)
    elif c == "policy":
        show(client.call(client.policy.GetPolicy, pol.GetPolicyRequest(
            region=args.region, date=convert.wire_date(parse_date(args.date, "--date")))), True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        security = security_from_args(args)
        with Client(args.target, args.timeout, security=security) as client:
            return run(client, args)
    except (EngineError, json.JSONDecodeError, OSError, MissingSecurity) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(describe_error(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
