"""Load harness: drive a settlement server on 127.0.0.1 and report throughput and latency.

    python -m benchmarks.load --spawn --modes echo,presettle,settle --duration 5
    python -m benchmarks.load --target 127.0.0.1:50051 --modes presettle --rate 2000
    python -m benchmarks.load --spawn --processes 2 --clients 2 --modes presettle --json

``--spawn`` starts ``python -m server`` itself on a free port with a fresh SQLite ledger in a
temporary folder (``--processes N`` worker processes; ``--insecure`` when the server has that
option; ``--bench-echo`` for the baseline) and stops it with SIGTERM at the end. ``--target``
drives a running server (which needs ``--bench-echo`` for the echo mode).

Before the run the harness registers a synthetic population (``benchmarks.workload``: both
identities, every group, all facility levels) through ``RegistryService``. Modes:

    echo            the bare echo RPC (``reimburse.bench.v1.EchoService/Echo``) with a payload
                    the size of a PreSettle request: the transport's ceiling, same server
    presettle       PreSettle of the synthetic claims
    settle          Settle, every call a new request id (durable: synchronous=FULL)
    mix             70 % PreSettle, 30 % Settle
    batch-presettle PreSettleBatch of --batch claims per call (columns)
    batch-settle    SettleBatch of --batch claims per call (columns), new request ids
    batch-presettle-stream, batch-settle-stream
                    the same batches as messages of PreSettleBatchStream / SettleBatchStream:
                    one stream per connection, ``--concurrency`` batches in flight in all
                    (sent ahead on the streams); a batch's latency is from its write to its
                    response

Load: ``--concurrency`` calls in flight in total (default 64), split over ``--clients`` client
processes (default 1), each a grpc.aio event loop on ``--channels`` connections (default: one
for one server process, four per process for several: ``SO_REUSEPORT`` gives each connection
to a process by a hash, and with two processes and four connections in all, one run in eight
gave every connection to one process and measured it twice); or an open loop at ``--rate``
calls per second (still at most ``--concurrency`` in flight). Every mode runs ``--duration``
seconds after ``--warmup`` (and at most ``--max-requests`` calls per client); ``--rounds``
repeats the list of modes, interleaved, and the report keeps each mode's median round. Client
and server CPU seconds are measured, so the report says when the client, sharing the machine's
cores, may be what limits.

Request ids (the settling modes) carry the run id, the round, the mode and the client, and
count on through warm-up and measurement: no call of a run replays an earlier one, which the
server would answer from the journal instead of settling (until 2026-12-03 the measured phase
reused the warm-up's ids and the batch modes of a round shared theirs).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("echo", "presettle", "settle", "mix", "batch-presettle", "batch-settle",
         "batch-presettle-stream", "batch-settle-stream")
ECHO = "/reimburse.bench.v1.EchoService/Echo"
METHOD = {"presettle": "/reimburse.v1.SettlementService/PreSettle",
          "settle": "/reimburse.v1.SettlementService/Settle",
          "batch-presettle": "/reimburse.v1.SettlementService/PreSettleBatch",
          "batch-settle": "/reimburse.v1.SettlementService/SettleBatch",
          "batch-presettle-stream": "/reimburse.v1.SettlementService/PreSettleBatchStream",
          "batch-settle-stream": "/reimburse.v1.SettlementService/SettleBatchStream",
          "echo": ECHO}
POOL = 4096   # distinct claims per client


# --- the server -------------------------------------------------------------------------------

class SpawnedServer:
    """``python -m server`` on 127.0.0.1:0 with a temporary SQLite ledger."""

    def __init__(self, processes: int = 1, workers: int = 16, extra: tuple[str, ...] = (),
                 env: dict | None = None):
        self.dir = tempfile.mkdtemp(prefix="reimburse-load-")
        self.log_path = os.path.join(self.dir, "server.log")
        args = [sys.executable, "-m", "server", "--listen", "127.0.0.1:0",
                "--database", os.path.join(self.dir, "ledger.db"), "--bench-echo",
                "--workers", str(workers), *extra]
        if processes != 1:
            args += ["--processes", str(processes)]
        if server_has_option("--insecure"):
            args.append("--insecure")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.port = self._wait_port(processes)

    def _wait_port(self, processes: int, timeout: float = 60) -> int:
        end = time.monotonic() + timeout
        port, listening = 0, 0
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + Path(self.log_path).read_text())
            listening = 0
            for line in Path(self.log_path).read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("event") == "listening":
                    port, listening = rec["port"], listening + 1
            if port and listening >= processes:
                return port
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("server did not start:\n" + Path(self.log_path).read_text())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        """The server process and its descendants (workers, settlement writers)."""
        parent: dict[int, int] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parent[int(d.name)] = int(fields[1])
        out = [self.proc.pid]
        for pid in out:     # grows as it goes: breadth first down the tree
            out.extend(child for child, ppid in parent.items() if ppid == pid)
        return out

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


_HELP: dict[str, str] = {}


def server_has_option(option: str) -> bool:
    """Whether ``python -m server --help`` lists ``option`` (checked once per process)."""
    if "text" not in _HELP:
        _HELP["text"] = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT,
                                       capture_output=True, text=True, timeout=60).stdout
    return option in _HELP["text"].split()


# --- registration -----------------------------------------------------------------------------

def register(target: str, members: int, seed: int, prefix: str) -> None:
    import grpc

    from benchmarks import workload
    from reimburse.v1 import registry_pb2 as reg
    from reimburse.v1 import registry_pb2_grpc
    pop = workload.population(members, seed=seed, prefix=prefix)
    with grpc.insecure_channel(target) as ch:
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        for f in pop.facilities:
            stub.UpsertFacility(reg.UpsertFacilityRequest(facility=f), timeout=30)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda m: stub.UpsertMember(reg.UpsertMemberRequest(member=m),
                                                      timeout=30), pop.members))


# --- one client process -----------------------------------------------------------------------

def _payloads(mode: str, cfg: dict, client: int):
    """The request bytes a client cycles through, and a function making each call's bytes."""
    from benchmarks import workload
    pop = workload.population(cfg["members"], seed=cfg["seed"], prefix=cfg["prefix"])
    tag = f"{cfg['run']}-{mode}-c{client}"   # the same ids in two modes would be replays
    if mode.startswith("batch"):
        from benchmarks.batchload import batch_payloads
        return batch_payloads(pop, mode, cfg, client, tag)
    reqs = [workload.settle_request(pop, c).SerializeToString()
            for c in workload.claims(pop, POOL, seed=cfg["seed"] * 1000 + client)]
    if mode == "echo":
        return lambda i: reqs[i % POOL], lambda i: ECHO
    if mode == "presettle":
        return lambda i: reqs[i % POOL], lambda i: METHOD["presettle"]
    rid = workload.request_id_field
    if mode == "settle":
        return (lambda i: rid(f"{tag}-{i}") + reqs[i % POOL]), lambda i: METHOD["settle"]
    if mode == "mix":   # 30 % settle: calls 0, 3, 6 of every 10
        return ((lambda i: rid(f"{tag}-{i}") + reqs[i % POOL] if i % 10 in (0, 3, 6)
                 else reqs[i % POOL]),
                lambda i: METHOD["settle"] if i % 10 in (0, 3, 6) else METHOD["presettle"])
    raise ValueError(mode)


async def _drive(target: str, mode: str, cfg: dict, client: int) -> dict:
    import grpc
    make, method_of = _payloads(mode, cfg, client)
    n_ch = cfg["channels"]
    channels = [grpc.aio.insecure_channel(target, options=[
        ("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20)]) for _ in range(n_ch)]
    if mode.endswith("-stream"):
        return await _drive_streams(channels, METHOD[mode], make, cfg)
    calls = [{m: ch.unary_unary(m) for m in set(METHOD.values()) if not m.endswith("Stream")}
             for ch in channels]
    conc, rate = cfg["concurrency"], cfg["rate"]
    lat: list[float] = []
    errors: dict[str, int] = {}
    counter = [0]
    seq = [0]   # payloads made, warm-up included: never reset, so no request id is sent twice
    limit = cfg["max_requests"]
    timeout = cfg["timeout"]

    async def worker(w: int, until: float, record: bool) -> None:
        stubs = calls[w % n_ch]
        while True:
            i = counter[0]
            if i >= limit:
                return
            counter[0] = i + 1
            if rate:
                due = t_start + i / rate
                now = time.perf_counter()
                if due > now:
                    await asyncio.sleep(due - now)
            t = time.perf_counter()
            if t >= until:
                return
            s = seq[0]
            seq[0] = s + 1
            try:
                await stubs[method_of(s)](make(s), timeout=timeout)
                if record:
                    lat.append(time.perf_counter() - t)
            except grpc.aio.AioRpcError as e:
                if record:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1

    for ch in channels:
        await ch.channel_ready()
    per_client_rate = rate
    # warm-up, not recorded
    t_start = time.perf_counter()
    await asyncio.gather(*(worker(w, t_start + cfg["warmup"], False) for w in range(conc)))
    counter[0] = 0
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t_start = time.perf_counter()
    until = t_start + cfg["duration"]
    await asyncio.gather(*(worker(w, until, True) for w in range(conc)))
    elapsed = time.perf_counter() - t_start
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    for ch in channels:
        await ch.close()
    del per_client_rate
    return {"latencies": lat, "errors": errors, "elapsed": elapsed, "sent": seq[0],
            "cpu": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)}


async def _drive_streams(channels, method: str, make, cfg: dict) -> dict:
    """The stream modes: one stream per channel, the batches in flight spread over them."""
    import grpc
    n_ch = len(channels)
    depth = [cfg["concurrency"] // n_ch + (k < cfg["concurrency"] % n_ch) for k in range(n_ch)]
    lat: list[float] = []
    errors: dict[str, int] = {}
    counter = [0]
    seq = [0]   # as in _drive: never reset

    async def one(ch, k: int, until: float, record: bool) -> None:
        if not depth[k]:
            return
        call = ch.stream_stream(method)(timeout=cfg["timeout"] + cfg["warmup"] + cfg["duration"])
        sent: list[float] = []          # write times of the batches not yet answered
        try:
            async def send() -> None:
                counter[0] += 1
                s = seq[0]
                seq[0] = s + 1
                sent.append(time.perf_counter())
                await call.write(make(s))
            for _ in range(depth[k]):
                await send()
            while sent:
                await call.read()
                t = time.perf_counter()
                if record:
                    lat.append(t - sent[0])
                del sent[0]
                if t < until and counter[0] < cfg["max_requests"]:
                    await send()
            await call.done_writing()
            await call.read()            # the end of the stream: its status
        except grpc.aio.AioRpcError as e:
            if record:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1

    for ch in channels:
        await ch.channel_ready()
    t0 = time.perf_counter()
    await asyncio.gather(*(one(ch, k, t0 + cfg["warmup"], False)
                           for k, ch in enumerate(channels)))
    counter[0] = 0
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t_start = time.perf_counter()
    await asyncio.gather(*(one(ch, k, t_start + cfg["duration"], True)
                           for k, ch in enumerate(channels)))
    elapsed = time.perf_counter() - t_start
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    for ch in channels:
        await ch.close()
    return {"latencies": lat, "errors": errors, "elapsed": elapsed, "sent": seq[0],
            "cpu": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)}


def _client_main(target: str, mode: str, cfg: dict, client: int, barrier, out) -> None:
    try:
        if barrier is not None:
            barrier.wait(120)
        out.put((client, asyncio.run(_drive(target, mode, cfg, client))))
    except BaseException as e:  # noqa: BLE001 — report it to the parent
        out.put((client, {"fatal": f"{type(e).__name__}: {e}"}))


def run_mode(target: str, mode: str, cfg: dict, server: SpawnedServer | None = None) -> dict:
    """One mode with cfg["clients"] client processes; the merged figures."""
    k = cfg["clients"]
    per = dict(cfg, concurrency=max(1, cfg["concurrency"] // k),
               rate=cfg["rate"] / k if cfg["rate"] else 0)
    cpu0 = server.cpu_seconds() if server else None
    if k == 1 and not cfg.get("subprocess_client"):
        results = [asyncio.run(_drive(target, mode, per, 0))]
    else:
        ctx = multiprocessing.get_context("spawn")
        barrier, out = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=_client_main, args=(target, mode, per, c, barrier, out),
                             daemon=True) for c in range(k)]
        for p in procs:
            p.start()
        deadline = 120 + cfg["warmup"] + cfg["duration"] * 2
        results = [out.get(timeout=deadline)[1] for _ in procs]
        for p in procs:
            p.join(10)
        for r in results:
            if "fatal" in r:
                raise RuntimeError(f"client failed: {r['fatal']}")
    server_cpu = server.cpu_seconds() - cpu0 if server else None
    lat = sorted(x for r in results for x in r["latencies"])
    errors: dict[str, int] = {}
    for r in results:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    elapsed = max(r["elapsed"] for r in results)
    batch = cfg["batch"] if mode.startswith("batch") else 1
    row = {"mode": mode, "calls": len(lat), "errors": errors, "elapsed_s": round(elapsed, 3),
           "calls_per_s": round(len(lat) / elapsed, 1) if elapsed else 0.0,
           "claims_per_s": round(len(lat) * batch / elapsed, 1) if elapsed else 0.0,
           "concurrency": cfg["concurrency"], "clients": k, "batch": batch,
           "sent": sum(r["sent"] for r in results),   # calls made, warm-up included
           "client_cpu_s": round(sum(r["cpu"] for r in results), 2)}
    if server_cpu is not None:
        row["server_cpu_s"] = round(server_cpu, 2)
    for name, q in (("p50", .50), ("p95", .95), ("p99", .99), ("p99_9", .999)):
        row[f"{name}_ms"] = round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3, 3) \
            if lat else None
    return row


def median_rows(rows: list[dict]) -> dict:
    """The round with the median throughput (its latencies with it)."""
    rows = sorted(rows, key=lambda r: r["calls_per_s"])
    out = dict(rows[len(rows) // 2])
    out["rounds"] = [r["calls_per_s"] for r in rows]
    return out


def run(args) -> dict:
    cfg = {"members": args.members, "seed": args.seed, "prefix": args.prefix,
           "run": args.run_id or f"r{os.getpid()}x{int(time.time()) % 100000}",
           "concurrency": args.concurrency, "rate": args.rate, "clients": args.clients,
           "channels": args.channels or default_channels(args.processes),
           "duration": args.duration,
           "warmup": args.warmup, "max_requests": args.max_requests, "timeout": args.timeout,
           "batch": args.batch, "batch_members": args.batch_members,
           "subprocess_client": args.subprocess_client}
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; expected some of {', '.join(MODES)}")
    server = SpawnedServer(args.processes, args.workers,
                           ("--presettle-threads", str(args.presettle_threads))
                           if args.presettle_threads else ()) if args.spawn else None
    target = server.target if server else args.target
    t0 = time.time()
    try:
        register(target, args.members, args.seed, args.prefix)
        by_mode: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(args.rounds):
            for m in modes:
                by_mode[m].append(run_mode(target, m, dict(cfg, run=f"{cfg['run']}-{r}"),
                                           server))
        results = [median_rows(by_mode[m]) for m in modes]
    finally:
        code = server.stop() if server else None
        if server:
            server.cleanup()
    return {"target": target, "spawned": bool(server), "processes": args.processes,
            "server_exit": code, "cpus": os.cpu_count(), "started": t0,
            "config": {k: v for k, v in cfg.items() if k != "run"}, "results": results,
            "ratios": ratios(results)}


def default_channels(processes: int) -> int:
    """Connections per client: one for one server process; for several, four per process, so
    that the kernel's hash (``SO_REUSEPORT``) leaves a process without any only by a rare
    chance (two processes, eight connections: 1 in 128; sixteen: about 1 in 30,000)."""
    return 1 if processes <= 1 else 4 * processes


def ratios(results: list[dict]) -> dict:
    by = {r["mode"]: r for r in results}
    out = {}
    if "echo" in by and "presettle" in by and by["echo"]["calls_per_s"]:
        out["presettle_vs_echo"] = round(by["presettle"]["calls_per_s"]
                                         / by["echo"]["calls_per_s"], 3)
        if by["echo"]["p99_ms"]:
            out["presettle_p99_vs_echo_p99"] = round(by["presettle"]["p99_ms"]
                                                     / by["echo"]["p99_ms"], 3)
    if "settle" in by and "presettle" in by and by["presettle"]["calls_per_s"]:
        out["settle_vs_presettle"] = round(by["settle"]["calls_per_s"]
                                           / by["presettle"]["calls_per_s"], 3)
    return out


def table(report: dict) -> str:
    cols = ("mode", "calls", "calls_per_s", "claims_per_s", "p50_ms", "p95_ms", "p99_ms",
            "p99_9_ms", "errors", "client_cpu_s", "server_cpu_s")
    rows = [[str(r.get(c, "")) if c != "errors" else
             (",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0") for c in cols]
            for r in report["results"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    for k, v in report["ratios"].items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="HOST:PORT of a running server (127.0.0.1 only)")
    where.add_argument("--spawn", action="store_true", help="start a server for the run")
    ap.add_argument("--processes", type=int, default=1, help="--spawn: server processes")
    ap.add_argument("--workers", type=int, default=16, help="--spawn: RPC threads per process")
    ap.add_argument("--presettle-threads", type=int, default=0,
                    help="--spawn: the server's --presettle-threads (0: its default)")
    ap.add_argument("--modes", default="echo,presettle,settle", help=f"comma-separated: {MODES}")
    ap.add_argument("--concurrency", type=int, default=64, help="calls in flight (total)")
    ap.add_argument("--rate", type=float, default=0, help="target calls/s (0: closed loop)")
    ap.add_argument("--clients", type=int, default=1, help="client processes")
    ap.add_argument("--channels", type=int, default=0,
                    help="connections per client (default: 1 for one server process, "
                         "4 per process for several)")
    ap.add_argument("--subprocess-client", action="store_true",
                    help="run even a single client in its own process")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per mode and round")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before each measurement")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the modes, interleaved")
    ap.add_argument("--max-requests", type=int, default=2_000_000, help="per client and mode")
    ap.add_argument("--timeout", type=float, default=30.0, help="deadline of each call")
    ap.add_argument("--batch", type=int, default=1000, help="claims per batch call")
    ap.add_argument("--batch-members", type=int, default=100,
                    help="distinct members per batch (claims of one member in date order)")
    ap.add_argument("--members", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--prefix", default="L", help="id prefix of the synthetic population")
    ap.add_argument("--run-id", default="", help="request-id prefix (default: unique)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    if args.target and not args.target.startswith(("127.0.0.1:", "localhost:", "[::1]:")):
        ap.error("--target must be on 127.0.0.1 (load tests stay on this machine)")
    args.duration = min(args.duration, 600.0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(json.dumps(report) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
