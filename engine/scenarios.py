"""Conformance command: settle scenario files in order and print one JSON line per claim.

    python -m engine.scenarios [--check] [--engine reference|kernel|auto] FILE...

Each scenario runs on fresh accumulators. The output format is shared/spec/scenarios.md's
``expected`` entry; ``--check`` compares with ``expected``, prints every difference to stderr
and exits 1 on any.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from engine.claims import (
    check_claim_flags, check_enum, check_keys, check_levels, parse_bill, parse_date, parse_flag,
    parse_member,
)
from engine.errors import EngineError, InvalidInput
from engine.evaluate import settle
from engine.loader import store
from engine.model import CLAIM_KINDS, Accumulators, Claim, Member, Settlement
from engine.money import format_yuan

CLAIM_OPTIONAL = {"items", "total", "full_selfpay", "over_limit", "pre_selfpay", "referral_from",
                  "home_bed_after_transfer", "out_of_area_unfiled", "childbirth",
                  "referred_by_primary_on", "use_account"}


@dataclass(frozen=True)
class ScenarioClaim:
    id: str
    claim: Claim              # chain_deductible_fen is filled in when the chain is settled
    referral_from: str | None


@dataclass(frozen=True)
class Scenario:
    id: str
    region: str
    member: Member
    opening_balance_fen: int
    facilities: dict[str, str]
    claims: tuple[ScenarioClaim, ...]
    expected: tuple[dict, ...]
    raw: dict


def parse_claim(raw: Any, path: str, facilities: dict[str, str],
                earlier: dict[str, str]) -> ScenarioClaim:
    check_keys(raw, path, {"id", "kind", "date", "facility"}, CLAIM_OPTIONAL)
    kind = check_enum(raw["kind"], f"{path}.kind", CLAIM_KINDS, "claim kind")
    fid = raw["facility"]
    if fid not in facilities:
        raise InvalidInput(f"{path}.facility", f"unknown facility {fid!r}")
    bill, items = parse_bill(raw, path)
    ref_from = raw.get("referral_from")
    if ref_from is not None and earlier.get(ref_from) != "INPATIENT":
        raise InvalidInput(f"{path}.referral_from", f"refers to {ref_from!r}, which is not an "
                                                    "earlier inpatient claim of this scenario")
    referred = raw.get("referred_by_primary_on")
    referred = None if referred is None else parse_date(referred, f"{path}.referred_by_primary_on")
    flags = {k: parse_flag(raw.get(k, False), f"{path}.{k}")
             for k in ("home_bed_after_transfer", "out_of_area_unfiled", "childbirth",
                       "use_account")}
    check_claim_flags(kind, path, referral=ref_from is not None,
                      home_bed=flags["home_bed_after_transfer"],
                      out_of_area=flags["out_of_area_unfiled"], childbirth=flags["childbirth"],
                      referred_on=referred)
    claim = Claim(kind=kind, service_date=parse_date(raw["date"], f"{path}.date"),
                  facility_id=fid, facility_level=facilities[fid], bill=bill, items=items,
                  referred_by_primary_on=referred, referral=ref_from is not None, **flags)
    return ScenarioClaim(str(raw["id"]), claim, ref_from)


def parse_scenario(raw: Any) -> Scenario:
    check_keys(raw, "scenario", {"id", "region", "member", "facilities", "claims"},
               {"title", "expected"})
    member, balance = parse_member(raw["member"])
    fac_raw = raw["facilities"]
    if not isinstance(fac_raw, dict):
        raise InvalidInput("facilities", "must be an object of id → {level}")
    facilities = {}
    for fid, f in fac_raw.items():
        check_keys(f, f"facilities.{fid}", {"level"}, {"designated", "district"})
        facilities[fid] = f["level"]
    check_levels(facilities)
    if not isinstance(raw["claims"], list):
        raise InvalidInput("claims", "must be a list")
    earlier: dict[str, str] = {}
    claims = []
    for i, c in enumerate(raw["claims"]):
        sc = parse_claim(c, f"claims[{i}]", facilities, earlier)
        if sc.claim.service_date < member.continuous_since:  # 二(四)4: no contributions yet
            raise InvalidInput(f"claims[{i}].date", f"service date {sc.claim.service_date} is "
                               f"before the member's continuous contribution began "
                               f"({member.continuous_since})")
        if sc.id in earlier:
            raise InvalidInput(f"claims[{i}].id", f"duplicate claim id {sc.id!r}")
        earlier[sc.id] = sc.claim.kind
        claims.append(sc)
    return Scenario(raw["id"], raw["region"], member, balance, facilities, tuple(claims),
                    tuple(raw.get("expected", ())), raw)


def result_line(claim_id: str, s: Settlement) -> dict:
    """One settlement in the ``expected`` format of scenarios.md."""
    b = s.bill
    return {
        "claim": claim_id,
        "total": format_yuan(b.total_fen),
        "full_selfpay": format_yuan(b.full_selfpay_fen),
        "over_limit": format_yuan(b.over_limit_fen),
        "pre_selfpay": format_yuan(b.pre_selfpay_fen),
        "in_scope": format_yuan(s.in_scope_fen),
        "deductible": format_yuan(s.deductible_fen),
        "funds": {k: format_yuan(v) for k, v in s.funds.items()},
        "fund_total": format_yuan(s.fund_total_fen),
        "patient_total": format_yuan(s.patient_total_fen),
        "account_paid": format_yuan(s.account_paid_fen),
        "cash": format_yuan(s.cash_fen),
    }


def run_scenario(sc: Scenario, impl: str | None = None) -> list[dict]:
    """Settle the claims in order within one fresh ledger (accumulators per year)."""
    policies = store()
    years: dict[int, Accumulators] = {}
    balance = sc.opening_balance_fen
    chain: dict[str, int] = {}
    out = []
    for c in sc.claims:
        claim = c.claim
        if c.referral_from is not None:
            from dataclasses import replace
            claim = replace(claim, chain_deductible_fen=chain[c.referral_from])
        year = claim.service_date.year
        policy = policies.policy_for(sc.region, claim.service_date)
        s = settle(policy, sc.member, claim, years.get(year, Accumulators(year)), balance,
                   impl=impl)
        years[year] = s.accumulators_after
        balance = s.balance_after_fen
        chain[c.id] = s.chain_deductible_after_fen
        out.append(result_line(c.id, s))
    return out


def diff(expected: Iterable[dict], got: list[dict], name: str) -> list[str]:
    problems = []
    expected = list(expected)
    if len(expected) != len(got):
        problems.append(f"{name}: {len(got)} results, {len(expected)} expected")
    for e, g in zip(expected, got):
        for key in sorted(set(e) | set(g)):
            if e.get(key) != g.get(key):
                problems.append(f"{name} {e.get('claim')}: {key}: expected {e.get(key)!r}, "
                                f"got {g.get(key)!r}")
    return problems


def run_files(files: list[str], run: Callable[[Scenario], list[dict]], check: bool,
              errors: tuple[type[Exception], ...] = (),
              describe: Callable[[Exception], str] = str) -> int:
    """Run ``run`` over scenario files, print the lines, and with ``check`` the differences.

    Exit status: 0 all equal (or not checked), 1 some difference, 2 a file that could not run.
    ``errors`` adds the caller's own failures (e.g. RPC errors) to the ones that mean 2.
    """
    problems: list[str] = []
    for f in files:
        try:
            sc = parse_scenario(json.loads(Path(f).read_text(encoding="utf-8")))
            lines = run(sc)
        except (EngineError, json.JSONDecodeError, OSError, *errors) as e:
            print(f"{f}: {describe(e)}", file=sys.stderr)
            return 2
        for line in lines:
            print(json.dumps(line, ensure_ascii=False))
        if check:
            problems += diff(sc.expected, lines, f)
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.scenarios", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", metavar="FILE")
    ap.add_argument("--check", action="store_true", help="compare with 'expected'; exit 1 on "
                                                         "any difference")
    ap.add_argument("--engine", default=None, choices=("reference", "kernel", "auto"),
                    help="evaluator (default: $REIMBURSE_ENGINE or auto)")
    args = ap.parse_args(argv)
    return run_files(args.files, lambda sc: run_scenario(sc, args.engine), args.check)

if __name__ == "__main__":
    sys.exit(main())
