"""``likeness worker``: the process that owns the device and runs queued jobs.

It loads the generator once, then loops: claim up to ``batch_size`` compatible
jobs with a lease (a claim also records the worker's heartbeat, which /readyz
watches), run them as one batched search (``worker.batch``), repeat; when the
queue is empty it waits ``worker_poll_seconds``.

Stopping: the first SIGTERM or SIGINT stops claiming, **finishes the current
batch** and exits 0 (the store has no way to hand a claimed job back, and a
finished batch wastes no work). A second signal abandons the batch at the next
step and exits 1: its jobs stay running until their leases expire, then run
again. Give the process a stop timeout longer than one batch (docker compose
``stop_grace_period``), or the SIGKILL that follows has the same effect as the
second signal. With ``parent_pid`` (``likeness serve``) the worker also stops
as after one signal when that process is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

import torch

from likeness.errors import LikenessError
from likeness.jobs import JobStore, open_store_from_settings
from likeness.settings import Settings, get_settings
from likeness.worker_health import new_worker_id
from likeness.worker_stats import REFRESH_SECONDS, WorkerStats, remove_stale, stats_dir, write_stats
from worker.batch import WorkerContext, number_format, run_batch
from worker.engine.checkpoints import LoadedGenerator
from worker.engine.face.extractor import FaceExtractor
from worker.engine.face.race_reader import RaceReader
from worker.engine.objectives import DEFAULT_THRESHOLD_DEG
from worker.engine.speed import best_batch_size, fastest_precision
from worker.pipeline import (
    freeze_extractor,
    load_extractor,
    load_race_reader,
    load_search_model,
    pick_device,
)

log = logging.getLogger("likeness.worker")

EXIT_OK = 0
EXIT_ABANDONED = 1


class StopFlag:
    """Signals, counted: the first asks to stop after the batch, the second to abort."""

    def __init__(self, parent_pid: int | None = None) -> None:
        self.parent_pid = parent_pid
        self.signals = 0
        self._wake = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, why: str) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("%s: finishing the current batch, then exiting (again: abandon it)", why)
        else:
            log.warning("%s again: abandoning the current batch", why)
        self._wake.set()

    @property
    def stopping(self) -> bool:
        if self.signals == 0 and self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.request("parent process gone")
        return self.signals > 0

    @property
    def abort(self) -> bool:
        return self.signals > 1

    def sleep(self, seconds: float) -> None:
        """Wait, but wake at once on a signal."""
        self._wake.wait(seconds)


class Worker:
    def __init__(
        self,
        store: JobStore,
        model: LoadedGenerator,
        weights_name: str,
        device: torch.device,
        settings: Settings,
        *,
        batch_size: int | None = None,
        worker_id: str | None = None,
        stop: StopFlag | None = None,
        extractor: FaceExtractor | None = None,
        threshold_deg: float = DEFAULT_THRESHOLD_DEG,
        race_reader: RaceReader | None = None,
    ) -> None:
        self.settings = settings
        self.batch_size = (
            batch_size
            or settings.batch_size
            or best_batch_size(device, fastest_precision(settings.search_precision, device))
        )
        self.stop = stop or StopFlag()
        worker_id = worker_id or new_worker_id()
        self.ctx = WorkerContext(
            store=store,
            worker_id=worker_id,
            model=model,
            weights_name=weights_name,
            device=device,
            settings=settings,
            stats=WorkerStats(worker=worker_id),
            abort=lambda: self.stop.abort,
            extractor=extractor,
            threshold_deg=threshold_deg,
            race_reader=race_reader,
        )
        self.stats_dir = stats_dir(settings.data_dir)
        self._stats_written = -float("inf")

    @property
    def worker_id(self) -> str:
        return self.ctx.worker_id

    def run(self, *, once: bool = False) -> int:
        """Claim and run batches until stopped (``once``: at most one batch)."""
        log.info(
            "worker %s ready: %s on %s in %s, batches of up to %d, store %s",
            self.worker_id,
            self.ctx.weights_name,
            self.ctx.device,
            fastest_precision(self.settings.search_precision, self.ctx.device),
            self.batch_size,
            _redact(self.settings.store),
        )
        remove_stale(self.stats_dir)
        self._write_stats()
        while not self.stop.stopping:
            try:
                jobs = self.ctx.store.claim(
                    self.worker_id, self.batch_size, lease_seconds=self.settings.lease_seconds
                )
            except Exception as exc:  # store down: wait and try again, do not die
                log.warning("cannot claim jobs: %s", exc)
                jobs = []
            if jobs:
                run_batch(self.ctx, jobs)
                self._write_stats()
                if self.stop.abort:
                    return EXIT_ABANDONED
            elif not once:
                if time.monotonic() - self._stats_written >= REFRESH_SECONDS:
                    self._write_stats()  # keeps an idle worker's series in /metrics
                self.stop.sleep(self.settings.worker_poll_seconds)
            if once:
                break
        log.info("worker %s stopped", self.worker_id)
        return EXIT_OK

    def _write_stats(self) -> None:
        try:
            write_stats(self.ctx.stats, self.stats_dir)
        except OSError as exc:  # metrics must never stop the work
            log.warning("cannot write worker stats to %s: %s", self.stats_dir, exc)
        self._stats_written = time.monotonic()


def _redact(url: str) -> str:
    """A store URL for the log, without a password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(
    *, once: bool = False, batch_size: int | None = None, parent_pid: int | None = None
) -> int:
    """Entry point of ``likeness worker``; returns the exit code.

    Raises ``LikenessError`` when the device or the weights are unusable.
    """
    configure_logging()
    stop = StopFlag(parent_pid)
    stop.install()  # before the slow model load, so Ctrl-C during it exits cleanly
    settings = get_settings()
    device = pick_device(settings.device)
    model, name = load_worker_generator(settings, device)
    extractor, threshold = load_worker_extractor(settings, device)
    race_reader = load_race_reader(device, settings.manifest_path) if extractor else None
    log.info(
        "race reader %s: jobs without a race %s",
        "loaded" if race_reader is not None else "not found",
        "keep the thumbnail's" if race_reader is not None else "keep none",
    )
    store = open_store_from_settings(settings)
    try:
        return Worker(
            store,
            model,
            name,
            device,
            settings,
            batch_size=batch_size,
            stop=stop,
            extractor=extractor,
            threshold_deg=threshold,
            race_reader=race_reader,
        ).run(once=once)
    finally:
        store.close()


def load_worker_generator(settings: Settings, device: torch.device) -> tuple[LoadedGenerator, str]:
    """LIKENESS_GENERATOR, else the default generator of the manifest in
    LIKENESS_WEIGHTS_DIR, as every other process finds it."""
    try:
        return load_search_model(settings.generator, device, settings.manifest_path)
    except LikenessError as exc:
        if exc.code != "no_default_weights":
            raise
        raise LikenessError(
            exc.code,
            f"{settings.manifest_path} lists no generator; set LIKENESS_GENERATOR to a "
            "checkpoint path or a manifest name, or LIKENESS_WEIGHTS_DIR to a folder with one",
        ) from None


def load_worker_extractor(
    settings: Settings, device: torch.device
) -> tuple[FaceExtractor | None, float]:
    """F for race, attribute and reference targets. With none bundled and none named,
    the worker still runs: it matches thumbnails only and says so in each report."""
    try:
        extractor, threshold, name = load_extractor(
            settings.extractor, device, settings.manifest_path
        )
        freeze_extractor(extractor, channels_last=number_format(settings, device)[1])
    except LikenessError as exc:
        if exc.code != "no_default_weights" or settings.extractor is not None:
            raise
        log.warning(
            "no face extractor is bundled: race, attribute and reference targets "
            "will be accepted but not applied (set LIKENESS_EXTRACTOR)"
        )
        return None, DEFAULT_THRESHOLD_DEG
    log.info("face extractor %s loaded (threshold %.1f deg)", name, threshold)
    return extractor, threshold
