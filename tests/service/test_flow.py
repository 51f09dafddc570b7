"""Submit -> poll -> result with a real worker subprocess, on SQLite and on Redis.

One module-scoped run per store: four jobs queued together, then one worker
started, which must run them as one batched search. The tests below read what
that run left behind; the API restart opens a new app over the same store.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from likeness.labels import UTKFACE_RACES
from likeness.manifest import WeightsEntry, register, sha256_file
from tests.service.conftest import STORE_KINDS
from tests.service.helpers import (
    Service,
    get_job,
    png,
    png_size,
    submit,
    wait_final,
    wait_until,
)
from worker.engine.face.race_reader import RaceReader, save_reader

STEPS, RESTARTS = 3, 2
SEEDS = [101, 202, 303, 404]


@dataclass
class Run:
    service: Service
    ids: list[str]
    final: dict[str, dict[str, Any]]
    results: dict[str, bytes]
    metrics: str
    ready_status: int
    worker_id: str
    exit_code: int


@pytest.fixture(scope="module", params=STORE_KINDS)
def run(
    request: pytest.FixtureRequest, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    service = Service(request.param, tmp_path_factory.mktemp(f"flow-{request.param}"), tiny_weights)
    reader = service.dir / "reader"  # a weights folder with a race reader only
    try:
        reader.mkdir()
        save_reader(RaceReader(UTKFACE_RACES, width=4), reader / "race_reader.pt", {})
        register(
            WeightsEntry(
                name="race-reader",
                kind="race-reader",
                file="race_reader.pt",
                sha256=sha256_file(reader / "race_reader.pt"),
                default=True,
            ),
            reader / "manifest.json",
        )
        client = service.client(weights_dir=reader)
        fields = [("steps", str(STEPS)), ("restarts", str(RESTARTS))]
        ids = [
            submit(client, png(8, i), [*fields, ("seed", str(seed)), *keep])
            for i, (seed, keep) in enumerate(
                zip(SEEDS[:3], ([], [], [("keep_race", "false")]), strict=True)
            )
        ]
        ids.append(
            submit(
                client, png(8, 3), [*fields, ("seed", str(SEEDS[3])), ("attribute", "Smiling:1")]
            )
        )
        worker = service.start_worker(weights_dir=reader)  # after the submissions: all queued
        worker_id = worker.worker_id()
        ready = wait_until(
            lambda: client.get("/readyz").status_code == 200 or None,
            timeout=30,
            what="/readyz to see the worker",
            logs=service.logs,
        )
        final = wait_final(client, ids, timeout=90, logs=service.logs)
        results = {i: client.get(f"/jobs/{i}/result").content for i in ids}
        metrics = client.get("/metrics").text
        worker.signal(signal.SIGTERM)
        exit_code = worker.wait(30)
        yield Run(service, ids, final, results, metrics, 200 if ready else 0, worker_id, exit_code)
    finally:
        service.close()


def test_jobs_succeed_with_a_png_and_a_full_report(run: Run, tiny_weights: Path) -> None:
    sha = hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    for job_id, seed in zip(run.ids, SEEDS, strict=True):
        job = run.final[job_id]
        assert job["status"] == "succeeded", job
        assert job["error"] is None and job["attempts"] == 1
        assert job["progress"]["step"] == STEPS == job["progress"]["steps"]
        report = job["result"]
        assert report["seed"] == seed and report["steps"] == STEPS
        assert report["restarts"] == RESTARTS and len(report["candidates"]) == RESTARTS
        assert report["weights"] == {"name": str(tiny_weights), "sha256": sha}
        assert report["device"] == "cpu" and report["worker"] == run.worker_id
        assert report["resolution"] == 32 and report["thumbnail_size"] == 8
        assert report["downscale_mse"] > 0 and isinstance(report["accepted"], bool)
        assert set(report["timings"]) >= {"search_seconds", "step_seconds", "decode_seconds"}
        assert png_size(run.results[job_id]) == (32, 32)
    # The job that asked for an attribute got it applied by the bundled F: its report says
    # what F sees in the result and whether the constraint held.
    steered = run.final[run.ids[3]]["result"]
    assert set(steered["attribute_probabilities"]) == {"Smiling"}
    assert set(steered["constraints"]) == {"attributes"}
    assert not any("not applied" in n for n in steered.get("notes", []))
    assert all("attribute_probabilities" not in run.final[i]["result"] for i in run.ids[:3])
    # By default a job keeps the race the reader sees in its thumbnail, a target that never
    # rejects; a job that turns it off is a plain search.
    for job_id in (run.ids[0], run.ids[1], run.ids[3]):
        read = run.final[job_id]["result"]["race_read_from_thumbnail"]
        assert set(read) == {"White", "Black", "Asian", "Indian", "Others"}
        assert "race" not in run.final[job_id]["result"].get("constraints", {})
    assert run.final[run.ids[2]]["options"]["keep_race"] is False
    assert "race_read_from_thumbnail" not in run.final[run.ids[2]]["result"]
    assert run.final[run.ids[2]]["result"]["terms"].get("race", 0.0) == 0.0
    assert run.final[run.ids[0]]["result"]["terms"]["race"] > 0
    assert len(set(run.results.values())) == len(run.ids)  # different seeds and thumbnails


def test_four_jobs_queued_together_ran_as_one_batch(run: Run) -> None:
    reports = [run.final[i]["result"] for i in run.ids]
    assert {r["batch_size"] for r in reports} == {4}
    assert len({r["batch_id"] for r in reports}) == 1
    worker = f'worker="{run.worker_id}"'
    assert f'likeness_worker_batch_size_bucket{{{worker},le="2"}} 0' in run.metrics
    assert f'likeness_worker_batch_size_bucket{{{worker},le="4"}} 1' in run.metrics
    assert f"likeness_worker_batch_size_count{{{worker}}} 1" in run.metrics
    assert f'likeness_worker_jobs_total{{{worker},status="succeeded"}} 4' in run.metrics
    assert 'likeness_jobs{status="succeeded"} 4' in run.metrics


def test_readyz_saw_the_worker_and_sigterm_exits_0(run: Run) -> None:
    assert run.ready_status == 200
    assert run.exit_code == 0, run.service.logs()
    assert "stopped" in run.service.procs[0].log()


def test_a_new_api_instance_sees_every_job_intact(run: Run) -> None:
    client = run.service.client()  # a new app and store connection on the same store
    for job_id in run.ids:
        assert get_job(client, job_id) == run.final[job_id]
        assert client.get(f"/jobs/{job_id}/result").content == run.results[job_id]
    listed = client.get("/jobs", params={"limit": 100}).json()["items"]
    assert sorted(j["id"] for j in listed) == sorted(run.ids)
    # The store still takes and queues work after the restart (no worker runs now).
    new_id = submit(client, png(8, 9), [("steps", "3")])
    assert get_job(run.service.client(), new_id)["queue_position"] == 1
