"""Load on the API from a separate process (wrk), beside the floor of a minimal FastAPI app.

    python bench/api.py                      # every target, 10 s per phase, 50 connections
    python bench/api.py --targets minimal,sqlite --duration 5
    python bench/api.py --out docs/bench/api_load.json --memory

Needs ``wrk`` (Debian: ``apt-get install -y wrk``). Each target runs under uvicorn
on a free loopback port, then wrk (1 thread, ``--connections``) drives, for
``--duration`` seconds each, multipart POST /upscale (a 16 px PNG thumbnail, a Lua
script sends the body) and GET /jobs/{id} of a queued job behind everything the
POST phase queued. Targets:

- ``minimal``: bench/minimal_app.py, async GET of a dict, POST writing one SQLite
  WAL row: the floor every ratio is taken against;
- ``sqlite`` / ``redis``: the API on either store, no worker (the queue only grows);
- ``sqlite+worker`` / ``redis+worker``: the same with ``likeness worker`` running
  (one torch thread), which competes for the CPU.

``--memory`` then sends rounds of 4 concurrent large reference photos to the API
and samples its RSS. The JSON gives p50/p99/max latency, requests/s and errors per
phase, each target's ratios to the minimal app, the targets' checks, and the load
average before and after (on a shared machine, compare only within one run).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("minimal", "sqlite", "redis", "sqlite+worker", "redis+worker")
BOUNDARY = "likenessbench" + uuid.uuid4().hex
# Targets of the API with the worker off, at 50 connections.
GET_P99_RATIO_MAX = 2.0
POST_P99_MS_MAX = 100.0

WRK_SCRIPT = r"""
local body_path = os.getenv("BENCH_BODY")
if body_path then
  local f = assert(io.open(body_path, "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. os.getenv("BENCH_BOUNDARY")
end

done = function(summary, latency, requests)
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, '
    .. '"non_2xx": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, '
    .. '"timeouts": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png(size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (180, 140, 120)).save(buf, format="PNG")
    return buf.getvalue()


def multipart(thumbnail: bytes) -> bytes:
    parts = [
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="thumbnail"; '
            'filename="t.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + thumbnail
        + b"\r\n"
    ]
    for name, value in (("steps", "100"), ("attribute", "Smiling:1")):
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode()
        )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) if match else 0


def wait_healthy(base: str, proc: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{base} did not answer /healthz within {seconds:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def serving(target: str, tmp: Path, redis_url: str) -> Iterator[tuple[str, int]]:
    """Start the target's server (and worker); yield its base URL and server pid."""
    store, _, worker = target.partition("+")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    prefix = f"likeness-bench-{uuid.uuid4().hex[:8]}:"
    data = Path(tempfile.mkdtemp(prefix=target.replace("+", "-") + "-", dir=tmp))
    module = "bench.minimal_app:app" if store == "minimal" else "app.main:app"
    env.update(LIKENESS_DATA_DIR=str(data), MINIMAL_DB=str(data), LIKENESS_API_KEYS="")
    if store == "redis":
        env.update(LIKENESS_STORE=redis_url, LIKENESS_REDIS_KEY_PREFIX=prefix)
    else:
        env.update(LIKENESS_STORE="")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", module, "--host", "127.0.0.1", "--port", str(port)]
        + ["--log-level", "warning", "--no-access-log"],
        cwd=ROOT,
        env=env,
    )
    procs = [server]
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, server)
        if worker:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "cli", "worker"],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            time.sleep(5)  # the worker loads torch and the models before it claims
        yield base, server.pid
    finally:
        if worker:
            procs.pop().kill()  # its jobs die with the temporary store; no batch to finish
        for proc in reversed(procs):
            stop(proc)
        if store == "redis":
            import redis

            r = redis.Redis.from_url(redis_url)
            keys = list(r.scan_iter(f"{prefix}*", count=1000))
            for i in range(0, len(keys), 1000):
                r.delete(*keys[i : i + 1000])
            r.close()


def wrk(url: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--timeout", "10s"]
    proc = subprocess.run(
        [*cmd, "-s", str(env["BENCH_SCRIPT"]), url],
        capture_output=True,
        text=True,
        env=env,
        timeout=args.duration + 60,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise SystemExit(f"wrk gave no summary: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    raw = json.loads(line[len("BENCH ") :])
    seconds = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "requests_per_s": round(raw["requests"] / seconds, 1),
        "p50_ms": round(raw["p50_us"] / 1000, 2),
        "p99_ms": round(raw["p99_us"] / 1000, 2),
        "max_ms": round(raw["max_us"] / 1000, 2),
        "errors": {
            k: raw[k]
            for k in ("non_2xx", "connect_errors", "read_errors", "write_errors", "timeouts")
        },
    }


def run_target(target: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    script = tmp / "bench.lua"
    body = tmp / "body.bin"
    thumb = png()
    with serving(target, tmp, args.redis_url) as (base, pid):
        env = dict(os.environ, BENCH_SCRIPT=str(script), BENCH_BOUNDARY=BOUNDARY)
        post = wrk(f"{base}/upscale", args, {**env, "BENCH_BODY": str(body)})
        # A queued job behind everything the POST phase queued.
        r = httpx.post(
            f"{base}/upscale", files={"thumbnail": ("t.png", thumb, "image/png")}, timeout=30
        )
        r.raise_for_status()
        get = wrk(f"{base}/jobs/{r.json()['id']}", args, env)
        return {"post_upscale": post, "get_job": get, "server_rss_mib": rss_kib(pid) // 1024}


def large_photo() -> bytes:
    from skimage import data

    face = Image.fromarray(data.astronaut()[20:260, 110:350]).resize((4096, 4096))
    buf = io.BytesIO()
    face.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def memory_phase(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Rounds of 4 concurrent submissions with a 4096x4096 reference photo; RSS sampled."""
    photo, thumb = large_photo(), png()
    files = {
        "thumbnail": ("t.png", thumb, "image/png"),
        "reference": ("ref.jpg", photo, "image/jpeg"),
    }
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    with serving("sqlite", tmp, args.redis_url) as (base, pid):
        warm = httpx.post(f"{base}/upscale", files=files, timeout=120)  # loads the detector
        before = rss_kib(pid)
        peak = before
        sampling = True

        def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, rss_kib(pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()

        def one(_: int) -> int:
            t0 = time.perf_counter()
            r = httpx.post(f"{base}/upscale", files=files, timeout=120)
            latencies.append(time.perf_counter() - t0)
            return r.status_code

        with ThreadPoolExecutor(4) as pool:
            for _ in range(args.memory_rounds):
                for status in pool.map(one, range(4)):
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
        sampling = False
        sampler.join()
        after = rss_kib(pid)
    return {
        "photo": {"width": 4096, "height": 4096, "bytes": len(photo)},
        "rounds_of_4": args.memory_rounds,
        "warm_up_status": warm.status_code,
        "statuses": statuses,
        "latency_ms_max": round(1000 * max(latencies), 1),
        "latency_ms_median": round(1000 * sorted(latencies)[len(latencies) // 2], 1),
        "rss_mib_before": before // 1024,
        "rss_mib_peak": peak // 1024,
        "rss_mib_after": after // 1024,
    }


def ratios(result: dict[str, Any], floor: dict[str, Any]) -> dict[str, float]:
    out = {}
    for phase in ("post_upscale", "get_job"):
        for key in ("p50_ms", "p99_ms"):
            out[f"{phase}_{key}"] = round(result[phase][key] / max(floor[phase][key], 1e-3), 2)
        rps = result[phase]["requests_per_s"] / max(floor[phase]["requests_per_s"], 1e-3)
        out[f"{phase}_requests_per_s"] = round(rps, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, of: %(default)s")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--duration", type=int, default=10, help="seconds per phase")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--memory", action="store_true", help="also measure RSS under large uploads")
    p.add_argument("--memory-rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    if "minimal" not in targets:
        targets.insert(0, "minimal")  # every ratio needs the floor of the same run
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")

    report: dict[str, Any] = {
        "tool": subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        .stdout.splitlines()[0]
        .split(" Copyright")[0],
        "threads": 1,
        "connections": args.connections,
        "duration_s": args.duration,
        "cpu_count": os.cpu_count(),
        "load": {
            "meaning": "os.getloadavg() (1, 5, 15 min) before and after; other work on a "
            "shared machine inflates every latency, so compare only within one run",
            "before": [round(x, 2) for x in os.getloadavg()],
        },
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "bench.lua").write_text(WRK_SCRIPT)
        (tmp / "body.bin").write_bytes(multipart(png()))
        for target in targets:
            print(f"{target} ...", file=sys.stderr, flush=True)
            report["results"][target] = run_target(target, tmp, args)
        if args.memory:
            print("memory ...", file=sys.stderr, flush=True)
            report["memory"] = memory_phase(tmp, args)
    report["load"]["after"] = [round(x, 2) for x in os.getloadavg()]
    floor = report["results"]["minimal"]
    report["ratios_to_minimal"] = {
        t: ratios(r, floor) for t, r in report["results"].items() if t != "minimal"
    }
    report["targets"] = {
        t: {
            "get_p99_within_2x_minimal": r["get_job"]["p99_ms"]
            <= GET_P99_RATIO_MAX * floor["get_job"]["p99_ms"],
            "post_p99_within_100_ms": r["post_upscale"]["p99_ms"] <= POST_P99_MS_MAX,
        }
        for t, r in report["results"].items()
        if t in ("sqlite", "redis")
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
