"""Build the Dockerfile with podman, run it, settle one claim, stop it with SIGTERM.

Runs when podman is on PATH and scripts/podman-setup.sh has written its env file
($REIMBURSE_PODMAN_SCRATCH/env.sh, default /var/tmp/reimburse-podman/env.sh), or when
REIMBURSE_CONTAINER_TEST=1 (then a missing podman is a failure, and without the env file the
ambient podman configuration and the Dockerfile's default BASE are used).

    sudo scripts/podman-setup.sh && pytest -m container
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = Path(os.environ.get("REIMBURSE_PODMAN_SCRATCH", "/var/tmp/reimburse-podman"))
ENV_FILE = SCRATCH / "env.sh"
IMAGE = "localhost/reimburse:test"
LOCAL_BASE = "localhost/bookworm-base"  # made by scripts/podman-setup.sh
BUILD_TIMEOUT = 1200
HEALTH_TIMEOUT = 60.0
STOP_GRACE = 20


def _forced() -> bool:
    return os.environ.get("REIMBURSE_CONTAINER_TEST") == "1"


def _read_env_file(path: Path) -> dict[str, str]:
    """`export K=V` lines of the setup script's env.sh."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export "):].partition("=")
            env[key.strip()] = value.strip().strip("'\"")
    return env


@pytest.fixture(scope="module")
def podman_env() -> dict[str, str]:
    podman = shutil.which("podman")
    if podman is None:
        if _forced():
            pytest.fail("REIMBURSE_CONTAINER_TEST=1 but podman is not on PATH "
                        "(run scripts/podman-setup.sh as root)")
        pytest.skip("podman not on PATH (run scripts/podman-setup.sh as root, or set "
                    "REIMBURSE_CONTAINER_TEST=1 to require this test)")
    env = dict(os.environ)
    if ENV_FILE.is_file():
        env.update(_read_env_file(ENV_FILE))
    elif not _forced():
        pytest.skip(f"{ENV_FILE} missing: run scripts/podman-setup.sh as root first "
                    "(or REIMBURSE_CONTAINER_TEST=1 to use the ambient podman setup)")
    return env


def _podman(env: dict[str, str], *args: str, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} exited {proc.returncode}:\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_smoke():
    spec = importlib.util.spec_from_file_location(
        "container_smoke", Path(__file__).with_name("container_smoke.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str]) -> str:
    args = ["build", "--format", "docker",  # docker format keeps HEALTHCHECK
            "--network=host", "-t", IMAGE]
    base = os.environ.get("REIMBURSE_CONTAINER_BASE")
    if base is None and ENV_FILE.is_file():
        base = LOCAL_BASE
    if base:
        args += ["--build-arg", f"BASE={base}"]
    _podman(podman_env, *args, str(ROOT), timeout=BUILD_TIMEOUT)
    return IMAGE


def _wait_serving(env: dict[str, str], name: str, target: str, channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import grpc

    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + HEALTH_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        running = _podman(env, "inspect", "--format", "{{.State.Running}}", name).stdout.strip()
        if running != "true":
            logs = _podman(env, "logs", name, check=False)
            pytest.fail(f"container exited before serving:\n{logs.stdout[-4000:]}"
                        f"{logs.stderr[-4000:]}")
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            last = exc.code().name
        time.sleep(0.5)
    logs = _podman(env, "logs", name, check=False)
    pytest.fail(f"{target} not SERVING after {HEALTH_TIMEOUT:.0f}s (last: {last}):\n"
                f"{logs.stdout[-4000:]}{logs.stderr[-4000:]}")


def test_container_serves_and_stops_cleanly(podman_env: dict[str, str], image: str) -> None:
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("grpc_health.v1")
    env = podman_env

    meta = json.loads(_podman(env, "image", "inspect", image).stdout)[0]
    assert meta["Config"]["User"].split(":")[0] == "10001"
    health_test = (meta.get("Healthcheck") or {}).get("Test") or []
    assert "server.healthcheck" in health_test, f"image HEALTHCHECK: {health_test}"

    port = _free_port()
    target = f"127.0.0.1:{port}"
    name = f"reimburse-test-{uuid.uuid4().hex[:10]}"
    channel = None
    skipped: BaseException | None = None
    try:
        # Arguments after the image replace CMD (ENTRYPOINT is `python -m server`).
        # --health-interval=disable: no systemd here for podman's healthcheck timers.
        # --insecure explicitly: plaintext without authentication on 127.0.0.1 (the image
        # refuses to start without TLS and tokens otherwise; docs/deployment.md).
        _podman(env, "run", "-d", "--init", "--network=host", "--health-interval=disable",
                "--name", name, image, "--listen", target, "--database", "/data/ledger.db",
                "--insecure")
        channel = grpc.insecure_channel(target)
        _wait_serving(env, name, target, channel)

        # The image's health probe agrees (same module as HEALTHCHECK, on our port).
        probe = _podman(env, "exec", name, "python", "-m", "server.healthcheck",
                        "--target", target, "--insecure", check=False)
        assert probe.returncode == 0, f"server.healthcheck: {probe.stdout}{probe.stderr}"

        try:
            _load_smoke().settle_one_claim(channel)
        except pytest.skip.Exception as exc:  # still check the shutdown below
            skipped = exc

        started = time.monotonic()
        _podman(env, "stop", "--time", str(STOP_GRACE), name, timeout=STOP_GRACE + 60)
        took = time.monotonic() - started
        code = _podman(env, "inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        if code != "0":
            logs = _podman(env, "logs", name, check=False)
            pytest.fail(f"exit code after SIGTERM: {code} (stop took {took:.1f}s):\n"
                        f"{logs.stdout[-4000:]}{logs.stderr[-4000:]}")
    finally:
        if channel is not None:
            channel.close()
        _podman(env, "rm", "-f", "-v", name, check=False)
    if skipped is not None:
        raise skipped
