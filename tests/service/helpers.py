"""Shared pieces of the service tests: a store to run against, worker subprocesses,
API clients, tiny images and bounded waits."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import redis
from PIL import Image

from app.main import create_app
from likeness.settings import BUNDLED_WEIGHTS_DIR, Settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette prefers the httpx2 fork; httpx works the same
    from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("LIKENESS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
T = TypeVar("T")


def redis_unreachable() -> str | None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        return f"Redis at {REDIS_URL} is unreachable ({exc})"
    return None


def png(size: int = 8, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def wait_until(
    fn: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    logs: Callable[[], str] = lambda: "",
) -> T:
    """Poll ``fn`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs()}")
        time.sleep(interval)


def subprocess_env(**likeness: str) -> dict[str, str]:
    """Our environment without any LIKENESS_* of the caller, plus the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIKENESS_")}
    # One thread each: the test machine's two cores are shared with the test process.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env.update({f"LIKENESS_{k.upper()}": v for k, v in likeness.items()})
    return env


@dataclass
class Proc:
    """A subprocess whose output goes to a file (no pipe to fill up and block it)."""

    popen: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, args: list[str], env: dict[str, str], log_path: Path) -> Proc:
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        return cls(popen, log_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return f"--- {self.log_path.name} ---\n{self.log_path.read_text(errors='replace')}"
        except OSError:
            return ""

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"process {self.pid} still running after {timeout} s\n{self.log()}"
            ) from None

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def worker_id(self, timeout: float = 60) -> str:
        """The id a worker logs when it is ready ('worker <id> ready: ...')."""

        def find() -> str | None:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if " worker " in line and " ready: " in line:
                    return line.split(" worker ", 1)[1].split(" ready: ", 1)[0]
            if self.popen.poll() is not None:
                raise AssertionError(f"worker exited with {self.popen.returncode}\n{self.log()}")
            return None

        return wait_until(
            find, timeout=timeout, what="the worker to be ready", interval=0.1, logs=self.log
        )


@dataclass
class Service:
    """One job store (an SQLite file or a Redis key prefix) with its workers and API clients."""

    kind: str
    dir: Path
    weights: Path
    prefix: str = field(default_factory=lambda: f"likeness-test:{uuid.uuid4().hex}:")
    procs: list[Proc] = field(default_factory=list)
    clients: list[TestClient] = field(default_factory=list)

    @property
    def store_url(self) -> str:
        return f"sqlite:///{self.dir / 'jobs.sqlite3'}" if self.kind == "sqlite" else REDIS_URL

    def values(self, **overrides: Any) -> dict[str, Any]:
        values: dict[str, Any] = {
            "data_dir": self.dir,
            "store": self.store_url,
            "redis_key_prefix": self.prefix,
            "weights_dir": self.dir / "no-weights",  # the default label lists
            "generator": str(self.weights),
            # LIKENESS_WEIGHTS_DIR lists none, so the bundled F is named by its file.
            "extractor": str(BUNDLED_WEIGHTS_DIR / "extractor.pt"),
            "device": "cpu",
            "worker_poll_seconds": 0.2,
        }
        values.update(overrides)
        return values

    def settings(self, **overrides: Any) -> Settings:
        return Settings(**self.values(**overrides))

    def client(self, **overrides: Any) -> TestClient:
        """A new app instance (its own store connection) on this service's store."""
        client = TestClient(create_app(self.settings(**overrides)))
        client.__enter__()  # runs the lifespan: the app opens its store
        self.clients.append(client)
        return client

    def start_worker(self, *args: str, **overrides: Any) -> Proc:
        env = subprocess_env(**{k: str(v) for k, v in self.values(**overrides).items()})
        name = f"worker-{len(self.procs)}.log"
        proc = Proc.start([sys.executable, "-m", "cli", "worker", *args], env, self.dir / name)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.log() for p in self.procs)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        for client in self.clients:
            client.__exit__(None, None, None)
        if self.kind == "redis":
            r = redis.Redis.from_url(REDIS_URL)
            keys = list(r.scan_iter(match=self.prefix + "*", count=1000))
            if keys:
                r.delete(*keys)
            r.close()


def submit(client: Any, thumbnail: bytes, fields: list[tuple[str, str]] | None = None) -> str:
    """POST /upscale; returns the new job's id."""
    form: dict[str, Any] = {}
    for name, value in fields or []:  # httpx wants repeated fields as a list
        form[name] = [*form[name], value] if name in form else [value]
    r = client.post("/upscale", files={"thumbnail": ("t.png", thumbnail, "image/png")}, data=form)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def get_job(client: Any, job_id: str) -> dict[str, Any]:
    r = client.get(f"/jobs/{job_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def wait_final(
    client: Any, ids: list[str], *, timeout: float, logs: Callable[[], str] = lambda: ""
) -> dict[str, dict[str, Any]]:
    """Poll until every job is final; returns the final views by id."""
    final: dict[str, dict[str, Any]] = {}

    def all_final() -> bool:
        for job_id in ids:
            if job_id not in final:
                job = get_job(client, job_id)
                if job["status"] in ("succeeded", "failed", "canceled"):
                    final[job_id] = job
        return len(final) == len(ids)

    wait_until(
        all_final, timeout=timeout, interval=0.1, logs=logs, what=f"{len(ids)} job(s) to finish"
    )
    return final


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return img.size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def running_serve(weights: Path, tmp_path: Path, **settings: str) -> Iterator[tuple[Proc, str]]:
    """`likeness serve` on a free port with a tiny generator; kills it and its worker after."""
    port = free_port()
    env = subprocess_env(
        data_dir=str(tmp_path / "data"),
        generator=str(weights),
        device="cpu",
        worker_poll_seconds="0.2",
        **settings,
    )
    proc = Proc.start(
        [sys.executable, "-m", "cli", "serve", "--port", str(port)], env, tmp_path / "serve.log"
    )
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        worker = re.search(r"worker pid (\d+)", proc.log())
        proc.kill()
        if worker and alive(int(worker.group(1))):
            os.kill(int(worker.group(1)), signal.SIGKILL)
