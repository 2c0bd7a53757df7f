"""What tests/test_container.py does against the running container, over a gRPC channel.

Kept apart so it can grow with the API without touching the container plumbing.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import grpc
import pytest


def _api_available() -> bool:
    # The brief named server.api_pb2; setup.py generates the stubs as reimburse.v1.*_pb2.
    for name in ("server.api_pb2", "reimburse.v1"):
        try:
            importlib.import_module(name)
            return True
        except ImportError:
            continue
    return False


def settle_one_claim(channel: grpc.Channel) -> None:
    """Register a golden scenario's facilities and member, settle its claims through the
    service in the container and check every line equals the scenario's ``expected``.

    The container runs with --insecure (plaintext, no authentication) on 127.0.0.1; against
    a server with tokens, wrap ``channel`` with ``server.tls.ClientSecurity(token=…)`` using
    the admin token (registering members needs it)."""
    if not _api_available():
        pytest.skip("server API not available yet")
    import server.scenarios
    from engine.scenarios import parse_scenario
    from server.client import Client

    golden = _golden_file()
    sc = parse_scenario(json.loads(golden.read_text(encoding="utf-8")))
    got = server.scenarios.run_scenario(Client(channel=channel, timeout=30), sc)
    assert got == list(sc.expected), f"{golden.name}: {got} != {list(sc.expected)}"


def _golden_file() -> Path:
    """The first golden scenario (tests/golden, or ../shared/golden)."""
    here = Path(__file__).resolve().parent
    for d in (here / "golden", here.parent.parent / "shared" / "golden"):
        files = sorted(d.glob("*.json"))
        if files:
            return files[0]
    pytest.skip("no golden scenario files")
