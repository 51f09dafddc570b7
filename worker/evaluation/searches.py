"""The strategies of Tables 1–3 and their batched searches, cached on disk per thumbnail.

A strategy runs a list of jobs: one thumbnail each, with that strategy's targets
(the attribute strategy asks for one attribute-value pair per job, as the paper
does); the figures add jobs that ask for other races and values than the photo's.
Each job's output is stored under a key that hashes everything it depends
on (thumbnail, seed, targets, reference photo, the generator's and the
extractor's sha256, the search and objective settings, the device type); the
search gives each thumbnail of a batch the image it would get alone with its
seed, so a re-run searches only the jobs whose key it has not seen, in batches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from likeness.labels import UTKFACE_RACES
from worker.engine.objectives import ObjectiveWeights
from worker.engine.search import SearchConfig, SearchStep, config_key
from worker.evaluation.config import TABLE3_ATTRIBUTES
from worker.evaluation.measures import embed
from worker.evaluation.models import Models
from worker.evaluation.samples import Samples
from worker.pipeline import Objective, build_objective
from worker.pipeline import upscale as run_upscale

CACHE_VERSION = 2  # bump when what a cached batch holds or means changes

# (steps just done, a short status) → None: the caller's progress bar
OnProgress = Callable[[int, str], None]


@dataclass(frozen=True)
class Strategy:
    """Which targets the search gets, through which extractor."""

    name: str
    label: str
    extractor: Literal["f", "f0"] | None = None
    identity: bool = False  # reference: another photo I' of the person (rows without one skip)
    race: bool = False  # target: the photo's true race
    attributes: bool = False  # one job per (row, attribute): the photo's true value of it
    keep_race: bool = False  # the race reader's reading of the thumbnail (the product's default)


NONE = Strategy("none", "no control (PULSE)")
IDENTITY_F0 = Strategy("identity-f0", "identity objective with F0", "f0", identity=True)
IDENTITY_F = Strategy("identity-f", "identity objective with F", "f", identity=True)
ATTRIBUTES = Strategy(
    "attributes", "attribute objective (one pair per search)", "f", attributes=True
)
RACE = Strategy("race", "race objective", "f", race=True)
KEPT = Strategy("kept", "race kept from the thumbnail", "f", keep_race=True)
IDENTITY_RACE = Strategy(
    "identity+race", "identity and race objectives", "f", identity=True, race=True
)
CELEBA_STRATEGIES = (NONE, IDENTITY_F0, IDENTITY_F, ATTRIBUTES)
UTKFACE_STRATEGIES = (NONE, IDENTITY_F, RACE, IDENTITY_RACE)


@dataclass(frozen=True)
class Job:
    """One search: a sample row and, for the attribute strategy, the one attribute it asks
    about (None there: all five Table 3 attributes at once, at their true values, which
    only the steering bench asks for). The targets are the photo's own unless ``value``
    (the attribute's value asked for) or ``race`` (the race asked for) says otherwise:
    the figures ask for the other values too."""

    row: int
    attribute: str | None = None
    value: int | None = None
    race: str | None = None

    def __post_init__(self) -> None:
        if self.value is not None and self.attribute is None:
            raise ValueError("a value is asked for one attribute only")


def strategy_jobs(
    strategy: Strategy, samples: Samples, subsets: Mapping[str, Sequence[int]]
) -> list[Job]:
    """The searches a strategy runs on ``samples``: every row; for the identity objective,
    the rows with a second photo of the person; for the attribute objective, one job per
    row of each attribute's balanced rows (``subsets``)."""
    if strategy.attributes:
        return [Job(r, a) for a, rows in subsets.items() for r in rows]
    rows = samples.with_reference if strategy.identity else range(len(samples))
    return [Job(r) for r in rows]


def race_swap_jobs(samples: Samples, people: int) -> list[Job]:
    """Table 2's figure, for the race strategy: the first ``people`` rows (UTKFace samples
    interleave the races, so one per race where the set allows), each asked for every
    race. The true race's search is Table 2's own, the same cache file."""
    return [Job(r, race=race) for r in range(min(people, len(samples))) for race in UTKFACE_RACES]


def attribute_pair_jobs(samples: Samples, people: int) -> list[Job]:
    """Table 3's figure, for the attribute strategy: the first ``people`` rows, each asked
    for each Table 3 attribute on (1) and off (0); the photo's own value is Table 3's
    search wherever the row is in that attribute's balanced set."""
    return [
        Job(r, a, value)
        for r in range(min(people, len(samples)))
        for a in TABLE3_ATTRIBUTES
        for value in (1, 0)
    ]


@dataclass
class Outputs:
    """One strategy's upscaled faces, one per job, in job order."""

    jobs: list[Job]
    images: Tensor  # (J, 3, R, R) in [0, 1] (from 8-bit pixels)
    accepted: np.ndarray  # (J,) bool: downscale MSE ≤ eps and constraints held
    mse: np.ndarray  # (J,) downscale MSE of the chosen candidate
    reports: list[dict[str, Any]]  # pipeline.upscale's report per job
    search_seconds: float  # time the searches took when they ran (cached or not)
    cached_jobs: int = 0
    batches: int = 0  # batches searched by this run
    files: list[str] = field(default_factory=list)  # the cache files, in job order

    @property
    def rows(self) -> np.ndarray:
        return np.array([j.row for j in self.jobs], dtype=int)

    def for_attribute(self, attribute: str, rows: Sequence[int]) -> list[int]:
        """The jobs that answer about ``attribute`` on ``rows``: its own (the attribute
        strategy) or, for the other strategies, theirs on those rows."""
        wanted = set(rows)
        return [
            k
            for k, j in enumerate(self.jobs)
            if j.row in wanted and j.attribute in (None, attribute)
        ]


def search_config(models: Models, steps: int, restarts: int) -> SearchConfig:
    """The generator's search settings (PULSE's where it has none: eps, lr, schedule, …) at
    these sizes; seeds come per thumbnail."""
    return models.generator.search_config(steps=steps, restarts=restarts)


def job_targets(
    strategy: Strategy, samples: Samples, jobs: Sequence[Job]
) -> tuple[list[str | None], list[dict[str, int]]]:
    """Per job, the race and the attribute values its search asks for: the photo's own
    unless the job names others."""
    races: list[str | None] = [None] * len(jobs)
    attrs: list[dict[str, int]] = [{} for _ in jobs]
    if strategy.race:
        races = [j.race or UTKFACE_RACES[int(samples.labels[j.row])] for j in jobs]
    if strategy.attributes:
        column = {a: c for c, a in enumerate(TABLE3_ATTRIBUTES)}
        attrs = [
            {
                a: int(samples.labels[j.row, column[a]]) if j.value is None else j.value
                for a in (TABLE3_ATTRIBUTES if j.attribute is None else (j.attribute,))
            }
            for j in jobs
        ]
    return races, attrs


def job_key(
    models: Models,
    samples: Samples,
    job: Job,
    strategy: Strategy,
    config: SearchConfig,
    weights: ObjectiveWeights | None = None,
) -> str:
    """sha256 of everything the job's output depends on: its targets as resolved, so a
    job naming the photo's own race or value shares the file of one that leaves it out."""
    races, attrs = job_targets(strategy, samples, [job])
    spec: dict[str, Any] = {
        "version": CACHE_VERSION,
        "strategy": strategy.name,
        "dataset": samples.dataset,
        "generator": models.generator.sha256,
        "search": config_key(config),
        "seed": samples.seeds[job.row],
        "race": races[0],
        "attributes": attrs[0],
        "device": models.device.type,
    }
    if strategy.extractor is not None:
        _, theta, sha = models.extractor(strategy.extractor)
        spec["extractor"] = sha
        # a search that keeps no race does not depend on the kept race's weight
        spec["objective"] = with_threshold(weights, theta).model_dump(
            mode="json", exclude=None if strategy.keep_race else {"kept_race"}
        )
    if strategy.keep_race:
        spec["race_reader"] = models.kept_race_reader()[1]
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    h.update(np.ascontiguousarray(samples.thumbnails[job.row]).tobytes())
    if strategy.identity:
        h.update(samples.reference_photos([job.row]).mul(255).round().byte().numpy().tobytes())
    return h.hexdigest()


def with_threshold(weights: ObjectiveWeights | None, theta: float) -> ObjectiveWeights:
    """``weights`` (default: ObjectiveWeights' documented defaults) with the steering
    extractor's own θ_t."""
    return (weights or ObjectiveWeights()).model_copy(update={"threshold_deg": theta})


def strategy_objective(
    models: Models,
    samples: Samples,
    jobs: Sequence[Job],
    strategy: Strategy,
    weights: ObjectiveWeights | None = None,
) -> Objective | None:
    """The strategy's targets for these jobs, weighted by ``weights`` (default:
    ObjectiveWeights' documented defaults) with the extractor's own θ_t."""
    if strategy.extractor is None:
        return None
    extractor, theta, _ = models.extractor(strategy.extractor)
    references: list[Tensor | None] = [None] * len(jobs)
    if strategy.identity:
        references = list(embed(extractor, samples.reference_photos([j.row for j in jobs])))
    races, attrs = job_targets(strategy, samples, jobs)
    return build_objective(
        extractor,
        with_threshold(weights, theta),
        races,
        attrs,
        references,
        keep_races=[strategy.keep_race] * len(jobs),
        race_reader=models.kept_race_reader()[0] if strategy.keep_race else None,
    )


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
    jobs: Sequence[Job],
    strategy: Strategy,
    config: SearchConfig,
    on_step: Callable[[SearchStep], None] | None,
    weights: ObjectiveWeights | None = None,
) -> list[dict[str, Any]]:
    """One batched search through worker/pipeline.py (the worker's path): per job its
    8-bit output, acceptance, downscale MSE, report and share of the search time."""
    started = time.perf_counter()
    objective = strategy_objective(models, samples, jobs, strategy, weights)
    results = run_upscale(
        models.generator,
        [samples.thumbnails[j.row] for j in jobs],
        config,
        on_step=on_step,
        seeds=[samples.seeds[j.row] for j in jobs],
        objective=objective,
    )
    seconds = (time.perf_counter() - started) / len(jobs)
    return [
        {
            "pixels": torch.from_numpy(np.ascontiguousarray(r.pixels)),
            "accepted": bool(r.report["accepted"]),
            "mse": float(r.report["downscale_mse"]),
            # JSON text: plain data that torch.load(weights_only=True) reads back as is
            "report": json.dumps(r.report),
            "seconds": seconds,
        }
        for r in results
    ]


@dataclass
class Plan:
    """A strategy's jobs on one sample set, each with its cache file and, if that file
    already holds it, its result; ``name``: what its outputs are filed under (the
    strategy's name, or a figure's for the searches only a figure asks for)."""

    samples: Samples
    strategy: Strategy
    jobs: list[Job]
    paths: list[Path]
    done: list[dict[str, Any] | None]
    name: str

    @property
    def missing(self) -> list[int]:
        return [k for k, d in enumerate(self.done) if d is None]

    def batches(self, batch: int) -> int:
        return math.ceil(len(self.missing) / batch)

    def without(self, paths: Collection[Path]) -> Plan:
        """This plan less the jobs whose cache file is in ``paths``: another plan searches
        those (a figure's searches that a table already runs)."""
        keep = [k for k, p in enumerate(self.paths) if p not in paths]
        return Plan(
            self.samples,
            self.strategy,
            [self.jobs[k] for k in keep],
            [self.paths[k] for k in keep],
            [self.done[k] for k in keep],
            self.name,
        )


def plan_strategy(
    models: Models,
    samples: Samples,
    strategy: Strategy,
    jobs: list[Job],
    steps: int,
    restarts: int,
    cache: Path,
    weights: ObjectiveWeights | None = None,
    name: str | None = None,
) -> Plan:
    """Which of ``jobs`` the cache already holds (for these sizes and ``weights``); the
    outputs are filed under ``name`` (default: the strategy's)."""
    config = search_config(models, steps, restarts)
    paths = [
        cache / f"{samples.dataset}-{strategy.name}-"
        f"{job_key(models, samples, j, strategy, config, weights)[:32]}.pt"
        for j in jobs
    ]
    return Plan(samples, strategy, jobs, paths, [_load(p) for p in paths], name or strategy.name)


def run_plan(
    models: Models,
    plan: Plan,
    steps: int,
    restarts: int,
    batch: int,
    on_progress: OnProgress | None = None,
    weights: ObjectiveWeights | None = None,
) -> Outputs:
    """Search the plan's missing jobs, ``batch`` at a time, saving each job's result as its
    batch finishes (an interrupted run loses at most one batch), and gather all of them.
    ``weights``: the objectives' settings (default: ObjectiveWeights' documented defaults)."""
    config = search_config(models, steps, restarts)
    done = list(plan.done)
    missing = plan.missing
    cached = len(plan.jobs) - len(missing)
    n_batches = plan.batches(batch)
    name = f"{plan.samples.dataset} {plan.strategy.name}"
    for b, start in enumerate(range(0, len(missing), batch)):
        chunk = missing[start : start + batch]
        status = f"{name} {b + 1}/{n_batches}"

        def on_step(s: SearchStep, status: str = status) -> None:
            if on_progress is not None:
                on_progress(1, status)

        results = search_batch(
            models,
            plan.samples,
            [plan.jobs[k] for k in chunk],
            plan.strategy,
            config,
            on_step,
            weights,
        )
        for k, payload in zip(chunk, results, strict=True):
            _save(plan.paths[k], payload)
            done[k] = payload
    parts = [d for d in done if d is not None]
    r = models.resolution
    pixels = (
        torch.stack([p["pixels"] for p in parts])
        if parts
        else torch.zeros(0, r, r, 3, dtype=torch.uint8)
    )
    return Outputs(
        jobs=plan.jobs,
        images=pixels.permute(0, 3, 1, 2).float().div(255),
        accepted=np.array([bool(p["accepted"]) for p in parts], dtype=bool),
        mse=np.array([float(p["mse"]) for p in parts], dtype=np.float64),
        reports=[json.loads(p["report"]) for p in parts],
        search_seconds=float(sum(p["seconds"] for p in parts)),
        cached_jobs=cached,
        batches=n_batches,
        files=[p.name for p in plan.paths],
    )


def images_by_file(outputs: Iterable[Outputs]) -> dict[str, Tensor]:
    """Every output by its cache file's name: a job's image, whichever plan searched it."""
    return {f: image for o in outputs for f, image in zip(o.files, o.images, strict=True)}


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
    """Plan and run a strategy in one go, one job per row it applies to (the identity
    objective: the rows with a second photo; the attribute objective: all five attributes
    of each row at once). ``likeness evaluate`` plans its jobs itself."""
    rows = samples.with_reference if strategy.identity else range(len(samples))
    plan = plan_strategy(
        models, samples, strategy, [Job(r) for r in rows], steps, restarts, cache, weights
    )
    return run_plan(models, plan, steps, restarts, batch, on_progress, weights)
