"""The people's CLI (``reimburse`` / ``python -m server.cli``) against a real server."""
from __future__ import annotations

import json
import time

import pytest

from server.cli import main
from service_fixtures import memory_server  # noqa: F401

FACILITIES_CSV = """facility_id,level,designated,district,name
H3,LEVEL_3,,440703,Central Hospital
P1,LEVEL_1,true,440703,Community clinic
Y2,LEVEL_2,false,,Private clinic
"""
MEMBERS_JSONL = "\n".join(json.dumps(m) for m in [
    {"member_id": "M1", "identity": "EMPLOYEE", "continuous_since": "2010-01-01",
     "retired": True, "primary_facility": "P1", "account_balance": "1200.50"},
    {"member_id": "M2", "identity": "RESIDENT", "continuous_since": "2018-01-01",
     "groups": ["POVERTY_REGISTERED"], "benefit_end": "2018-12-31"},
])
MEMBERS_CSV = """member_id,identity,continuous_since,groups,retired,account_balance
M3,EMPLOYEE,2015-06-01,POVERTY_REGISTERED;MINIMUM_LIVING,no,10.00
BAD,EMPLOYEE,2015-06-01,FIVE_GUARANTEE,,
"""
CLAIM = {"request_id": "H3-20180305-0001", "member_id": "M1", "facility_id": "H3",
         "kind": "INPATIENT", "date": "2018-03-05", "use_account": True,
         "items": [{"category": "A", "amount": "30000.00"},
                   {"category": "B", "amount": "5000.00", "selfpay_ratio": "0.10"},
                   {"category": "C", "amount": "2000.00"}]}


@pytest.fixture
def cli(memory_server, tmp_path, capsys):
    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--target", memory_server.target, "--insecure", *args])
        out = capsys.readouterr()
        return code, out.out, out.err
    (tmp_path / "facilities.csv").write_text(FACILITIES_CSV, encoding="utf-8")
    (tmp_path / "members.jsonl").write_text(MEMBERS_JSONL, encoding="utf-8")
    (tmp_path / "members.csv").write_text(MEMBERS_CSV, encoding="utf-8")
    (tmp_path / "claim.json").write_text(json.dumps(CLAIM), encoding="utf-8")
    run.dir = tmp_path
    return run


def test_import_registries_from_csv_and_jsonl(cli, memory_server):
    assert cli("import", "facilities", str(cli.dir / "facilities.csv"))[:2] == \
        (0, "imported 3 facilities\n")
    assert cli("import", "members", str(cli.dir / "members.jsonl"))[0] == 0
    code, out, err = cli("import", "members", str(cli.dir / "members.csv"))
    assert code == 1 and "imported 1 members, 1 refused" in out
    assert "members.csv:3" in err and "FIVE_GUARANTEE" in err
    ledger = memory_server.ledger
    assert ledger.get_facility("H3").designated and not ledger.get_facility("Y2").designated
    assert ledger.get_member("M1").account_balance_fen == 120_050
    assert ledger.get_member("M3").groups == {"POVERTY_REGISTERED", "MINIMUM_LIVING"}


def test_a_members_file_without_balances_keeps_them(cli, memory_server):
    """Re-importing members to change their registry facts leaves the account balances as
    they are when the file has no balance (no column, or an empty cell); a balance given
    sets it; a new member without one starts at 0."""
    cli("import", "members", str(cli.dir / "members.csv"))            # M3: 10.00
    assert memory_server.ledger.get_member("M3").account_balance_fen == 1_000
    (cli.dir / "update.csv").write_text(
        "member_id,identity,continuous_since,district,account_balance\n"
        "M3,EMPLOYEE,2015-06-01,440705,\n"
        "M4,RESIDENT,2016-01-01,440705,\n", encoding="utf-8")
    (cli.dir / "update.jsonl").write_text(json.dumps(
        {"member_id": "M3", "identity": "EMPLOYEE", "continuous_since": "2015-06-01",
         "district": "440781"}), encoding="utf-8")
    assert cli("import", "members", str(cli.dir / "update.csv"))[0] == 0
    m3 = memory_server.ledger.get_member("M3")
    assert (m3.district, m3.account_balance_fen) == ("440705", 1_000)
    assert memory_server.ledger.get_member("M4").account_balance_fen == 0
    assert cli("import", "members", str(cli.dir / "update.jsonl"))[0] == 0
    m3 = memory_server.ledger.get_member("M3")
    assert (m3.district, m3.account_balance_fen) == ("440781", 1_000)
    (cli.dir / "set.csv").write_text("member_id,identity,continuous_since,account_balance\n"
                                     "M3,EMPLOYEE,2015-06-01,0.00\n", encoding="utf-8")
    assert cli("import", "members", str(cli.dir / "set.csv"))[0] == 0
    assert memory_server.ledger.get_member("M3").account_balance_fen == 0


def test_presettle_settle_accumulators_and_reverse(cli, memory_server):
    cli("import", "facilities", str(cli.dir / "facilities.csv"))
    cli("import", "members", str(cli.dir / "members.jsonl"))
    claim = str(cli.dir / "claim.json")
    code, out, _ = cli("presettle", claim)
    assert code == 0 and "nothing committed" in out
    assert "total (medfee_sumamt)" in out and "37000.00" in out
    assert not list(memory_server.ledger.journal())
    code, out, _ = cli("settle", claim, "--trace")
    assert code == 0 and "SETTLED" in out and "trace" in out and "二(四)1(1)" in out
    assert "personal account (acct_pay)" in out and "1200.50" in out
    code, out, _ = cli("settle", claim, "--json")
    reply = json.loads(out)
    assert reply["replayed"] is True
    sid = reply["settlement"]["settlement_id"]
    code, out, _ = cli("accumulators", "M1", "--year", "2018", "--as-of", "2018-03-31")
    assert code == 0 and "inpatient_tier1" in out and "20220.00" in out
    code, out, err = cli("reverse", sid, "--facility", "P1")
    assert code == 1 and "PERMISSION_DENIED" in err
    code, out, _ = cli("reverse", sid, "--facility", "H3")
    assert code == 0 and "REVERSED" in out
    assert memory_server.ledger.get_member("M1").account_balance_fen == 120_050
    code, out, _ = cli("settlement", sid)
    assert code == 0 and "REVERSED" in out


def test_policy_show_and_registry_lookups(cli):
    cli("import", "facilities", str(cli.dir / "facilities.csv"))
    code, out, _ = cli("policy", "show", "--date", "2018-03-01")
    assert code == 0 and json.loads(out)["version"].startswith("jiangmen/2018-01-01")
    code, out, _ = cli("facility", "Y2")
    assert json.loads(out) == {"facility_id": "Y2", "level": "FACILITY_LEVEL_2",
                               "designated": False, "name": "Private clinic"}


def test_a_bad_claim_file_names_the_field(cli):
    bad = dict(CLAIM, items=[{"category": "A", "amount": "-1"}])
    (cli.dir / "bad.json").write_text(json.dumps(bad), encoding="utf-8")
    code, _, err = cli("settle", str(cli.dir / "bad.json"))
    assert code == 2 and "claim.items[0].amount" in err


def test_server_side_field_violations_are_printed(cli):
    cli("import", "facilities", str(cli.dir / "facilities.csv"))
    cli("import", "members", str(cli.dir / "members.jsonl"))
    bad = dict(CLAIM, request_id="x" * 200)
    (cli.dir / "bad.json").write_text(json.dumps(bad), encoding="utf-8")
    code, _, err = cli("settle", str(cli.dir / "bad.json"))
    assert code == 1 and "INVALID_ARGUMENT" in err and "\n  request_id:" in err


def test_settle_a_file_of_claims_over_one_stream_of_batches(cli, memory_server):
    cli("import", "facilities", str(cli.dir / "facilities.csv"))
    cli("import", "members", str(cli.dir / "members.jsonl"))
    claims = [dict(CLAIM, request_id=f"B-{k}") for k in range(4)]
    claims[2] = dict(claims[2], member_id="NOBODY")
    path = cli.dir / "claims.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in claims) + "\n\n", encoding="utf-8")
    code, out, err = cli("presettle-batch", str(path), "--batch", "3")
    assert code == 1 and "3 pre-settled, 0 replayed, 1 refused (4 claims, 2 batches)" in err
    assert not list(memory_server.ledger.journal())
    code, out, err = cli("settle-batch", str(path), "--batch", "3")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and "3 settled, 0 replayed, 1 refused (4 claims, 2 batches)" in err
    assert [(r["line"], r["request_id"], r["code"]) for r in rows] == [
        (1, "B-0", "OK"), (2, "B-1", "OK"), (3, "B-2", "NOT_FOUND"), (4, "B-3", "OK")]
    assert "NOBODY" in rows[2]["error"]
    assert sorted(r.request_id for r in memory_server.ledger.journal()) == ["B-0", "B-1", "B-3"]
    # each claim as the single call settles it: B-0 alone from a fresh account would pay what
    # the batch's first claim paid; the account runs down over B-0, B-1, B-3 in order
    code, out, _ = cli("settlement", rows[0]["settlement_id"], "--json")
    first = json.loads(out)["settlement"]
    assert rows[0]["fund_total"] == f"{int(first['fund_total_fen']) / 100:.2f}"
    assert rows[0]["account_paid"] == "1200.50"            # M1's whole balance, at once
    assert rows[1]["account_paid"] == rows[3]["account_paid"] == "0.00"
    # again: every settled claim is a replay of its settlement, nothing settles twice
    code, out, err = cli("settle-batch", str(path), "--batch", "3")
    again = [json.loads(line) for line in out.splitlines()]
    assert "0 settled, 3 replayed, 1 refused" in err
    assert [r.get("settlement_id") for r in again] == [r.get("settlement_id") for r in rows]
    assert len(list(memory_server.ledger.journal())) == 3


def test_a_bulk_run_is_paced_by_max_rate(cli, memory_server):
    """--max-rate 4 with batches of 2: the second batch goes 0.5 s after the first, the
    third 1.0 s after; the same file without it is sent at once. A rate that is not a number
    of claims per second is refused before anything is sent."""
    cli("import", "facilities", str(cli.dir / "facilities.csv"))
    cli("import", "members", str(cli.dir / "members.jsonl"))

    def run(tag: str, *extra: str) -> tuple[float, str]:
        path = cli.dir / f"{tag}.jsonl"
        path.write_text("\n".join(json.dumps(dict(CLAIM, request_id=f"{tag}-{k}"))
                                  for k in range(6)), encoding="utf-8")
        t0 = time.monotonic()
        code, _, err = cli("presettle-batch", str(path), "--batch", "2", *extra)
        assert code == 0, err
        return time.monotonic() - t0, err

    unpaced, _ = run("U")
    paced, err = run("P", "--max-rate", "4")
    assert "6 pre-settled, 0 replayed, 0 refused (6 claims, 3 batches)" in err
    assert unpaced < 1.0 <= paced
    for bad in ("-1", "nan"):
        code, _, err = cli("settle-batch", str(cli.dir / "U.jsonl"), "--max-rate", bad)
        assert code == 2 and "--max-rate" in err
    assert not list(memory_server.ledger.journal())


def test_a_bad_line_of_a_batch_file_is_named_and_nothing_is_sent(cli, memory_server):
    cli("import", "facilities", str(cli.dir / "facilities.csv"))
    cli("import", "members", str(cli.dir / "members.jsonl"))
    path = cli.dir / "claims.jsonl"
    bad = dict(CLAIM, request_id="X-2", items=[{"category": "A", "amount": "12.345"}])
    path.write_text("\n".join(json.dumps(c) for c in (dict(CLAIM, request_id="X-1"), bad)),
                    encoding="utf-8")
    code, _, err = cli("settle-batch", str(path))
    assert code == 2 and "claims.jsonl:2" in err and "items[0].amount" in err
    assert not list(memory_server.ledger.journal())
