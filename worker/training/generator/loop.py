"""The training loop: data, the clock, checkpoints, the FD probe and the progress bar."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from likeness.errors import LikenessError
from worker.engine.face.extractor import FaceExtractor
from worker.engine.generator import Generator
from worker.pipeline import pick_device
from worker.training.common import MetricMeans, StopSignal
from worker.training.generator.config import (
    CHECKPOINT_NAME,
    LOG_NAME,
    RUN_FIELDS,
    TrainConfig,
    merge_resume_config,
)
from worker.training.generator.export import export, exported_generator
from worker.training.generator.state import (
    TrainState,
    build_state,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from worker.training.generator.steps import train_step
from worker.training.generator.vae import (
    load_face_model,
)
from worker.training.generator_quality import held_out_photos, photo_embeddings, sample_fd
from worker.training.images_zip import (
    ImagesZip,
    StepSampler,
    SyntheticImages,
    read_member_list,
)


@dataclass
class FDProbe:
    """What the FD at a checkpoint compares against: the embeddings of held-out photos,
    computed once per run."""

    face: FaceExtractor
    reference: Tensor  # (N, D)

    def __call__(self, G: Generator) -> float:
        return sample_fd(G, self.face, self.reference, len(self.reference))


def fd_probe(config: TrainConfig, state: TrainState) -> FDProbe | None:
    """None unless ``fd_samples``; fails before training when it cannot be measured."""
    n = config.fd_samples
    if n == 0:
        return None
    if config.face_weights is None:
        raise LikenessError(
            "no_face_weights",
            "--fd-samples needs --face-weights (the MobileFaceNet whose embeddings FD compares)",
        )
    face = state.face or load_face_model(config.face_weights, state.device)
    if config.data is None:  # smoke runs: other synthetic images stand in for photos
        synthetic = SyntheticImages(config.resolution, n, seed=config.seed + 1)
        photos = torch.stack([synthetic[i][0] for i in range(n)]).add(1).div(2)
    else:
        if not (config.data.parent / "labels.csv").is_file():
            raise LikenessError(
                "no_labels",
                f"--fd-samples needs labels.csv beside {config.data} to find the held-out people",
            )
        photos = held_out_photos(config.data.parent, n, one_per_person=False)
    return FDProbe(face, photo_embeddings(face, photos))


def make_dataset(config: TrainConfig) -> Dataset[tuple[Tensor, Tensor]]:
    if config.data is None:
        return SyntheticImages(
            config.resolution, config.synthetic_count, config.seed, mirror=config.mirror
        )
    members = read_member_list(config.members) if config.members is not None else None
    return ImagesZip(config.data, config.resolution, members=members, mirror=config.mirror)


def batches(
    config: TrainConfig,
    dataset: Dataset[tuple[Tensor, Tensor]],
    start_step: int,
    device: torch.device,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (images, masks) batches from ``start_step`` on."""
    workers = config.workers if config.workers is not None else (4 if device.type == "cuda" else 0)
    loader = DataLoader(
        dataset,
        batch_size=config.batch,
        drop_last=True,
        num_workers=workers,
        sampler=StepSampler(len(dataset), config.seed, start=start_step * config.batch),
        pin_memory=device.type == "cuda",
        # its own generator: otherwise creating the iterator draws from the global RNG
        generator=torch.Generator().manual_seed(config.seed),
    )
    for real, mask in loader:
        yield real.to(device, non_blocking=True), mask.to(device, non_blocking=True)


@dataclass
class TrainResult:
    step: int
    kimg: float
    reason: str  # "done", "max_minutes" or "signal"
    checkpoint: Path
    last: dict[str, float] = field(default_factory=dict)


PLAIN_LINE_SECONDS = 60.0

# What the progress line shows, when the objective produces it.
STATUS_METRICS = (
    ("loss_G", "G", 3),
    ("loss_D", "D", 3),
    ("real_score", "real", 2),
    ("fake_score", "fake", 2),
    ("rec_adv", "adv", 3),
    ("adv_balance", "balance", 3),
    ("r1", "R1", 4),
    ("rec_l1", "L1", 4),
    ("rec_lowres", "lowres", 5),
    ("rec_identity", "id", 3),
    ("rec_perceptual", "perc", 3),
    ("rec_race", "race", 3),
    ("kl", "KL", 0),
)


def status_text(metrics: dict[str, float]) -> str:
    return " ".join(
        f"{label} {metrics[key]:.{digits}f}"
        for key, label, digits in STATUS_METRICS
        if key in metrics
    )


def progress_bar(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("train"),
        BarColumn(),
        TextColumn("{task.fields[kimg]}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def train(
    config: TrainConfig,
    *,
    resume: Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train (or resume) until ``total_kimg``, ``max_minutes`` or a signal; always
    leaves a checkpoint, ``g_ema.pt``, a sample grid and a log line behind.

    When resuming, only the run-control fields (``RUN_FIELDS``) of ``config``
    are used; everything else comes from the checkpoint.
    """
    device = pick_device(config.device)
    ckpt = read_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        config = merge_resume_config(
            TrainConfig(**ckpt["train_config"]), config.model_dump(include=set(RUN_FIELDS))
        )
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    state = build_state(config, device)
    if ckpt is not None:
        load_checkpoint(state, ckpt)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data = batches(config, make_dataset(config), state.step, device)
    with torch.random.fork_rng(devices=[]):  # building F0 draws its random init
        probe = fd_probe(config, state)

    started = last_save = time.monotonic()
    session_start_step = last_log_step = state.step
    means, metrics, reason = MetricMeans(), {}, "done"
    shown: dict[str, float] = {}  # latest value of each metric, lazy ones included

    def checkpoint(why: str) -> dict[str, Any]:
        nonlocal last_save, last_log_step
        now = time.monotonic()
        state.train_seconds += now - last_save
        kind = state.device.type
        state.device_seconds[kind] = state.device_seconds.get(kind, 0.0) + now - last_save
        save_checkpoint(state, out / CHECKPOINT_NAME)
        G = exported_generator(state)
        files = export(state, out, G)
        entry = {
            "step": state.step,
            "kimg": round(state.kimg, 3),
            "reason": why,
            "img_per_s": (state.step - last_log_step) * config.batch / max(now - last_save, 1e-9),
            "train_seconds": round(state.train_seconds, 1),
            **means.pop(),
            **files,
        }
        if probe is not None:
            with torch.random.fork_rng(devices=[]):  # the run's RNG is already saved
                entry |= {"fd": probe(G), "fd_samples": config.fd_samples}
        with open(out / LOG_NAME, "a") as f:
            f.write(json.dumps(entry) + "\n")
        last_save, last_log_step = time.monotonic(), state.step
        if on_checkpoint is not None:
            on_checkpoint(entry)
        return entry

    with StopSignal() as stop, progress_bar(progress) as bar:
        task = bar.add_task(
            "train", total=config.total_steps, completed=state.step, kimg="", status=""
        )
        # Under nohup, docker or CI there is no live bar: print a plain line a minute.
        plain_lines = progress and not bar.console.is_terminal
        last_line = time.monotonic()
        while state.step < config.total_steps:
            metrics = train_step(state, *next(data))
            means.add(metrics)
            shown |= metrics
            if on_step is not None:
                on_step(state.step, metrics)
            elapsed = time.monotonic() - started
            rate = (state.step - session_start_step) * config.batch / max(elapsed, 1e-9)
            kimg = f"{state.kimg:.2f}/{config.total_kimg:g} kimg"
            status = f"{status_text(shown)} {rate:.1f} img/s"
            bar.update(task, completed=state.step, kimg=kimg, status=status)
            if plain_lines and time.monotonic() - last_line >= PLAIN_LINE_SECONDS:
                bar.console.print(f"train {kimg} {status}", highlight=False)
                last_line = time.monotonic()
            if stop.received is not None:
                reason = "signal"
                break
            if config.max_minutes is not None and elapsed >= config.max_minutes * 60:
                reason = "max_minutes"
                break
            done = state.step >= config.total_steps
            if not done and time.monotonic() - last_save >= config.checkpoint_minutes * 60:
                checkpoint("periodic")
        checkpoint(reason)
    data.close()  # shuts the DataLoader's worker processes down now, not at GC
    return TrainResult(
        step=state.step,
        kimg=state.kimg,
        reason=reason,
        checkpoint=out / CHECKPOINT_NAME,
        last=metrics,
    )
