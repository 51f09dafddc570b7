"""The worker's batch handling in-process, on a real SQLite store and the tiny generator:
bad inputs, unexpected errors, cancels, lost leases, stops, heartbeats, progress, stats."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from likeness.jobs import (
    RESULT_BLOB,
    InputFile,
    JobOptions,
    JobRecord,
    JobStatus,
    batch_key,
)
from likeness.jobs.sqlite_store import SQLiteJobStore
from likeness.settings import Settings
from likeness.worker_stats import read_stats, render, stats_dir
from tests.service.helpers import png
from worker.engine.checkpoints import LoadedGenerator, load_generator
from worker.process import EXIT_ABANDONED, EXIT_OK, StopFlag, Worker


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Hooked:
    """A real store whose chosen methods call a hook after they ran."""

    def __init__(self, inner: SQLiteJobStore, **after: Callable[..., None]) -> None:
        self.inner, self.after, self.calls = inner, after, []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            self.calls.append((name, args))
            if name in self.after:
                self.after[name](out, *args)
            return out

        return call


@pytest.fixture(scope="module")
def model(tiny_weights: Path) -> LoadedGenerator:
    return load_generator(tiny_weights, "cpu")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[SQLiteJobStore]:
    s = SQLiteJobStore(tmp_path / "jobs.sqlite3", clock=clock, lease_seconds=60)
    yield s
    s.close()


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "store": "sqlite:///unused",
        "worker_poll_seconds": 0.01,
        "progress_interval_seconds": 0,
        # the same numbers on every CPU; the automatic choice has a test of its own
        "search_precision": "fp32",
    }
    return Settings(**{**values, **overrides})


def add_job(
    store: SQLiteJobStore, thumbnail: bytes, *, steps: int = 3, seed: int = 1, **options: Any
) -> str:
    opts = JobOptions(steps=steps, restarts=1, seed=seed, **options)
    opts.batch_key = batch_key(opts, 8)
    rec = JobRecord(
        options=opts,
        inputs={
            "thumbnail": InputFile(
                size=len(thumbnail), sha256=hashlib.sha256(thumbnail).hexdigest()
            )
        },
    )
    created, _ = store.create(rec, {"thumbnail": thumbnail})
    return created.id


def make_worker(store: Any, model: LoadedGenerator, tmp_path: Path, **overrides: Any) -> Worker:
    return Worker(
        store,
        model,
        "tiny",
        torch.device("cpu"),
        settings(tmp_path, **overrides),
        worker_id="w-test",
        stop=StopFlag(),
    )


def test_a_job_whose_thumbnail_does_not_decode_fails_alone(store, model, tmp_path) -> None:
    good = add_job(store, png(8, 0))
    bad = add_job(store, b"not an image at all")
    truncated = add_job(store, png(8, 1)[:100])
    assert make_worker(store, model, tmp_path).run(once=True) == EXIT_OK
    assert store.get(bad).status is JobStatus.FAILED
    assert store.get(bad).error.code == "not_an_image"
    assert store.get(truncated).error.code == "truncated_image"
    done = store.get(good)
    assert done.status is JobStatus.SUCCEEDED and done.result["batch_size"] == 1
    assert store.get_blob(good, RESULT_BLOB).startswith(b"\x89PNG")


def test_an_unexpected_error_fails_the_batch_with_internal_error_and_logs_it(
    store, model, tmp_path, monkeypatch, caplog
) -> None:
    ids = [add_job(store, png(8, i)) for i in range(2)]

    def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret detail of the crash")

    monkeypatch.setattr("worker.batch.upscale", explode)
    worker = make_worker(store, model, tmp_path)
    with caplog.at_level(logging.ERROR, logger="likeness.worker"):
        assert worker.run(once=True) == EXIT_OK
    for job_id in ids:
        rec = store.get(job_id)
        assert rec.status is JobStatus.FAILED and rec.error.code == "internal_error"
        assert "secret detail" not in rec.error.message and "Traceback" not in rec.error.message
        assert rec.batch_id in rec.error.message
    assert "secret detail of the crash" in caplog.text  # the trace is in the log instead
    assert worker.ctx.stats.jobs == {"failed": 2}


def test_canceling_every_job_of_a_batch_stops_the_search_at_the_next_step(
    store, model, tmp_path
) -> None:
    ids = [add_job(store, png(8, i), steps=50) for i in range(2)]

    def cancel_all(claimed: list[JobRecord], *args: Any) -> None:
        for rec in claimed:
            store.request_cancel(rec.id)

    worker = make_worker(Hooked(store, claim=cancel_all), model, tmp_path)
    worker.run(once=True)
    for job_id in ids:
        rec = store.get(job_id)
        assert rec.status is JobStatus.CANCELED and rec.progress.step == 1
        assert rec.result is None and store.get_blob(job_id, RESULT_BLOB) is None
    assert worker.ctx.stats.step_seconds_count == 1  # the search itself stopped


def test_canceling_one_job_finishes_it_at_once_and_the_rest_run_on(store, model, tmp_path) -> None:
    victim, other = (add_job(store, png(8, i), steps=4) for i in range(2))
    worker = make_worker(
        Hooked(store, claim=lambda c, *a: store.request_cancel(victim)), model, tmp_path
    )
    worker.run(once=True)
    rec = store.get(victim)
    assert rec.status is JobStatus.CANCELED and rec.progress.step == 1
    assert store.get_blob(victim, RESULT_BLOB) is None
    done = store.get(other)
    assert done.status is JobStatus.SUCCEEDED and done.progress.step == 4
    assert done.result["batch_size"] == 2


def test_a_job_taken_over_by_another_worker_is_left_alone(store, model, tmp_path, clock) -> None:
    job_id = add_job(store, png(8, 0), steps=50)

    def lose_lease(claimed: list[JobRecord], *args: Any) -> None:
        clock.offset += 1000  # our lease runs out, and another worker claims the job
        assert [r.id for r in store.claim("thief", 8)] == [job_id]

    worker = make_worker(Hooked(store, claim=lose_lease), model, tmp_path)
    worker.run(once=True)
    rec = store.get(job_id)
    assert rec.status is JobStatus.RUNNING and rec.lease_owner == "thief" and rec.attempts == 2
    assert worker.ctx.stats.jobs == {} and worker.ctx.stats.step_seconds_count == 1


def test_a_stop_before_claiming_leaves_the_queue_alone(store, model, tmp_path) -> None:
    job_id = add_job(store, png(8, 0))
    worker = make_worker(store, model, tmp_path)
    worker.stop.request("test")
    assert worker.run() == EXIT_OK
    assert store.get(job_id).status is JobStatus.QUEUED


def test_a_second_stop_abandons_the_batch_to_its_leases(store, model, tmp_path) -> None:
    job_id = add_job(store, png(8, 0), steps=50)
    holder: list[Worker] = []

    def two_signals(*args: Any) -> None:
        holder[0].stop.request("SIGTERM")
        holder[0].stop.request("SIGTERM")

    worker = make_worker(Hooked(store, update_progress=two_signals), model, tmp_path)
    holder.append(worker)
    assert worker.run() == EXIT_ABANDONED
    rec = store.get(job_id)
    assert rec.status is JobStatus.RUNNING and rec.lease_owner == "w-test"  # for the reaper


def test_leases_are_renewed_and_progress_is_throttled(store, model, tmp_path) -> None:
    job_id = add_job(store, png(8, 0), steps=6)
    hooked = Hooked(store)
    # A lease of 0.03 s means a heartbeat at every step; progress only at the first and last.
    worker = make_worker(
        hooked, model, tmp_path, lease_seconds=0.03, progress_interval_seconds=1000
    )
    worker.run(once=True)
    assert store.get(job_id).status is JobStatus.SUCCEEDED
    beats = [args for name, args in hooked.calls if name == "heartbeat"]
    assert beats and all(list(args[1]) == [job_id] for args in beats)
    published = [args[1].step for name, args in hooked.calls if name == "update_progress"]
    assert published == [1, 6]


def test_worker_stats_count_batches_and_render_for_metrics(store, model, tmp_path) -> None:
    for i in range(3):
        add_job(store, png(8, i))
    worker = make_worker(store, model, tmp_path, batch_size=2)
    worker.run(once=True)
    worker.run(once=True)
    [stats] = read_stats(stats_dir(tmp_path))
    assert stats.worker == "w-test" and stats.batch_sizes == {2: 1, 1: 1}
    assert stats.jobs == {"succeeded": 3} and stats.step_seconds_count == 6
    text = "\n".join(render([stats]))
    assert 'likeness_worker_batch_size_bucket{worker="w-test",le="1"} 1' in text
    assert 'likeness_worker_batch_size_bucket{worker="w-test",le="2"} 2' in text
    assert 'likeness_worker_batch_size_sum{worker="w-test"} 3' in text
    assert text.count("# TYPE likeness_worker_batch_size histogram") == 1


def test_the_parent_going_away_stops_the_worker() -> None:
    assert not StopFlag().stopping
    assert StopFlag(parent_pid=os.getppid()).stopping is False
    assert StopFlag(parent_pid=os.getppid() + 100_000).stopping


def test_an_unset_batch_size_is_the_best_measured_for_the_device(
    store, model, tmp_path, monkeypatch
) -> None:
    from worker.engine import speed

    def batch_size(**overrides: Any) -> int:
        return make_worker(store, model, tmp_path, **overrides).batch_size

    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert batch_size(search_precision="auto") == 8  # bf16: 8 x 4 was the best per image
    assert batch_size(search_precision="fp32") == 4  # fp32: 4 x 4
    assert batch_size(search_precision="auto", batch_size=3) == 3
    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset())
    assert batch_size(search_precision="auto") == 4


def test_the_search_runs_as_the_worker_settings_say(monkeypatch) -> None:
    from types import SimpleNamespace

    from worker.batch import search_config
    from worker.engine import speed

    job = SimpleNamespace(record=SimpleNamespace(options=JobOptions(steps=7, restarts=3, seed=1)))
    settings = Settings(
        search_precision="bf16", search_channels_last=True, search_compile="reduce-overhead"
    )
    model = LoadedGenerator(
        None,
        None,
        None,
        Path("g.pt"),
        "0" * 64,  # type: ignore[arg-type]
        search_defaults={"geocross_weight": 0.02, "steps": 50},
    )
    cpu = torch.device("cpu")
    config = search_config(job, settings, model, cpu)  # type: ignore[arg-type]
    # the job's steps win over the generator's; its other settings stay
    assert (config.steps, config.restarts, config.eps, config.seed) == (7, 3, 2e-3, 1)
    assert config.geocross_weight == 0.02
    assert (config.precision, config.channels_last, config.compile) == (
        "bf16",
        True,
        "reduce-overhead",
    )
    explicit = Settings(search_precision="fp32")
    assert search_config(job, explicit, model, cpu).precision == "fp32"  # type: ignore[arg-type]
    # auto: bf16 where the CPU has bf16 units, fp32 where it has none
    # (with channels-last, measured faster there), fp32 in the default layout elsewhere
    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    auto = search_config(job, Settings(), model, cpu)  # type: ignore[arg-type]
    assert (auto.precision, auto.channels_last) == ("bf16", True)
    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    auto = search_config(job, Settings(), model, cpu)  # type: ignore[arg-type]
    assert (auto.precision, auto.channels_last) == ("fp32", False)


def test_targets_go_through_the_extractor_per_job(store, model, tmp_path) -> None:
    """Mixed targets in one batch: each job's report shows its own; unknown labels and a
    reference without a face fail that job alone; no extractor → the not-applied note."""
    import io as _io

    from PIL import Image as _Image
    from skimage import data as _data

    from tests.tiny_models import random_extractor
    from worker.batch import NOT_APPLIED_NOTE, RACE_NOT_KEPT_NOTE

    torch.manual_seed(0)
    ext = random_extractor()
    coffee = _io.BytesIO()
    _Image.fromarray(_data.coffee()).save(coffee, format="PNG")

    plain = add_job(store, png(8, 0))
    black = add_job(store, png(8, 1), race="Black", attributes={"Smiling": 1})
    martian = add_job(store, png(8, 2), race="Martian")
    ref_job = JobRecord(
        options=JobOptions(
            steps=3,
            restarts=1,
            seed=1,
            batch_key=batch_key(JobOptions(steps=3, restarts=1, seed=1), 8),
        ),
        inputs={
            "thumbnail": InputFile(size=len(png(8, 4)), sha256="0" * 64),
            "reference": InputFile(size=len(coffee.getvalue()), sha256="0" * 64),
        },
    )
    no_face, _ = store.create(ref_job, {"thumbnail": png(8, 4), "reference": coffee.getvalue()})

    worker = Worker(
        store,
        model,
        "tiny",
        torch.device("cpu"),
        settings(tmp_path),
        worker_id="w-test",
        stop=StopFlag(),
        extractor=ext,
    )
    assert worker.run(once=True) == EXIT_OK
    assert store.get(martian).error.code == "unknown_label"
    assert store.get(no_face.id).error.code == "no_face"
    done = store.get(black).result
    assert set(done["race_probabilities"]) == {"White", "Black", "Asian", "Indian", "Others"}
    assert set(done["attribute_probabilities"]) == {"Smiling"}
    assert set(done["constraints"]) == {"race", "attributes"}
    assert NOT_APPLIED_NOTE not in done["notes"]
    other = store.get(plain).result
    assert done["batch_size"] == other["batch_size"] == 2, "one search for both"
    assert "constraints" in other and other["constraints"]["race"]["value"] == 0.0
    # no race reader: the plain job keeps no race and says so; the one naming a race does not
    assert RACE_NOT_KEPT_NOTE in other["notes"] and RACE_NOT_KEPT_NOTE not in done["notes"]
    assert "race_read_from_thumbnail" not in other

    # more views are a batch of their own (they change every step), and the job gets them
    viewed = add_job(store, png(8, 6), race="Black", views=3)
    assert store.get(viewed).options.batch_key != store.get(black).options.batch_key
    assert worker.run(once=True) == EXIT_OK
    seen = store.get(viewed).result
    assert seen["views"] == 3 and seen["batch_size"] == 1

    later = add_job(store, png(8, 5), race="Black")
    bare = Worker(
        store,
        model,
        "tiny",
        torch.device("cpu"),
        settings(tmp_path),
        worker_id="w-bare",
        stop=StopFlag(),
    )
    assert bare.run(once=True) == EXIT_OK
    assert NOT_APPLIED_NOTE in store.get(later).result["notes"]
