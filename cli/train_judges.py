"""``likeness train-judges``: the race and attribute judges the evaluation scores with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.output import err, fail, typed_command

TRAINING_FLAGS = {
    "epochs": "--epochs",
    "max_minutes": "--max-minutes",
    "stem_stride": "--stem-stride",
    "balanced": "--balanced/--no-balanced",
}


def train_judges(
    data_root: Annotated[Path, typer.Option(help="folder holding celebahq/ and utkface/")] = Path(
        "../shared/data"
    ),
    task: Annotated[
        list[str] | None, typer.Option(help="race and/or attributes (default: both)")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="passes over the training split (default 8)")
    ] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="stop a judge's training after this long (per judge)")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(min=10, help="cap training images per judge (a fixed hash-ordered choice)"),
    ] = None,
    cache: Annotated[Path, typer.Option(help="landmark cache folder")] = Path("runs/judges"),
    into: Annotated[
        Path | None,
        typer.Option(
            help="folder of the manifest to register the judges in (default: LIKENESS_WEIGHTS_DIR)"
        ),
    ] = None,
    balanced: Annotated[
        bool | None,
        typer.Option(
            "--balanced/--no-balanced",
            help="race: weigh each race by its inverse frequency, so the rarest is still "
            "predicted (default: balanced)",
        ),
    ] = None,
    stem_stride: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=2,
            help="2: halve the 64-px crop before the first block (fast, the default); "
            "1: keep it (~5× slower)",
        ),
    ] = None,
    calibrate_only: Annotated[
        bool,
        typer.Option(
            help="attributes: keep the registered judge's weights and only give it the "
            "training split's priors, which its decisions on balanced sets subtract",
        ),
    ] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch")] = None,
) -> None:
    """Train the race and attribute judges: small ResNets from scratch on
    held-in people, scored on held-out ones; the search never sees them."""
    import torch

    from likeness.manifest import WeightsEntry, manifest_in, register, sha256_file
    from worker.training.judges import JudgeData, prepare, save_judge, train_judge

    # None means "not given": train_judge's own defaults then apply, and --calibrate-only can
    # tell an explicit option (even one equal to the default) from an absent one.
    given = {
        "epochs": epochs,
        "max_minutes": max_minutes,
        "stem_stride": stem_stride,
        "balanced": balanced,
    }
    training = {name: value for name, value in given.items() if value is not None}
    if calibrate_only:
        if task not in (None, ["attributes"]):
            fail("--calibrate-only applies to the attribute judge (--task attributes)")
        if training:
            fail(
                "--calibrate-only trains nothing: drop "
                + ", ".join(TRAINING_FLAGS[name] for name in training)
            )
        calibrate_attribute_judge(data_root, manifest_in(into), cache, limit, threads)
        return

    if threads is not None:
        torch.set_num_threads(threads)
    tasks = task or ["race", "attributes"]
    for t in tasks:
        if t not in ("race", "attributes"):
            fail(f"--task must be race or attributes, got '{t}'")
    manifest_path = manifest_in(into)
    for t in tasks:
        root = data_root / ("utkface" if t == "race" else "celebahq")
        if not (root / "images.zip").is_file():
            fail(f"no {root / 'images.zip'}")
        err.print(f"{t} judge: aligning crops from {root}", highlight=False)
        train_x, train_y = prepare(root, t, "train", limit, cache)  # type: ignore[arg-type]
        test_x, test_y = prepare(root, t, "test", None, cache)  # type: ignore[arg-type]
        net, metrics = train_judge(
            t,
            JudgeData(train_x, train_y, test_x, test_y),  # type: ignore[arg-type]
            log=lambda line: err.print(line, highlight=False),
            **training,
        )
        path = manifest_path.parent / f"judge_{t}.pt"
        save_judge(net, t, path, metrics)  # type: ignore[arg-type]
        register(
            WeightsEntry(
                name=f"judge-{t}",
                kind="judge",
                file=path.name,
                sha256=sha256_file(path),
                config={
                    "task": t,
                    "architecture": "ResNet-10, 64-px ArcFace-aligned crops",
                    "labels": list(net.labels),
                    "widths": list(net.widths),
                    "stem_stride": net.stem_stride,
                },
                provenance={
                    "data": f"{root.name} train split (likeness/splits.py, "
                    f"salt likeness-v1), {metrics['train_images']} images",
                    "init": "random (no pretrained weights: independent of F)",
                    "command": typed_command(),
                    "device": "cpu",
                },
                metrics=metrics,
            ),
            manifest_path,
        )
        headline = (
            f"top-1 {metrics['top1']:.3f}, mean per race {metrics['mean_per_class']:.3f}"
            if t == "race"
            else f"mAP {metrics['attribute_map']:.3f}, mean balanced accuracy "
            f"{mean_balanced(metrics):.3f}"
        )
        err.print(
            f"{t} judge: held-out {headline} ({metrics['test_images']} images); wrote {path}",
            highlight=False,
        )


def calibrate_attribute_judge(
    data_root: Path, manifest_path: Path, cache: Path, limit: int | None, threads: int | None
) -> None:
    """Priors for the registered attribute judge: its file and manifest entry rewritten,
    weights, data and training provenance kept. ``limit``: the one it was trained with."""
    import torch

    from likeness.manifest import entry_path, load_manifest, register, sha256_file
    from worker.training.judges import calibrate_judge, prepare, split_labels

    if threads is not None:
        torch.set_num_threads(threads)
    entry = next(
        (e for e in load_manifest(manifest_path).models if e.name == "judge-attributes"), None
    )
    if entry is None:
        fail(f"no judge-attributes in {manifest_path}: train it first (--task attributes)")
    path = entry_path(entry, manifest_path)
    if not path.is_file():
        fail(f"no {path}, which {manifest_path} lists as judge-attributes")
    if sha256_file(path) != entry.sha256:
        fail(f"{path} does not match its manifest sha256")
    root = data_root / "celebahq"
    for needed in (root / "labels.csv", root / "images.zip"):
        if not needed.is_file():
            fail(f"no {needed}")
    _, train_y = split_labels(root, "attributes", "train", limit)
    err.print(f"attribute judge: aligning the held-out crops from {root}", highlight=False)
    test_x, test_y = prepare(root, "attributes", "test", None, cache)
    metrics = calibrate_judge(path, train_y, test_x, test_y)
    provenance = entry.provenance | {
        "decision": f"prior log odds of {len(train_y)} train-split labels, subtracted on "
        f"balanced sets (set by: {typed_command()})"
    }
    register(
        entry.model_copy(
            update={"sha256": sha256_file(path), "metrics": metrics, "provenance": provenance}
        ),
        manifest_path,
    )
    err.print(
        f"attribute judge: held-out mean balanced accuracy {mean_balanced(metrics):.3f} "
        f"({metrics['test_images']} images); wrote {path}",
        highlight=False,
    )


def mean_balanced(metrics: dict[str, Any]) -> float:
    balanced = metrics["balanced_accuracy"]
    return float(sum(balanced.values()) / len(balanced))
