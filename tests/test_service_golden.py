"""Every golden scenario through a real server on 127.0.0.1 gives exactly the expected lines."""
from __future__ import annotations

import json

import pytest

import engine.scenarios
import server.scenarios
from engine.loader import store
from engine.scenarios import parse_scenario
from server.client import Client
from service_fixtures import DURABLE_BACKENDS, golden_files, ledger_for, running_server

GOLDEN = golden_files()


@pytest.fixture(scope="module", params=DURABLE_BACKENDS)
def target(request, tmp_path_factory):
    """One server per backend for the module (the scenarios register fresh ids each run)."""
    ledger = ledger_for(request.param, request, tmp_path_factory.mktemp("golden"))
    with running_server(ledger) as r:
        yield r.target


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_scenario_through_the_wire_equals_expected(target, path):
    sc = parse_scenario(json.loads(path.read_text(encoding="utf-8")))
    with Client(target) as client:
        got = server.scenarios.run_scenario(client, sc)
    assert got == list(sc.expected)


def test_the_wire_command_prints_the_same_lines_as_the_in_process_one(target, capsys):
    files = [str(p) for p in GOLDEN]
    assert server.scenarios.main(["--target", target, "--insecure", "--check", *files]) == 0
    wire = capsys.readouterr().out
    assert engine.scenarios.main(files) == 0
    assert wire == capsys.readouterr().out
    assert len(wire.splitlines()) == sum(len(json.loads(p.read_text())["claims"]) for p in GOLDEN)


def test_check_exits_1_on_a_difference(target, tmp_path, capsys):
    raw = json.loads(GOLDEN[0].read_text(encoding="utf-8"))
    raw["expected"][0]["fund_total"] = "0.01"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw), encoding="utf-8")
    assert server.scenarios.main(["--target", target, "--insecure", "--check", str(bad)]) == 1
    assert "fund_total" in capsys.readouterr().err


def test_policies_are_the_bundled_ones():
    assert store().regions() == ["jiangmen"]
