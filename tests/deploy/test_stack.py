"""The stack for real: both images built and `docker compose up` on the CPU profile.

A thumbnail goes through the HTTP API to a PNG; then the failures a deployment
meets: a worker killed mid-job (the job completes once, on the restarted worker),
Redis killed and recreated (nothing queued is lost: the append-only file is on its
volume), and two workers sharing the queue (both take jobs).

Building the images takes many minutes the first time, so the test runs only when
LIKENESS_DEPLOY_TEST=1 and a Docker engine answers; `.ci/deploy` sets it up and
runs it. Base images and the torch index come from the environment as for
`docker compose` itself (LIKENESS_PYTHON_IMAGE, LIKENESS_REDIS_IMAGE,
LIKENESS_TORCH_INDEX_URL; docker/base-images.sh prints the first two). Every
container, network and volume of the test's compose project is removed at the
end, also when a test fails.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CPU_COMPOSE_FILE = ROOT / "docker-compose.cpu.yml"
THUMBNAIL = ROOT / "docs" / "examples" / "astronaut_16.png"
PROJECT = "likeness-deploy-test"
ENABLE = "LIKENESS_DEPLOY_TEST"

# The compose files' lease: a killed worker's job is claimed again after it. Not
# shorter: on a busy CPU one search step can take 20 s, and leases are renewed
# between steps only.
LEASE_SECONDS = 60
BUILD_TIMEOUT = 3 * 3600
JOB_TIMEOUT = 600.0
START_TIMEOUT = 600.0
# Few steps: a shared CPU may run them seconds apart.
SHORT_JOB = {"steps": "5", "restarts": "1"}
PROBE_JOB = {"steps": "40", "restarts": "1"}
# The job a worker is killed in lasts about this long, at the speed the probe measured:
# long enough that it is still running after `docker kill` on a loaded host.
LONG_JOB_SECONDS = 60.0
LARGEST_BATCH = 8  # jobs a worker claims at once at most, by default
STEPS_MAX = 1000  # the service's default limit (settings.steps_max)
METRIC = re.compile(r'^likeness_worker_jobs_total\{worker="([^"]+)",status="(\w+)"\} (\d+)$')

pytestmark = [pytest.mark.deploy, pytest.mark.slow]


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def _skip_reason() -> str | None:
    if os.environ.get(ENABLE) != "1":
        return (
            f"builds the images and runs containers (minutes): set {ENABLE}=1, as .ci/deploy does"
        )
    docker = shutil.which("docker")
    if docker is None:
        return "no docker command"
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"no Docker engine answers: {info.stderr.strip()[:200]}"
    if _compose_cli() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """One compose project on the CPU profile, and the HTTP API it publishes."""

    def __init__(self, cli: list[str], env: dict[str, str], port: int) -> None:
        self.cli = cli
        self.env = env
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0)

    def compose(
        self, *args: str, check: bool = True, timeout: float = 900.0
    ) -> subprocess.CompletedProcess[str]:
        cmd = [*self.cli, "--project-name", PROJECT, "--file", str(CPU_COMPOSE_FILE), *args]
        result = subprocess.run(
            cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}"
            )
        return result

    def containers(self, service: str) -> list[str]:
        ids = self.compose("ps", "-q", service).stdout.split()
        running = []
        for cid in ids:
            state = subprocess.run(
                ["docker", "inspect", "-f", "{{.State.Running}}", cid],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if state.stdout.strip() == "true":
                running.append(cid)
        return running

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "80", check=False).stdout

    def get(self, path: str) -> httpx.Response | None:
        # None while the API or its store is out of reach (restarts are part of the test).
        try:
            return self.http.get(path)
        except httpx.HTTPError:
            return None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            response = self.get("/readyz")
            if response is not None and response.status_code == 200:
                return
            last = None if response is None else response.text
            time.sleep(2)
        raise AssertionError(f"/readyz not 200 after {timeout:.0f} s ({last})\n{self.logs()}")

    def submit(self, **fields: str) -> str:
        with THUMBNAIL.open("rb") as f:
            response = self.http.post(
                "/upscale",
                files={"thumbnail": ("thumb.png", f, "image/png")},
                data={"seed": "1", **fields},
            )
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict[str, Any] | None:
        response = self.get(f"/jobs/{job_id}")
        if response is None or response.status_code >= 500:
            return None
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait_for(
        self, job_id: str, done: Any = None, timeout: float = JOB_TIMEOUT
    ) -> dict[str, Any]:
        """The job once ``done(job)`` holds (default: final)."""
        finals = {"succeeded", "failed", "canceled"}
        done = done or (lambda j: j["status"] in finals)
        deadline = time.monotonic() + timeout
        job = None
        while time.monotonic() < deadline:
            job = self.job(job_id) or job
            if job is not None and done(job):
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} after {timeout:.0f} s: {job}\n{self.logs()}")

    def result_png(self, job_id: str) -> tuple[int, int]:
        response = self.http.get(f"/jobs/{job_id}/result")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        with Image.open(BytesIO(response.content)) as img:
            assert img.format == "PNG"
            return img.size

    def succeeded_by_worker(self) -> dict[str, int]:
        response = self.get("/metrics")
        assert response is not None and response.status_code == 200
        counts: dict[str, int] = {}
        for line in response.text.splitlines():
            m = METRIC.match(line)
            if m and m.group(2) == "succeeded":
                counts[m.group(1)] = int(m.group(3))
        return counts

    def worker_ready(self, container: str) -> bool:
        """Whether the worker in ``container`` said it is ready since the container started.

        Its log, not Docker's health status: on a loaded host the health check's own
        start-up can exceed its timeout while the worker works.
        """
        started = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.StartedAt}}", container],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        logs = subprocess.run(
            ["docker", "logs", "--since", started, container],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return bool(re.search(r"likeness\.worker: worker \S+ ready:", logs.stdout + logs.stderr))

    def wait_for_workers(self, n: int, timeout: float = START_TIMEOUT) -> None:
        """Until ``n`` worker containers run and each has its worker ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            containers = self.containers("worker")
            if len(containers) == n and all(self.worker_ready(c) for c in containers):
                return
            time.sleep(2)
        raise AssertionError(f"{n} ready workers not up after {timeout:.0f} s\n{self.logs()}")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    cli = _compose_cli()
    assert cli is not None
    port = _free_port()
    with tempfile.TemporaryDirectory() as checkpoints:
        env = {
            **os.environ,
            "LIKENESS_PUBLISH": f"127.0.0.1:{port}",
            "LIKENESS_BATCH_SIZE": "1",
            # Not ./checkpoints: Docker would create it in the checkout, owned by root.
            "LIKENESS_CHECKPOINTS": checkpoints,
        }
        stack = Stack(cli, env, port)
        try:
            stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)
            stack.compose("build", "--force-rm", timeout=BUILD_TIMEOUT)
            stack.compose("up", "-d")
            stack.wait_ready()
            stack.wait_for_workers(1)
            yield stack
        finally:
            stack.http.close()
            stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)


def test_a_thumbnail_becomes_a_png(stack: Stack) -> None:
    job_id = stack.submit(**SHORT_JOB)
    job = stack.wait_for(job_id)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1
    width, height = stack.result_png(job_id)
    assert width == height and width > 16


def test_a_killed_worker_s_job_completes_once_after_up(stack: Stack) -> None:
    stack.compose("up", "-d", "--scale", "worker=1")
    stack.wait_for_workers(1)
    # The probe's steps are many enough that its first (slow) step hardly counts, so the
    # long job is not cut short by an overestimated step time.
    probe = stack.wait_for(stack.submit(**PROBE_JOB))
    step_seconds = probe["result"]["timings"]["step_seconds"]
    # Past the service's step limit the job grows by restarts instead (a batched restart
    # costs less than a step, so the job is shorter then, but still long enough).
    steps = max(10, math.ceil(LONG_JOB_SECONDS / step_seconds))
    restarts = min(8, math.ceil(steps / STEPS_MAX))
    steps = min(steps, STEPS_MAX)
    time.sleep(5)  # the worker writes its counters just after it stores the result
    before = sum(stack.succeeded_by_worker().values())
    job_id = stack.submit(steps=str(steps), restarts=str(restarts))
    stack.wait_for(job_id, lambda j: j["status"] == "running" and j["progress"]["step"] >= 1)
    [worker] = stack.containers("worker")
    subprocess.run(["docker", "kill", worker], check=True, capture_output=True, timeout=60)
    assert stack.job(job_id)["status"] == "running"  # type: ignore[index]
    stack.compose("up", "-d", "--scale", "worker=1")
    job = stack.wait_for(job_id)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2, "the killed attempt and one more"
    assert job["result"]["attempt"] == 2
    stack.result_png(job_id)
    # Once: it stays finished as it was, and exactly one worker counted it.
    time.sleep(LEASE_SECONDS + 5)
    again = stack.job(job_id)
    assert again is not None
    assert (again["status"], again["attempts"], again["finished"]) == (
        "succeeded",
        2,
        job["finished"],
    )
    assert sum(stack.succeeded_by_worker().values()) == before + 1


def test_queued_jobs_survive_redis_being_killed_and_recreated(stack: Stack) -> None:
    stack.compose("stop", "--timeout", "60", "worker")
    jobs = [stack.submit(**SHORT_JOB) for _ in range(3)]
    for job_id in jobs:
        assert stack.job(job_id)["status"] == "queued"  # type: ignore[index]
    time.sleep(3)  # appendfsync everysec: what is a second old is on disk
    stack.compose("kill", "redis")
    # A new container: what comes back was read from the volume, not the old container.
    stack.compose("rm", "--force", "redis")
    stack.compose("up", "-d", "redis")
    deadline = time.monotonic() + 120
    while stack.job(jobs[0]) is None and time.monotonic() < deadline:
        time.sleep(1)
    for job_id in jobs:
        job = stack.job(job_id)
        assert job is not None and job["status"] == "queued", job
    stack.compose("up", "-d", "--scale", "worker=1")
    for job_id in jobs:
        job = stack.wait_for(job_id)
        assert job["status"] == "succeeded", job
        stack.result_png(job_id)


def test_two_workers_both_take_jobs(stack: Stack) -> None:
    stack.compose("up", "-d", "--scale", "worker=2")
    stack.wait_for_workers(2)
    workers = set(stack.containers("worker"))
    # More than two of a worker's largest default batch (8 jobs), so one worker cannot
    # take them all in one claim while the other waits.
    jobs = [stack.submit(**SHORT_JOB, seed=str(n)) for n in range(2 * LARGEST_BATCH + 1)]
    took: dict[str, int] = {}
    for job_id in jobs:
        job = stack.wait_for(job_id)
        assert job["status"] == "succeeded", job
        took[job["result"]["worker"]] = took.get(job["result"]["worker"], 0) + 1
    assert len(took) == 2, f"jobs per worker: {took}"
    # Worker ids begin with the host name, which is the container's short id.
    hosts = {worker.split("-")[0] for worker in took}
    assert all(any(c.startswith(h) for c in workers) for h in hosts), (took, workers)
