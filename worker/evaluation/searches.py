"""The strategies of Tables 1–3 and their batched searches, cached on disk.

A batch's result is stored under a key that hashes everything it depends on
(thumbnails, seeds, targets, reference photos, the generator's and the
extractor's sha256, the search and objective settings, the device type), so an
interrupted run resumes at the first missing batch and a re-run only scores.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from likeness.labels import UTKFACE_RACES
from worker.engine.objectives import ObjectiveWeights
from worker.engine.search import SearchConfig, SearchStep
from worker.evaluation.config import TABLE3_ATTRIBUTES
from worker.evaluation.measures import embed
from worker.evaluation.models import Models
from worker.evaluation.samples import Samples
from worker.pipeline import Objective, build_objective
from worker.pipeline import upscale as run_upscale

CACHE_VERSION = 1  # bump when what a cached batch holds or means changes

# (steps just done, a short status) → None: the caller's progress bar
OnProgress = Callable[[int, str], None]


@dataclass(frozen=True)
class Strategy:
    """Which targets the search gets, through which extractor."""

    name: str
    label: str
    extractor: Literal["f", "f0"] | None = None
    identity: bool = False  # reference: I' (CelebA-HQ) or the photo itself (UTKFace)
    race: bool = False  # target: the photo's true race
    attributes: bool = False  # targets: the photo's true values of the five Table 3 attributes


NONE = Strategy("none", "no control (PULSE)")
IDENTITY_F0 = Strategy("identity-f0", "identity objective with F0", "f0", identity=True)
IDENTITY_F = Strategy("identity-f", "identity objective with F", "f", identity=True)
ATTRIBUTES = Strategy("attributes", "attribute objective (five at once)", "f", attributes=True)
RACE = Strategy("race", "race objective", "f", race=True)
IDENTITY_RACE = Strategy(
    "identity+race", "identity and race objectives", "f", identity=True, race=True
)
CELEBA_STRATEGIES = (NONE, IDENTITY_F0, IDENTITY_F, ATTRIBUTES)
UTKFACE_STRATEGIES = (NONE, IDENTITY_F, RACE, IDENTITY_RACE)


@dataclass
class Outputs:
    """One strategy's upscaled faces for all N thumbnails of a sample set."""

    images: Tensor  # (N, 3, R, R) in [0, 1] (from 8-bit pixels)
    accepted: np.ndarray  # (N,) bool: downscale MSE ≤ eps and constraints held
    mse: np.ndarray  # (N,) downscale MSE of the chosen candidate
    reports: list[dict[str, Any]]  # pipeline.upscale's report per thumbnail
    search_seconds: float  # time the searches took when they ran (cached or not)
    batches: int = 0
    cached_batches: int = 0
    files: list[str] = field(default_factory=list)  # the cache files, in batch order


def search_config(models: Models, steps: int, restarts: int) -> SearchConfig:
    """The generator's search settings (PULSE's where it has none: eps, lr, schedule, …) at
    these sizes; seeds come per thumbnail."""
    return models.generator.search_config(steps=steps, restarts=restarts)


def _targets(
    strategy: Strategy, samples: Samples, rows: Sequence[int]
) -> tuple[list[str | None], list[dict[str, int]]]:
    races: list[str | None] = [None] * len(rows)
    attrs: list[dict[str, int]] = [{} for _ in rows]
    if strategy.race:
        races = [UTKFACE_RACES[int(samples.labels[i])] for i in rows]
    if strategy.attributes:
        attrs = [
            {a: int(v) for a, v in zip(TABLE3_ATTRIBUTES, samples.labels[i], strict=True)}
            for i in rows
        ]
    return races, attrs


def batch_key(
    models: Models,
    samples: Samples,
    rows: Sequence[int],
    strategy: Strategy,
    config: SearchConfig,
    weights: ObjectiveWeights | None = None,
) -> str:
    """sha256 of everything the batch's outputs depend on."""
    races, attrs = _targets(strategy, samples, rows)
    spec: dict[str, Any] = {
        "version": CACHE_VERSION,
        "strategy": strategy.name,
        "dataset": samples.dataset,
        "generator": models.generator.sha256,
        "search": config.model_dump(mode="json"),
        "seeds": [samples.seeds[i] for i in rows],
        "races": races,
        "attributes": attrs,
        "device": models.device.type,
    }
    if strategy.extractor is not None:
        _, theta, sha = models.extractor(strategy.extractor)
        spec["extractor"] = sha
        spec["objective"] = with_threshold(weights, theta).model_dump(mode="json")
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    h.update(np.ascontiguousarray(samples.thumbnails[list(rows)]).tobytes())
    if strategy.identity:
        refs = samples.references[list(rows)].mul(255).round().byte()
        h.update(refs.numpy().tobytes())
    return h.hexdigest()


def with_threshold(weights: ObjectiveWeights | None, theta: float) -> ObjectiveWeights:
    """``weights`` (default: ObjectiveWeights' documented defaults) with the steering
    extractor's own θ_t."""
    return (weights or ObjectiveWeights()).model_copy(update={"threshold_deg": theta})


def strategy_objective(
    models: Models,
    samples: Samples,
    rows: Sequence[int],
    strategy: Strategy,
    weights: ObjectiveWeights | None = None,
) -> Objective | None:
    """The strategy's targets for these thumbnails, weighted by ``weights`` (default:
    ObjectiveWeights' documented defaults) with the extractor's own θ_t."""
    if strategy.extractor is None:
        return None
    extractor, theta, _ = models.extractor(strategy.extractor)
    references: list[Tensor | None] = [None] * len(rows)
    if strategy.identity:
        references = list(embed(extractor, samples.references[list(rows)]))
    races, attrs = _targets(strategy, samples, rows)
    return build_objective(extractor, with_threshold(weights, theta), races, attrs, references)


def _save(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: an interrupted run leaves no half-written batch


def _load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # a damaged file is searched again, never trusted
        return None


def search_batch(
    models: Models,
    samples: Samples,
    rows: Sequence[int],
    strategy: Strategy,
    config: SearchConfig,
    on_step: Callable[[SearchStep], None] | None,
    weights: ObjectiveWeights | None = None,
) -> dict[str, Any]:
    """One batched search through worker/pipeline.py (the worker's path): 8-bit outputs,
    acceptance, downscale MSE and the per-thumbnail reports."""
    started = time.perf_counter()
    objective = strategy_objective(models, samples, rows, strategy, weights)
    results = run_upscale(
        models.generator,
        list(samples.thumbnails[list(rows)]),
        config,
        on_step=on_step,
        seeds=[samples.seeds[i] for i in rows],
        objective=objective,
    )
    return {
        "pixels": torch.from_numpy(np.stack([r.pixels for r in results])),
        "accepted": torch.tensor([bool(r.report["accepted"]) for r in results]),
        "mse": torch.tensor(
            [float(r.report["downscale_mse"]) for r in results], dtype=torch.float64
        ),
        # JSON text: plain data that torch.load(weights_only=True) reads back as is
        "reports": json.dumps([r.report for r in results]),
        "seconds": time.perf_counter() - started,
    }


def run_strategy(
    models: Models,
    samples: Samples,
    strategy: Strategy,
    steps: int,
    restarts: int,
    batch: int,
    cache: Path,
    on_progress: OnProgress | None = None,
    weights: ObjectiveWeights | None = None,
) -> Outputs:
    """Every thumbnail of ``samples`` under ``strategy``, ``batch`` at a time; batches are
    fixed slices, so a larger N reuses the smaller run's batches. ``weights``: the
    objectives' settings (default: ObjectiveWeights' documented defaults)."""
    config = search_config(models, steps, restarts)
    parts: list[dict[str, Any]] = []
    files: list[str] = []
    cached = 0
    n_batches = -(-len(samples) // batch)
    for b, start in enumerate(range(0, len(samples), batch)):
        rows = list(range(start, min(start + batch, len(samples))))
        key = batch_key(models, samples, rows, strategy, config, weights)
        path = cache / f"{samples.dataset}-{strategy.name}-{key[:32]}.pt"
        status = f"{samples.dataset} {strategy.name} {b + 1}/{n_batches}"
        payload = _load(path)
        if payload is not None:
            cached += 1
            if on_progress is not None:
                on_progress(steps, f"{status} (cached)")
        else:

            def on_step(s: SearchStep, status: str = status) -> None:
                if on_progress is not None:
                    on_progress(1, status)

            payload = search_batch(models, samples, rows, strategy, config, on_step, weights)
            _save(path, payload)
        parts.append(payload)
        files.append(path.name)
    pixels = torch.cat([p["pixels"] for p in parts])
    return Outputs(
        images=pixels.permute(0, 3, 1, 2).float().div(255),
        accepted=torch.cat([p["accepted"] for p in parts]).numpy(),
        mse=torch.cat([p["mse"] for p in parts]).numpy(),
        reports=[r for p in parts for r in json.loads(p["reports"])],
        search_seconds=float(sum(p["seconds"] for p in parts)),
        batches=n_batches,
        cached_batches=cached,
        files=files,
    )
