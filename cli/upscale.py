"""``likeness upscale``: one thumbnail through the pipeline, with a JSON sidecar."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.output import EXIT_NOT_ACCEPTED, err, fail, progress_bar
from likeness.errors import LikenessError


def upscale(
    thumbnail: Annotated[Path, typer.Argument(help="thumbnail image (PNG/JPEG/WebP/BMP/GIF)")],
    output: Annotated[Path | None, typer.Option("-o", "--output",
                      help="output PNG (default: <thumbnail>_likeness.png)")] = None,
    steps: Annotated[int, typer.Option(min=1, max=10_000, help="optimiser steps")] = 100,
    restarts: Annotated[int, typer.Option(min=1, max=64, help="random restarts")] = 4,
    seed: Annotated[int | None, typer.Option(help="seed (default: random, reported)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    weights: Annotated[str | None, typer.Option(help="generator: manifest name or file")] = None,
    eps: Annotated[float, typer.Option(min=0.0, help="max downscale MSE to accept")] = 2e-3,
    geocross_weight: Annotated[float | None, typer.Option(
        min=0.0, help="weight of GEOCROSS, which keeps the W+ rows together (default: the "
        "generator's manifest setting, else PULSE's 0.05)")] = None,
    precision: Annotated[str, typer.Option(
        help="fp32, or bf16 (bfloat16 generator: fast on GPUs, slow on most CPUs)")] = "fp32",
    race: Annotated[str | None, typer.Option(
        help="target race, a name of F's race head (e.g. Black)")] = None,
    attr: Annotated[list[str] | None, typer.Option(
        help="target attribute NAME=0|1, a CelebA name (repeatable: --attr Smiling=1 "
             "--attr Eyeglasses=0)")] = None,
    reference: Annotated[Path | None, typer.Option(
        help="a photo of the same person: the search keeps the identity F sees in it")] = None,
    extractor: Annotated[str | None, typer.Option(
        help="face extractor F with heads: manifest name or file (default: the bundled one)")]
    = None,
    identity_weight: Annotated[float, typer.Option(min=0.0, help="weight of L_s")] = 5.0,
    race_weight: Annotated[float, typer.Option(min=0.0, help="weight of L_r")] = 2.0,
    attr_weight: Annotated[float, typer.Option(min=0.0, help="weight of L_a")] = 2.0,
    views: Annotated[int | None, typer.Option(
        min=1, max=16, help="views F sees of each candidate, averaged: more views steer by "
        "what any observer sees, at F's cost per view (default: the objectives' default)")]
    = None,
) -> None:
    """Upscale a face thumbnail by latent search; writes OUTPUT and OUTPUT.json.

    With --race, --attr or --reference the search also steers toward those
    targets through the face extractor F, and rejects candidates whose final
    race or attribute loss exceeds 0.1.
    """
    from likeness.images import prepare_thumbnail

    wanted_attrs = parse_attr_options(attr or [])
    reference_bytes = None
    if reference is not None:
        try:
            reference_bytes = reference.read_bytes()
        except OSError as e:
            fail(f"cannot read {reference}: {e.strerror}")

    output = output or thumbnail.with_name(thumbnail.stem + "_likeness.png")
    if precision not in ("fp32", "bf16"):
        fail(f"--precision must be fp32 or bf16, got '{precision}'")
    if output.suffix.lower() != ".png":
        fail(f"the output must be a .png file, got '{output.name}'")
    try:
        data = thumbnail.read_bytes()
    except OSError as e:
        fail(f"cannot read {thumbnail}: {e.strerror}")
    try:
        from PIL import Image

        from worker.pipeline import load_search_model, pick_device
        from worker.pipeline import upscale as run_upscale

        dev = pick_device(device)
        model, name = load_search_model(weights, dev)
        res = model.generator.config.resolution
        thumb = prepare_thumbnail(data, res)
        config = model.search_config(steps=steps, restarts=restarts, seed=seed, eps=eps,
                                     geocross_weight=geocross_weight, precision=precision)
        objective = None
        if race is not None or wanted_attrs or reference_bytes is not None:
            objective = build_objective(extractor, dev, race, wanted_attrs, reference_bytes,
                                        identity_weight, race_weight, attr_weight, views)
        for note in thumb.notes:
            err.print(f"note: {note}", highlight=False)
        started = time.perf_counter()
        with progress_bar() as bar:
            task = bar.add_task(f"searching {thumb.size}px → {res}px", total=steps, status="")

            shown = [-float("inf")]  # when the MSE was last read back

            def on_step(s):  # type: ignore[no-untyped-def]
                bar.update(task, completed=s.step)
                # Reading the MSE waits for the GPU: twice a second, not every step.
                if time.perf_counter() - shown[0] >= 0.5 or s.step == s.steps:
                    shown[0] = time.perf_counter()
                    bar.update(task, status=f"best MSE {float(s.best_mse[0]):.5f}")

            [result] = run_upscale(model, [thumb.pixels], config, on_step=on_step,
                                   objective=objective)
        seconds = time.perf_counter() - started
    except LikenessError as e:
        fail(e.message)

    output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.pixels).save(output)
    report = {
        **result.report,
        "input": str(thumbnail),
        "input_notes": thumb.notes,
        "thumbnail_size": thumb.size,
        "resolution": res,
        "output": str(output),
        "weights": {"name": name, "sha256": model.sha256},
        "device": str(dev),
        "seconds": round(seconds, 3),
    }
    sidecar = output.with_suffix(".json")
    sidecar.write_text(json.dumps(report, indent=2) + "\n")
    if not result.report["accepted"]:
        fail(f"{result.report['reason']}; best attempt written to {output}", EXIT_NOT_ACCEPTED)
    err.print(f"wrote {output} and {sidecar.name} (downscale MSE "
              f"{result.report['downscale_mse']:.5f}, {seconds:.1f} s)", highlight=False)


def parse_attr_options(values: list[str]) -> dict[str, int]:
    """``["Smiling=1", "Male=0"]`` → ``{"Smiling": 1, "Male": 0}``; a bad form fails."""
    wanted: dict[str, int] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or value.strip() not in ("0", "1"):
            fail(f"--attr must look like NAME=0 or NAME=1, got '{item}'")
        wanted[name.strip()] = int(value)
    return wanted


def build_objective(spec: str | None, device: Any, race: str | None, attrs: dict[str, int],
                    reference: bytes | None, identity_weight: float, race_weight: float,
                    attr_weight: float, views: int | None = None) -> Any:
    """F, the targets of one thumbnail (names checked against F's heads), and weights."""
    from likeness.images import decode_image
    from worker.engine.objectives import ObjectiveWeights, build_targets
    from worker.pipeline import Objective, load_extractor, reference_embedding

    ext, threshold, _ = load_extractor(spec, device)
    races = ext.race_head.labels if ext.race_head is not None else ()
    names = ext.attribute_head.labels if ext.attribute_head is not None else ()
    by_fold = {n.casefold(): n for n in names}
    if race is not None:
        match = {r.casefold(): r for r in races}.get(race.casefold())
        if match is None:
            fail(f"unknown race '{race}'; F knows: {', '.join(races)}")
        race = match
    canonical: dict[str, int] = {}
    for name, value in attrs.items():
        if name.casefold() not in by_fold:
            fail(f"unknown attribute '{name}'; F knows: {', '.join(names)}")
        canonical[by_fold[name.casefold()]] = value
    embedding = None
    if reference is not None:
        try:
            embedding = reference_embedding(ext, decode_image(reference).pixels)
        except LikenessError as e:
            fail(f"reference: {e.message}")
    weights = ObjectiveWeights(identity=identity_weight, race=race_weight,
                               attributes=attr_weight, threshold_deg=threshold,
                               **({} if views is None else {"views": views}))
    targets = build_targets(ext, [race], [canonical], [embedding], device)
    return Objective(ext, targets, weights)
