"""The whole evaluation: samples → searches (cached) → measures → tables, plots, report."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from likeness.labels import UTKFACE_RACES
from worker.engine.objectives import ObjectiveWeights
from worker.evaluation.config import STEERING_OPTIONS, TABLE3_ATTRIBUTES, THUMBNAIL, EvalConfig
from worker.evaluation.figures import FIGURE_LABELS, figure_plans, write_figures
from worker.evaluation.measures import (
    angles_deg,
    attribute_predictions,
    embed,
    race_predictions,
)
from worker.evaluation.models import Models, load_models
from worker.evaluation.plots import angle_histograms, reidentification_bars
from worker.evaluation.report import PAPER, targets, write_readme, write_results
from worker.evaluation.samples import Samples, celeba_samples, utkface_samples
from worker.evaluation.searches import (
    CELEBA_STRATEGIES,
    UTKFACE_STRATEGIES,
    Outputs,
    Plan,
    plan_strategy,
    run_plan,
    strategy_jobs,
)
from worker.evaluation.tables import Readings, balanced_subsets, table1, table2, table3
from worker.pipeline import pick_device
from worker.training.extractor.measures import same_diff_pairs
from worker.training.generator_quality import bicubic_upscale

Log = Callable[[str], None]

# The control that needs no search: what an image editor's enlargement carries for the
# judges, the bar any upscale of the same thumbnail should clear.
BICUBIC = "bicubic"
BICUBIC_LABEL = "bicubic enlargement of the thumbnail (no search)"


def progress_bar(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("evaluate"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("search steps {task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def landmark_cache(config: EvalConfig) -> Path:
    """MTCNN landmarks of UTKFace members, one file per images.zip (its path and size)."""
    zip_path = (config.data_root / "utkface" / "images.zip").resolve()
    size = zip_path.stat().st_size if zip_path.is_file() else 0
    tag = hashlib.sha256(f"{zip_path}:{size}".encode()).hexdigest()[:12]
    return config.cache / f"landmarks_utkface_{tag}.pt"


def steering_settings(config: EvalConfig) -> ObjectiveWeights:
    """The steered searches' settings: ObjectiveWeights' defaults but for the options given."""
    return ObjectiveWeights(
        **{STEERING_OPTIONS[k]: v for k, v in config.objective_options().items()}
    )


def plan_searches(
    models: Models, config: EvalConfig, celeba: Samples, utk: Samples
) -> tuple[list[Plan], dict[str, list[int]], list[str]]:
    """Every strategy's jobs on its sample set, with what the cache already holds; and
    Table 3's balanced rows per attribute, and the attributes left out (one value only)."""
    subsets, excluded = balanced_subsets(celeba.labels, TABLE3_ATTRIBUTES)
    weights = steering_settings(config)
    sets = [(celeba, s) for s in CELEBA_STRATEGIES] + [(utk, s) for s in UTKFACE_STRATEGIES]
    plans = [
        plan_strategy(
            models,
            samples,
            strategy,
            strategy_jobs(strategy, samples, subsets),
            config.steps,
            config.restarts,
            config.cache,
            weights,
        )
        for samples, strategy in sets
    ]
    return plans, subsets, excluded


def run_searches(
    models: Models, config: EvalConfig, plans: list[Plan], progress: bool
) -> dict[tuple[str, str], Outputs]:
    total = sum(p.batches(config.batch) for p in plans) * config.steps
    outputs = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("evaluate", total=total, status="")

        def on_progress(steps: int, status: str) -> None:
            bar.update(task, advance=steps, status=status)

        for plan in plans:
            outputs[plan.samples.dataset, plan.name] = run_plan(
                models,
                plan,
                config.steps,
                config.restarts,
                config.batch,
                on_progress,
                steering_settings(config),
            )
    return outputs


def table1_angles(
    models: Models, celeba: Samples, outputs: dict[tuple[str, str], Outputs], seed: int
) -> dict[str, dict[str, np.ndarray]]:
    """Per extractor, the angles of Table 1's five pair types (degrees). The pairs that
    need a second photo (Same, Diff, the lookalikes) come from the people who have one."""
    paired = celeba.with_reference
    # Photos interleaved as I_1, I'_1, I_2, I'_2, …: same_diff_pairs then gives exactly
    # the pairs (I, I') as Same and as many random pairs of different people as Diff.
    people = torch.arange(len(paired)).repeat_interleave(2)
    same_pairs, diff_pairs = same_diff_pairs(people, seed=seed)
    result: dict[str, dict[str, np.ndarray]] = {}
    for name, extractor in (("F0", models.f0), ("F", models.f)):
        photos = embed(extractor, celeba.photos)
        refs = embed(extractor, celeba.reference_photos(paired))
        both = torch.stack([photos[paired], refs], 1).flatten(0, 1)

        def to_photo(
            strategy: str, photos: torch.Tensor = photos, extractor: Any = extractor
        ) -> np.ndarray:
            out = outputs["celebahq", strategy]
            return angles_deg(photos[torch.as_tensor(out.rows)], embed(extractor, out.images))

        result[name] = {
            "CelebA-Same": angles_deg(both[same_pairs[:, 0]], both[same_pairs[:, 1]]),
            "CelebA-Diff": angles_deg(both[diff_pairs[:, 0]], both[diff_pairs[:, 1]]),
            "PULSE-Pairs": to_photo("none"),
            "Lookalike-Baseline": to_photo("identity-f0"),
            "Lookalike-Ours": to_photo("identity-f"),
        }
    return result


def race_readings(models: Models, out: Outputs) -> Readings:
    return out.rows, race_predictions(models.race_judge, out.images)


def attribute_readings(
    models: Models, out: Outputs, subsets: dict[str, list[int]]
) -> dict[str, Readings]:
    """Per attribute, the rows of its balanced set this strategy ran on and the judge's
    0/1 for that attribute on their outputs."""
    read = attribute_predictions(models.attribute_judge, out.images, TABLE3_ATTRIBUTES)
    result = {}
    for a, rows in subsets.items():
        picks = out.for_attribute(a, rows)
        result[a] = (out.rows[picks], read[picks, TABLE3_ATTRIBUTES.index(a)])
    return result


def bicubic_race_readings(models: Models, utk: Samples) -> Readings:
    """The race judge on every row's bicubic enlargement (Table 2's control)."""
    images = bicubic_upscale(utk.thumbnails, models.resolution)
    return np.arange(len(utk)), race_predictions(models.race_judge, images)


def bicubic_attribute_readings(
    models: Models, celeba: Samples, subsets: dict[str, list[int]]
) -> dict[str, Readings]:
    """The attribute judge on the bicubic enlargements of each attribute's balanced rows."""
    images = bicubic_upscale(celeba.thumbnails, models.resolution)
    read = attribute_predictions(models.attribute_judge, images, TABLE3_ATTRIBUTES)
    return {
        a: (np.asarray(rows, dtype=int), read[rows, TABLE3_ATTRIBUTES.index(a)])
        for a, rows in subsets.items()
    }


def notes(models: Models, celeba: Samples, utk: Samples) -> list[str]:
    g = models.generator.generator.config
    names = {w.role: w.name for w in models.weights}
    return [
        f"Generator: `{names['generator']}`, {g.resolution} px (the paper: NVIDIA's 1024-px FFHQ "
        f"StyleGAN2); 16×16 thumbnails are upscaled by {g.resolution // THUMBNAIL} (the paper: "
        "by 64).",
        f"F: `{names['F']}` ({models.f.architecture}, from `likeness train-extractor`; the paper: "
        f"IResNet-101 trained with lookalikes). F0: `{names['F0']}`, the pretrained "
        "MobileFaceNet (the paper's F0: ArcFace IResNet-101).",
        f"Scale: {len(celeba)} CelebA-HQ people and {len(utk)} UTKFace images (the paper: 1,000 "
        "FairFace thumbnails for Table 2).",
        "The identity objective's reference is always another photo of the same person, "
        "never the photo the thumbnail was made from. "
        f"{len(celeba) - len(celeba.with_reference)} of the {len(celeba)} CelebA-HQ people "
        "have no second photo and are left out of the identity rows and of Table 1's pairs; "
        "UTKFace has no identities, so the identity rows of Table 2 have no image to run on "
        f"(all {len(utk)} skipped).",
        "Table 2 uses UTKFace's five races (White, Black, Asian, Indian, Others: chance 20%) "
        "and our race judge; the paper used FairFace's seven (chance 14%) and an off-the-shelf "
        "classifier. UTKFace chips are tight crops: each is first warped into the generator's "
        "FFHQ frame with its MTCNN landmarks (the missing margin filled with a blurred, plain "
        "background), then downscaled; "
        f"{utk.skipped} image(s) where MTCNN found no face were passed over.",
        "Table 3: each search with the attribute objective asks for one attribute-value pair "
        "(the photo's true value), as in the paper; each attribute is scored on a balanced "
        "set of people (as many with it as without). Our attribute judge stands in for the "
        "paper's external detector.",
        "Faces are aligned for F, F0 and the judges with the FFHQ frame's fixed landmarks (how "
        "the search aligns its candidates), also the reference photos (the worker detects "
        "them with MTCNN instead).",
        "θ_t: F's own (fitted by train-extractor, stored in its export); F0's is its LFW "
        "threshold through our alignment (`DEFAULT_THRESHOLD_DEG`).",
    ]


def evaluate(config: EvalConfig, *, progress: bool = True, log: Log = print) -> dict[str, Any]:
    """Run (or resume) the evaluation and write README.md, results.json and the PNGs
    into ``config.out``; returns what results.json holds."""
    started = time.perf_counter()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    models = load_models(config, device)
    celeba = celeba_samples(config.data_root / "celebahq", config.celeba, THUMBNAIL, config.seed)
    utk = utkface_samples(
        config.data_root / "utkface", config.utkface, THUMBNAIL, config.seed, landmark_cache(config)
    )
    for samples, wanted in ((celeba, config.celeba), (utk, config.utkface)):
        if len(samples) < wanted:
            log(
                f"note: only {len(samples)} held-out {samples.dataset} samples qualify "
                f"({wanted} requested)"
            )
    plans, subsets, excluded = plan_searches(models, config, celeba, utk)
    # the figures' searches that the tables run too are read from the tables' outputs
    figures = figure_plans(models, config, celeba, utk, steering_settings(config))
    planned = {path for plan in plans for path in plan.paths}
    plans += [plan.without(planned) for plan in figures.values()]
    outputs = run_searches(models, config, plans, progress)
    log("scoring the outputs with F0, F and the judges")

    angles = table1_angles(models, celeba, outputs, config.seed)
    t1 = table1(angles)
    t2 = table2(
        {
            BICUBIC: bicubic_race_readings(models, utk),
            **{
                s.name: race_readings(models, outputs["utkface", s.name])
                for s in UTKFACE_STRATEGIES
            },
        },
        race_predictions(models.race_judge, utk.photos),
        utk.labels,
        UTKFACE_RACES,
    )
    t3 = table3(
        {
            BICUBIC: bicubic_attribute_readings(models, celeba, subsets),
            **{
                s.name: attribute_readings(models, outputs["celebahq", s.name], subsets)
                for s in CELEBA_STRATEGIES
            },
        },
        attribute_predictions(models.attribute_judge, celeba.photos, TABLE3_ATTRIBUTES),
        celeba.labels,
        TABLE3_ATTRIBUTES,
        subsets,
        excluded,
    )

    labels = {s.name: s.label for s in (*CELEBA_STRATEGIES, *UTKFACE_STRATEGIES)}
    labels |= FIGURE_LABELS | {BICUBIC: BICUBIC_LABEL}
    searches = {
        f"{d}/{s}": {
            "n": len(o.jobs),
            "accepted": float(np.mean(o.accepted)) if len(o.jobs) else None,
            "mean_mse": float(np.mean(o.mse)) if len(o.jobs) else None,
            "search_seconds": o.search_seconds,
            "cached_jobs": o.cached_jobs,
            "batches_searched": o.batches,
        }
        for (d, s), o in outputs.items()
    }
    weights = steering_settings(config).model_dump()
    weights.pop("threshold_deg")  # each extractor brings its own
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": config.command(),
        "config": {**config.model_dump(mode="json"), "thumbnail": THUMBNAIL},
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "resolution": models.resolution,
        "weights": [dataclasses.asdict(w) for w in models.weights],
        "objective_weights": weights,
        "thresholds_deg": {"F": models.f_threshold, "F0": models.f0_threshold},
        "samples": {
            "celebahq": {
                "n": len(celeba),
                "names": celeba.names,
                "reference_names": celeba.reference_names,
                "requested": config.celeba,
                "with_second_photo": len(celeba.with_reference),
                "skipped_for_identity": len(celeba) - len(celeba.with_reference),
            },
            "utkface": {
                "n": len(utk),
                "names": utk.names,
                "requested": config.utkface,
                "skipped_no_face": utk.skipped,
                "with_second_photo": len(utk.with_reference),
                "skipped_for_identity": len(utk) - len(utk.with_reference),
                "per_race": t2["n_per_race"],
            },
        },
        "strategy_labels": labels,
        "table1": t1,
        "angles": {
            ext: {pair: a.round(3).tolist() for pair, a in by_pair.items()}
            for ext, by_pair in angles.items()
        },
        "table2": t2,
        "table3": t3,
        "table3_rows": subsets,
        "targets": targets(t1, t2, t3),
        "searches": searches,
        "search_seconds": sum(o.search_seconds for o in outputs.values()),
        "paper": PAPER,
        "notes": notes(models, celeba, utk),
    }
    config.out.mkdir(parents=True, exist_ok=True)
    angle_histograms(
        angles,
        {ext: t1["thresholds"][ext]["opt1"]["threshold_deg"] for ext in angles},
        config.out / "angles.png",
    )
    reidentification_bars(t2, t3, labels, PAPER, config.out / "reidentification.png")
    results["figures"] = write_figures(models, celeba, utk, outputs, figures, config.out)
    results["seconds"] = time.perf_counter() - started
    write_results(results, config.out / "results.json")
    write_readme(results, config.out / "README.md")
    return results
