"""Run one claimed batch of jobs: decode, one batched search, results, final statuses.

Between search steps the worker looks after its jobs from the step callback
(no thread): every step it reads the jobs' records to see cancel requests and
lost leases, so a canceled job stops within one step; every few seconds it
renews the leases with a heartbeat; at most every ``progress_interval_seconds``
it publishes progress. Publishing reads the best MSE back from the device (one
``tolist`` for the whole batch) and is the only thing here that waits for the
GPU: the search loop itself never does, so between two publications the host
queues steps ahead of the GPU and step times measured here are host times. A
job canceled mid-batch is finished as canceled at once and its rows' results
are ignored; when no job of the search is left, the search stops. Final
statuses go through ``JobStore.finish``, which is atomic and refuses a worker
that lost the lease, so a result is written at most once.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from likeness.errors import LikenessError
from likeness.face_detect import SharedDetector
from likeness.images import decode_image, prepare_thumbnail
from likeness.jobs import (
    REFERENCE_BLOB,
    RESULT_BLOB,
    THUMBNAIL_BLOB,
    JobError,
    JobRecord,
    JobStatus,
    JobStore,
    Progress,
    face_blob,
)
from likeness.manifest import BUNDLED_MANIFEST_PATH
from likeness.photo import PhotoPlan, plan_with_settings
from likeness.request import choose_seed
from likeness.settings import Settings
from likeness.worker_stats import WorkerStats
from worker.engine.checkpoints import LoadedGenerator
from worker.engine.face.extractor import FaceExtractor
from worker.engine.face.race_reader import RaceReader
from worker.engine.objectives import DEFAULT_THRESHOLD_DEG
from worker.engine.search import Precision, SearchConfig, SearchStep, SearchStopped
from worker.engine.speed import fastest_layout, fastest_precision
from worker.pipeline import (
    Objective,
    UpscaledPhoto,
    build_objective,
    canonical_targets,
    objective_weights,
    reference_embedding,
    resolve_search,
    upscale,
    upscale_photo,
)

log = logging.getLogger("likeness.worker")

# finish() is idempotent, so retrying it through a store hiccup is safe.
FINISH_RETRY_DELAYS = (0.5, 1.0, 2.0)
NOT_APPLIED_NOTE = (
    "race, attributes and the reference identity are accepted but not applied yet: this "
    "worker has no face extractor, so the search matched the thumbnail only"
)
RACE_NOT_KEPT_NOTE = (
    "the thumbnail's race is not kept: this worker has no race reader or no face extractor"
)


@dataclass
class WorkerContext:
    """What every batch of one worker process shares."""

    store: JobStore
    worker_id: str
    model: LoadedGenerator
    weights_name: str
    device: torch.device
    settings: Settings
    stats: WorkerStats
    abort: Callable[[], bool] = lambda: False  # True: drop the batch now, leases run out
    extractor: FaceExtractor | None = None  # None: targets are accepted but not applied
    threshold_deg: float = DEFAULT_THRESHOLD_DEG
    race_reader: RaceReader | None = None  # None: a job keeps no race it does not name
    detector: SharedDetector | None = None  # photo jobs' face detector, loaded on first use

    def face_detector(self) -> SharedDetector:
        if self.detector is None:
            # The detector ships with the project: found beside the bundled manifest too.
            self.detector = SharedDetector((self.settings.manifest_path, BUNDLED_MANIFEST_PATH))
        return self.detector

    @property
    def heartbeat_seconds(self) -> float:
        # A lease must be renewed well before it runs out, whatever the two settings say.
        return min(self.settings.worker_heartbeat_seconds, self.settings.lease_seconds / 3)


@dataclass
class Job:
    record: JobRecord
    pixels: np.ndarray
    size: int
    notes: list[str]
    decode_seconds: float
    photo: PhotoPlan | None = None  # photo mode: the faces to upscale in ``pixels``

    @property
    def id(self) -> str:
        return self.record.id


@dataclass
class Batch:
    """The claimed jobs not yet finished; a job leaves once finished or found lost."""

    ctx: WorkerContext
    claimed_at: float
    pending: dict[str, JobRecord] = field(default_factory=dict)

    def finish(self, job_id: str, status: JobStatus, **outcome: Any) -> bool:
        """Record the final status; False when another worker owns the job now."""
        self.pending.pop(job_id, None)
        ok = finish_with_retries(self.ctx, job_id, status, **outcome)
        if ok:
            self.ctx.stats.record_job(status.value, time.monotonic() - self.claimed_at)
        return ok

    def fail(self, job_id: str, code: str, message: str) -> None:
        self.finish(job_id, JobStatus.FAILED, error=JobError(code=code, message=message))

    def drop(self, job_id: str, why: str) -> None:
        self.pending.pop(job_id, None)
        log.warning("job %s: %s; leaving it to its new owner", job_id, why)


def finish_with_retries(ctx: WorkerContext, job_id: str, status: JobStatus, **outcome: Any) -> bool:
    for delay in (*FINISH_RETRY_DELAYS, None):
        try:
            ok = ctx.store.finish(job_id, ctx.worker_id, status, **outcome)
        except Exception as exc:
            if delay is None:
                log.error(
                    "job %s: could not record %s: %s; its lease will run out and it will run again",
                    job_id,
                    status.value,
                    exc,
                )
                return False
            log.warning("job %s: recording %s failed (%s); retrying", job_id, status.value, exc)
            time.sleep(delay)
            continue
        if not ok:
            log.warning(
                "job %s: no longer ours (lease taken over or already final); %s not recorded",
                job_id,
                status.value,
            )
        return ok
    return False  # unreachable: the loop returns on its last round


def run_batch(ctx: WorkerContext, records: list[JobRecord]) -> None:
    """Run claimed jobs to a final status each (unless aborted: then their leases run out)."""
    batch = Batch(ctx, time.monotonic(), {r.id: r for r in records})
    batch_id = records[0].batch_id if records else None
    try:
        jobs = decode_jobs(batch, records)
        for job in [j for j in jobs if j.photo is not None]:
            if ctx.abort():
                break
            run_photo_job(batch, job)
        for group in group_compatible([j for j in jobs if j.photo is None]):
            if ctx.abort():
                break
            run_group(batch, group)
    except Exception:
        # Anything unexpected: the jobs fail with a code; the trace goes to the log only.
        log.exception("batch %s failed unexpectedly", batch_id)
        for job_id in list(batch.pending):
            batch.fail(
                job_id,
                "internal_error",
                f"The worker hit an unexpected error while running this job (batch "
                f"{batch_id}); the operator can find the details in the worker log.",
            )
    if batch.pending and ctx.abort():
        log.warning(
            "abandoned %d job(s) of batch %s; they run again once their leases expire",
            len(batch.pending),
            batch_id,
        )


def decode_jobs(batch: Batch, records: Iterable[JobRecord]) -> list[Job]:
    """Thumbnails as the search wants them; a job whose input is unusable fails alone."""
    resolution = batch.ctx.model.generator.config.resolution
    jobs = []
    for rec in records:
        started = time.perf_counter()
        data = batch.ctx.store.get_blob(rec.id, THUMBNAIL_BLOB)
        if data is None:
            batch.fail(rec.id, "input_missing", "The job's thumbnail is no longer stored.")
            continue
        try:
            if rec.options.mode == "photo":
                jobs.append(decode_photo(batch.ctx, rec, data, resolution, started))
                continue
            thumb = prepare_thumbnail(data, resolution, max_pixels=batch.ctx.settings.max_pixels)
        except LikenessError as exc:
            batch.fail(rec.id, exc.code, exc.message)
            continue
        jobs.append(Job(rec, thumb.pixels, thumb.size, thumb.notes, time.perf_counter() - started))
    return jobs


def decode_photo(
    ctx: WorkerContext, rec: JobRecord, data: bytes, resolution: int, started: float
) -> Job:
    """A photo job: the photo and its faces, chosen as the API chose them on submission."""
    photo = decode_image(data, max_pixels=ctx.settings.photo_max_pixels)
    plan = plan_with_settings(
        photo.pixels, ctx.face_detector(), resolution, rec.options.faces, ctx.settings
    )
    return Job(rec, photo.pixels, 0, photo.notes, time.perf_counter() - started, photo=plan)


def group_compatible(jobs: list[Job]) -> list[list[Job]]:
    """Jobs one tensor batch can hold. Claims hand out one batch key, so this is
    normally one group; it guards against thumbnails that snap to different sizes."""
    groups: dict[tuple[Any, ...], list[Job]] = {}
    for job in jobs:
        o = job.record.options
        key = (
            job.pixels.shape,
            o.steps,
            o.restarts,
            o.eps,
            o.identity_weight,
            o.race_weight,
            o.attr_weight,
            o.views,
        )
        groups.setdefault(key, []).append(job)
    return list(groups.values())


def number_format(settings: Settings, device: torch.device) -> tuple[Precision, bool]:
    """The precision and layout (channels-last or not) this worker's searches run in."""
    precision = fastest_precision(settings.search_precision, device)
    return precision, fastest_layout(settings.search_channels_last, device, precision)


def search_config(
    job: Job, settings: Settings, model: LoadedGenerator, device: torch.device
) -> SearchConfig:
    """The job's search, run the way this worker's settings say (precision, layout,
    compile) on its device."""
    precision, channels_last = number_format(settings, device)
    return resolve_search(
        job.record.options,
        model,
        precision=precision,
        channels_last=channels_last,
        compile=settings.search_compile,
    )


class StepWatch:
    """The on_step callback: cancel checks, lease renewal and progress for one search."""

    def __init__(self, batch: Batch, group: list[Job]) -> None:
        self.batch, self.ctx = batch, batch.ctx
        self.index = {job.id: i for i, job in enumerate(group)}  # row of each job
        self.active = set(self.index)
        now = time.monotonic()
        self.next_beat = now + self.ctx.heartbeat_seconds
        self.last_progress = -float("inf")
        self.last_step_at = now
        self.step_seconds = 0.0
        self.steps_seen = 0
        self.last_store_error = -float("inf")
        self.warned_slow = False

    def __call__(self, s: SearchStep) -> bool:
        now = time.monotonic()
        step = now - self.last_step_at
        self.step_seconds += step
        self.steps_seen += 1
        if step > self.ctx.settings.lease_seconds / 2 and not self.warned_slow:
            # Leases are renewed between steps only: a step near the lease loses the jobs.
            self.warned_slow = True
            log.warning(
                "one search step took %.0f s, over half of LIKENESS_LEASE_SECONDS (%g s); "
                "raise it or other workers may take these jobs over",
                step,
                self.ctx.settings.lease_seconds,
            )
        if self.ctx.abort():
            return False
        try:
            held, canceled = self._check(now)
        except Exception as exc:  # the store blinked: keep searching, the lease has slack
            self._store_trouble(now, exc)
            held, canceled = set(self.active), set()
        for job_id in sorted(self.active - held):
            self.active.discard(job_id)
            self.batch.drop(job_id, "the lease was lost")
        stopped = canceled & self.active
        if stopped:
            self._publish(now, s, stopped)  # so the record shows where it stopped
            for job_id in sorted(stopped):
                self.active.discard(job_id)
                log.info("job %s: canceled at step %d of %d", job_id, s.step, s.steps)
                self.batch.finish(job_id, JobStatus.CANCELED)
        if not self.active:
            return False
        due = now - self.last_progress >= self.ctx.settings.progress_interval_seconds
        if due or s.step == s.steps:
            self.last_progress = now
            self._publish(now, s, self.active)
        self.last_step_at = time.monotonic()  # the store round trips are not step time
        return True

    def _check(self, now: float) -> tuple[set[str], set[str]]:
        """Which active jobs are still ours, and which of them a client wants canceled."""
        store, me = self.ctx.store, self.ctx.worker_id
        if now >= self.next_beat:
            beat = store.heartbeat(
                me, sorted(self.active), lease_seconds=self.ctx.settings.lease_seconds
            )
            self.next_beat = now + self.ctx.heartbeat_seconds
            return set(beat.held), set(beat.cancel_requested)
        # Between heartbeats a read is enough, and cheaper than renewing every lease.
        held, canceled = set(), set()
        for job_id in self.active:
            rec = store.get(job_id)
            if rec is None or rec.status is not JobStatus.RUNNING or rec.lease_owner != me:
                continue
            held.add(job_id)
            if rec.cancel_requested:
                canceled.add(job_id)
        return held, canceled

    def _publish(self, now: float, s: SearchStep, job_ids: Iterable[str]) -> None:
        # The one device sync of a search step, only when progress is due (see above).
        best = s.best_mse.tolist()
        try:
            for job_id in sorted(job_ids):
                progress = Progress(step=s.step, steps=s.steps, best_mse=best[self.index[job_id]])
                self.ctx.store.update_progress(job_id, progress, worker_id=self.ctx.worker_id)
        except Exception as exc:  # progress is advisory; the search goes on
            self._store_trouble(now, exc)

    def _store_trouble(self, now: float, exc: Exception) -> None:
        if now - self.last_store_error >= self.ctx.heartbeat_seconds:  # not once per step
            log.warning("job store error during a search (continuing): %s", exc)
        self.last_store_error = now


def has_targets(job: Job) -> bool:
    """The job names a target (a race, attributes, a reference) F must steer toward."""
    o = job.record.options
    return bool(o.race or o.attributes or REFERENCE_BLOB in job.record.inputs)


def steers(ctx: WorkerContext, job: Job) -> bool:
    """The search goes through F: a target named, or a race to keep and a reader to
    read it."""
    keeps = job.record.options.keep_race and ctx.race_reader is not None
    return ctx.extractor is not None and (has_targets(job) or keeps)


def job_targets(batch: Batch, job: Job) -> tuple[str | None, dict[str, int], Tensor | None] | None:
    """A job's race, attributes and reference embedding as F reads them; None when F
    cannot use them (the job has failed then)."""
    ext = batch.ctx.extractor
    assert ext is not None
    o = job.record.options
    try:
        race, attributes = canonical_targets(ext, o.race, o.attributes)
    except LikenessError as exc:
        batch.fail(job.id, exc.code, exc.message)
        return None
    embedding = None
    if REFERENCE_BLOB in job.record.inputs:
        data = batch.ctx.store.get_blob(job.id, REFERENCE_BLOB)
        try:
            if data is None:
                raise LikenessError(
                    "input_missing", "The job's reference photo is no longer stored."
                )
            pixels = decode_image(data, max_pixels=batch.ctx.settings.max_pixels).pixels
            embedding = reference_embedding(ext, pixels)
        except LikenessError as exc:
            batch.fail(job.id, exc.code, f"reference: {exc.message}")
            return None
    return race, attributes, embedding


def group_objective(batch: Batch, group: list[Job]) -> tuple[list[Job], Objective | None]:
    """The group's targets through F; a job whose targets F cannot use fails alone."""
    ext = batch.ctx.extractor
    if ext is None or not any(steers(batch.ctx, job) for job in group):
        return group, None
    kept, targets = [], []
    for job in group:
        wanted = job_targets(batch, job)
        if wanted is not None:
            kept.append(job)
            targets.append(wanted)
    if not kept:
        return kept, None
    weights = objective_weights(kept[0].record.options, batch.ctx.threshold_deg)
    return kept, build_objective(
        ext,
        weights,
        [t[0] for t in targets],
        [t[1] for t in targets],
        [t[2] for t in targets],
        keep_races=[job.record.options.keep_race for job in kept],
        race_reader=batch.ctx.race_reader,
    )


def run_group(batch: Batch, group: list[Job]) -> None:
    """One batched search over compatible jobs, then each job's result and status."""
    ctx = batch.ctx
    group, objective = group_objective(batch, group)
    if not group:
        return
    config = search_config(group[0], ctx.settings, ctx.model, ctx.device)
    seeds = [_seed(job) for job in group]
    watch = StepWatch(batch, group)
    batch_id = group[0].record.batch_id
    log.info(
        "batch %s: searching %d job(s), %d steps x %d restarts, %dpx -> %dpx",
        batch_id,
        len(group),
        config.steps,
        config.restarts,
        group[0].size,
        ctx.model.generator.config.resolution,
    )
    started = time.perf_counter()
    try:
        results = upscale(
            ctx.model,
            [job.pixels for job in group],
            config,
            on_step=watch,
            seeds=seeds,
            objective=objective,
        )
    except SearchStopped:
        log.info(
            "batch %s: search stopped after %d step(s) (no job of it left, or abort)",
            batch_id,
            watch.steps_seen,
        )
        return
    except LikenessError as exc:  # e.g. a thumbnail size this generator cannot reach
        for job in group:
            if job.id in watch.active:
                batch.fail(job.id, exc.code, exc.message)
        return
    finally:
        ctx.stats.record_batch(len(group))
        ctx.stats.record_steps(watch.steps_seen, watch.step_seconds)
    search_seconds = time.perf_counter() - started
    for job, result in zip(group, results, strict=True):
        if job.id not in watch.active:
            continue  # canceled or taken over mid-search: its rows' result is ignored
        started_encode = time.perf_counter()
        png = encode_png(result.pixels)
        report = job_report(
            ctx,
            job,
            result.report | {"thumbnail_size": job.size},
            len(group),
            search_seconds,
            encode_seconds=time.perf_counter() - started_encode,
            claimed_at=batch.claimed_at,
        )
        batch.finish(job.id, JobStatus.SUCCEEDED, result=report, result_blobs={RESULT_BLOB: png})
    log.info("batch %s: %d job(s) done in %.2f s", batch_id, len(group), search_seconds)


def _seed(job: Job) -> int:
    # The API always records a seed; a job written some other way gets one now, reported.
    seed = job.record.options.seed
    return seed if seed is not None else choose_seed()


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def job_report(
    ctx: WorkerContext,
    job: Job,
    result: dict[str, Any],
    batch_size: int,
    search_seconds: float,
    *,
    encode_seconds: float,
    claimed_at: float,
) -> dict[str, Any]:
    o = job.record.options
    notes = list(job.notes)
    if ctx.extractor is None and has_targets(job):
        notes.append(NOT_APPLIED_NOTE)
    if o.keep_race and not o.race and (ctx.extractor is None or ctx.race_reader is None):
        notes.append(RACE_NOT_KEPT_NOTE)
    steps = max(1, int(result.get("steps") or o.steps))
    return {
        **result,
        "resolution": ctx.model.generator.config.resolution,
        "notes": notes,
        "weights": {"name": ctx.weights_name, "sha256": ctx.model.sha256},
        "device": str(ctx.device),
        "worker": ctx.worker_id,
        "batch_id": job.record.batch_id,
        "batch_size": batch_size,
        "attempt": job.record.attempts,
        "timings": {
            "decode_seconds": round(job.decode_seconds, 4),
            "search_seconds": round(search_seconds, 4),
            "step_seconds": round(search_seconds / steps, 4),
            "encode_seconds": round(encode_seconds, 4),
            "worker_seconds": round(time.monotonic() - claimed_at, 4),
        },
    }


def run_photo_job(batch: Batch, job: Job) -> None:
    """A photo job: its chosen faces' searches batched by thumbnail size, the faces pasted
    back; the composite is the result, each face and its aligned thumbnail a blob."""
    ctx = batch.ctx
    plan = job.photo
    assert plan is not None
    objective_for = None
    if steers(ctx, job):
        wanted = job_targets(batch, job)
        if wanted is None:
            return
        ext, (race, attributes, embedding) = ctx.extractor, wanted
        options = job.record.options
        weights = objective_weights(options, ctx.threshold_deg)

        def objective_for(n: int) -> Objective | None:
            return build_objective(
                ext,
                weights,
                [race] * n,
                [attributes] * n,
                [embedding] * n,
                keep_races=[options.keep_race] * n,
                race_reader=ctx.race_reader,
            )

    config = search_config(job, ctx.settings, ctx.model, ctx.device)
    watch = StepWatch(batch, [job])
    log.info(
        "batch %s: photo job %s, %d face(s), %d steps x %d restarts",
        job.record.batch_id,
        job.id,
        len(plan.chosen),
        config.steps,
        config.restarts,
    )
    started = time.perf_counter()
    try:
        result = upscale_photo(
            ctx.model,
            job.pixels,
            plan,
            config,
            seed=_seed(job),
            max_side=ctx.settings.photo_output_max_side,
            on_step=watch,
            objective_for=objective_for,
        )
    except SearchStopped:
        log.info("photo job %s: search stopped (canceled, lost, or abort)", job.id)
        return
    except LikenessError as exc:
        if job.id in watch.active:
            batch.fail(job.id, exc.code, exc.message)
        return
    finally:
        ctx.stats.record_batch(len(plan.chosen))
        ctx.stats.record_steps(watch.steps_seen, watch.step_seconds)
    search_seconds = time.perf_counter() - started
    if job.id not in watch.active:
        return
    started_encode = time.perf_counter()
    blobs = photo_blobs(result)
    report = job_report(
        ctx,
        job,
        result.report() | {"steps": config.steps},
        len(plan.chosen),
        search_seconds,
        encode_seconds=time.perf_counter() - started_encode,
        claimed_at=batch.claimed_at,
    )
    batch.finish(job.id, JobStatus.SUCCEEDED, result=report, result_blobs=blobs)


def photo_blobs(result: UpscaledPhoto) -> dict[str, bytes]:
    blobs = {RESULT_BLOB: encode_png(result.composite.pixels)}
    for face, upscaled, crop in zip(result.plan.chosen, result.faces, result.crops, strict=True):
        blobs[face_blob(face.index)] = encode_png(upscaled.pixels)
        blobs[face_blob(face.index, "thumbnail")] = encode_png(crop)
    return blobs
