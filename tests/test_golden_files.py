"""The golden scenarios are data copied from shared/golden; they must stay identical to it."""
from pathlib import Path

import pytest

from engine.scenarios import main

HERE = Path(__file__).parent / "golden"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "golden"


def test_golden_copies_equal_the_shared_folder():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not present on this machine")
    shared = {p.name: p.read_bytes() for p in SHARED.glob("*.json")}
    ours = {p.name: p.read_bytes() for p in HERE.glob("*.json")}
    assert ours == shared


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_every_golden_scenario_passes_the_conformance_check(impl, capsys):
    if impl == "kernel":
        from engine.evaluate import kernel_available
        if not kernel_available():
            pytest.fail("the Cython kernel is not built: pip install -e . builds it")
    files = sorted(str(p) for p in HERE.glob("*.json"))
    assert len(files) >= 21
    assert main(["--check", "--engine", impl, *files]) == 0, capsys.readouterr().err
