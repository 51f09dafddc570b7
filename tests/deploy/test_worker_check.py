"""`likeness worker --check`: the worker container's healthcheck (docker-compose.yml)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from likeness.jobs.redis_store import RedisJobStore
from likeness.jobs.sqlite_store import SQLiteJobStore
from likeness.settings import Settings
from likeness.worker_health import check_worker, new_worker_id, run_check, runs_on

T0 = 1_700_000_000.0
REDIS_URL = os.environ.get("LIKENESS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def test_worker_ids_name_their_host() -> None:
    worker = new_worker_id("gpu")
    assert runs_on(worker, "gpu")
    assert runs_on(new_worker_id(), socket.gethostname())
    assert not runs_on(worker, "gpu-2")
    assert not runs_on(new_worker_id("gpu-2"), "gpu")  # a longer host name is another host
    assert not runs_on("gpu-x", "gpu") and not runs_on("gpu", "gpu")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[SQLiteJobStore]:
    s = SQLiteJobStore(tmp_path / "jobs.sqlite3", clock=clock)
    yield s
    s.close()


def beat(store: SQLiteJobStore, clock: Clock, worker: str, at: float) -> None:
    clock.now = at
    store.record_worker_heartbeat(worker)


def test_healthy_while_this_hosts_worker_heartbeats(store: SQLiteJobStore, clock: Clock) -> None:
    health = check_worker(store, "gpu", 30, now=T0)
    assert not health.healthy and "no worker on host gpu" in health.message

    beat(store, clock, "gpu-7-abcdef", T0)
    health = check_worker(store, "gpu", 30, now=T0 + 10)
    assert health.healthy and "gpu-7-abcdef" in health.message

    health = check_worker(store, "gpu", 30, now=T0 + 31)
    assert not health.healthy and "31 s ago" in health.message


def test_other_hosts_workers_do_not_count(store: SQLiteJobStore, clock: Clock) -> None:
    beat(store, clock, "gpu-7-abcdef", T0)
    beat(store, clock, "gpu-2-8-012345", T0 + 100)  # a scaled replica on host gpu-2, alive
    health = check_worker(store, "gpu", 30, now=T0 + 100)
    assert not health.healthy and "gpu-7-abcdef" in health.message


def test_a_restarted_worker_counts_by_its_newest_id(store: SQLiteJobStore, clock: Clock) -> None:
    beat(store, clock, "gpu-7-abcdef", T0)
    beat(store, clock, "gpu-9-fedcba", T0 + 100)  # the same container, a new process
    health = check_worker(store, "gpu", 30, now=T0 + 110)
    assert health.healthy and "gpu-9-fedcba" in health.message


def test_an_unreachable_store_is_unhealthy(tmp_path: Path) -> None:
    settings = Settings(store="redis://127.0.0.1:1/0", data_dir=tmp_path)
    health = run_check(settings, "gpu")
    assert not health.healthy and health.message.startswith("cannot read the job store")


def _redis_reason() -> str | None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        return f"Redis at {REDIS_URL} is unreachable ({exc})"
    return None


@pytest.fixture(params=["sqlite", "redis"])
def settings_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIKENESS_")}
    env["LIKENESS_DATA_DIR"] = str(tmp_path)
    if request.param == "sqlite":
        env["LIKENESS_STORE"] = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
        yield env
        return
    reason = _redis_reason()
    if reason:
        pytest.skip(reason)
    prefix = f"likeness-test:{uuid.uuid4().hex}:"
    env["LIKENESS_STORE"] = REDIS_URL
    env["LIKENESS_REDIS_KEY_PREFIX"] = prefix
    yield env
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


# Runs the real command line and reports whether it imported torch.
CHECK = """
import runpy, sys
sys.argv = ["likeness", "worker", "--check"]
try:
    runpy.run_module("cli", run_name="__main__")
except SystemExit as exc:
    print("exit", exc.code)
print("torch", "torch" in sys.modules)
"""


def test_the_command_answers_fast_without_torch(settings_env: dict[str, str]) -> None:
    root = Path(__file__).resolve().parents[2]

    def run() -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", CHECK],
            cwd=root,
            env=settings_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()

    out = run()
    assert out[-2:] == ["exit 1", "torch False"], out
    assert "no worker on host" in out[0]

    settings = Settings(
        store=settings_env["LIKENESS_STORE"],
        redis_key_prefix=settings_env.get("LIKENESS_REDIS_KEY_PREFIX", "likeness:"),
        data_dir=Path(settings_env["LIKENESS_DATA_DIR"]),
    )
    store = (
        RedisJobStore(settings.store, prefix=settings.redis_key_prefix)
        if settings.store.startswith("redis://")
        else SQLiteJobStore(settings.store.removeprefix("sqlite:///"))
    )
    try:
        store.record_worker_heartbeat(new_worker_id())  # as `likeness worker` on this host
    finally:
        store.close()
    out = run()
    assert out[-2:] == ["exit 0", "torch False"], out
    assert "heartbeated" in out[0]
