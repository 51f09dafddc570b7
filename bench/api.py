"""Submission and polling latency of the API with no worker running (the queue only grows).

    python bench/api.py --store sqlite --clients 50 --requests 400
    python bench/api.py --store redis --clients 50 --requests 400

Starts uvicorn on a free loopback port in a subprocess, then ``--clients``
concurrent clients first POST /upscale ``--requests`` times in all, then GET
/jobs/{id} as many times. Prints JSON with p50/p99 latency and requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def thumbnail() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (180, 140, 120)).save(buf, format="PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(latencies: list[float], seconds: float, statuses: dict[int, int]) -> dict[str, object]:
    return {
        "requests": len(latencies),
        "statuses": statuses,
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 2),
        "max_ms": round(1000 * max(latencies), 2),
        "requests_per_s": round(len(latencies) / seconds, 1),
    }


async def run_phase(clients: int, total: int, call) -> tuple[list[float], float, dict[int, int]]:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(total))

    async def client() -> None:
        for i in counter:
            t0 = time.perf_counter()
            status = await call(i)
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - start, statuses


async def bench(base: str, clients: int, total: int) -> dict[str, object]:
    png = thumbnail()
    ids: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as http:

        async def post(i: int) -> int:
            r = await http.post(
                "/upscale",
                files={"thumbnail": ("t.png", png, "image/png")},
                data={"steps": "100", "attribute": ["Smiling:1"]},
            )
            if r.status_code == 202:
                ids.append(r.json()["id"])
            return r.status_code

        async def get(i: int) -> int:
            r = await http.get(f"/jobs/{ids[i % len(ids)]}")
            return r.status_code

        post_lat, post_s, post_st = await run_phase(clients, total, post)
        get_lat, get_s, get_st = await run_phase(clients, total, get)
    return {
        "post_upscale": summary(post_lat, post_s, post_st),
        "get_job": summary(get_lat, get_s, get_st),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--requests", type=int, default=400, help="per phase")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, LIKENESS_DATA_DIR=tmp)
        prefix = f"likeness-bench-{uuid.uuid4().hex[:8]}"
        if args.store == "redis":
            env.update(LIKENESS_STORE=args.redis_url, LIKENESS_REDIS_KEY_PREFIX=prefix)
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            else:
                raise SystemExit("the API did not start within 60 s")
            result = asyncio.run(bench(base, args.clients, args.requests))
        finally:
            server.terminate()
            server.wait(timeout=30)
            if args.store == "redis":
                import redis

                r = redis.Redis.from_url(args.redis_url)
                keys = list(r.scan_iter(f"{prefix}*"))
                if keys:
                    r.delete(*keys)
    print(
        json.dumps(
            {"store": args.store, "clients": args.clients, **result, "cpu_count": os.cpu_count()},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
