"""``likeness upscale``: one thumbnail through the pipeline, with a JSON sidecar."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from cli.output import EXIT_NOT_ACCEPTED, err, fail, progress_bar
from cli.request_options import request_option
from likeness.errors import LikenessError


def upscale(
    thumbnail: Annotated[
        Path, typer.Argument(help="thumbnail image (PNG, JPEG, WebP, BMP, GIF)", show_default=False)
    ],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="output PNG (default: <thumbnail>_likeness.png)"),
    ] = None,
    steps: Annotated[
        int | None,
        request_option("steps", help="optimiser steps (default: LIKENESS_STEPS_DEFAULT, 100)"),
    ] = None,
    restarts: Annotated[
        int | None,
        request_option("restarts", help="random restarts (default: LIKENESS_RESTARTS_DEFAULT, 4)"),
    ] = None,
    seed: Annotated[int | None, request_option("seed")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    weights: Annotated[
        str | None,
        typer.Option(help="generator: a manifest name or a file (default: the manifest's default)"),
    ] = None,
    eps: Annotated[float | None, request_option("eps")] = None,
    geocross_weight: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="weight of GEOCROSS, which keeps the W+ rows together (default: the "
            "generator's manifest setting, else PULSE's 0.05)",
        ),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="auto, fp32 or bf16: the generator's number format; auto takes bf16 where the "
            "device has bf16 units (most GPUs, CPUs with AVX512-BF16 or AMX: about twice as "
            "fast), fp32 elsewhere"
        ),
    ] = "auto",
    race: Annotated[
        str | None, typer.Option(help="target race, a name of F's race head (e.g. Black)")
    ] = None,
    attr: Annotated[
        list[str] | None,
        typer.Option(
            help="target attribute Name=0|1, a CelebA name; repeat for several: --attr "
            "Smiling=1 --attr Eyeglasses=0",
            show_default=False,
        ),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(help="a photo of the same person: the search keeps the identity F sees in it"),
    ] = None,
    extractor: Annotated[
        str | None,
        typer.Option(
            help="face extractor F with heads: a manifest name or a file (default: the "
            "manifest's default)"
        ),
    ] = None,
    identity_weight: Annotated[float | None, request_option("identity_weight")] = None,
    race_weight: Annotated[float | None, request_option("race_weight")] = None,
    attr_weight: Annotated[float | None, request_option("attr_weight")] = None,
    views: Annotated[int | None, request_option("views")] = None,
) -> None:
    """Upscale a face thumbnail by latent search; writes OUTPUT and OUTPUT.json.

    With --race, --attr or --reference the search also steers toward those
    targets through the face extractor F, and rejects candidates whose final
    race or attribute loss exceeds 0.1.
    """
    from likeness.images import decode_image, prepare_thumbnail
    from likeness.labels import parse_attribute_pairs
    from likeness.request import choose_seed, settle, validate_request
    from likeness.settings import get_settings

    try:
        request = settle(
            validate_request(
                {
                    "steps": steps,
                    "restarts": restarts,
                    "seed": seed,
                    "race": race,
                    "attributes": parse_attribute_pairs(attr or []),
                    "identity_weight": identity_weight,
                    "race_weight": race_weight,
                    "attr_weight": attr_weight,
                    "eps": eps,
                    "views": views,
                }
            ),
            get_settings(),
            capped=False,
        )
    except LikenessError as e:
        fail(e.message)
    if request.seed is None:
        request.seed = choose_seed()
    reference_bytes = None
    if reference is not None:
        try:
            reference_bytes = reference.read_bytes()
        except OSError as e:
            fail(f"cannot read {reference}: {e.strerror}")

    output = output or thumbnail.with_name(thumbnail.stem + "_likeness.png")
    if precision not in ("auto", "fp32", "bf16"):
        fail(f"--precision must be auto, fp32 or bf16, got '{precision}'")
    if output.suffix.lower() != ".png":
        fail(f"the output must be a .png file, got '{output.name}'")
    try:
        data = thumbnail.read_bytes()
    except OSError as e:
        fail(f"cannot read {thumbnail}: {e.strerror}")
    try:
        from PIL import Image

        from worker.engine.speed import fastest_layout, fastest_precision
        from worker.pipeline import (
            build_objective,
            load_extractor,
            load_search_model,
            objective_weights,
            pick_device,
            reference_embedding,
            resolve_search,
        )
        from worker.pipeline import upscale as run_upscale

        dev = pick_device(device)
        model, name = load_search_model(weights, dev)
        res = model.generator.config.resolution
        thumb = prepare_thumbnail(data, res)
        number_format = fastest_precision(precision, dev)  # type: ignore[arg-type]
        layout = fastest_layout(None, dev, number_format)
        config = resolve_search(
            request,
            model,
            geocross_weight=geocross_weight,
            precision=number_format,
            channels_last=layout,
        )
        objective = None
        if request.has_targets or reference_bytes is not None:
            ext, threshold, _ = load_extractor(extractor, dev, channels_last=layout)
            embedding = None
            if reference_bytes is not None:
                try:
                    embedding = reference_embedding(ext, decode_image(reference_bytes).pixels)
                except LikenessError as e:
                    fail(f"reference: {e.message}")
            objective = build_objective(
                ext,
                objective_weights(request, threshold),
                [request.race],
                [request.attributes],
                [embedding],
            )
        for note in thumb.notes:
            err.print(f"note: {note}", highlight=False)
        started = time.perf_counter()
        with progress_bar() as bar:
            task = bar.add_task(
                f"searching {thumb.size}px → {res}px", total=config.steps, status=""
            )

            shown = [-float("inf")]  # when the MSE was last read back

            def on_step(s):  # type: ignore[no-untyped-def]
                bar.update(task, completed=s.step)
                # Reading the MSE waits for the GPU: twice a second, not every step.
                if time.perf_counter() - shown[0] >= 0.5 or s.step == s.steps:
                    shown[0] = time.perf_counter()
                    bar.update(task, status=f"best MSE {float(s.best_mse[0]):.5f}")

            [result] = run_upscale(
                model, [thumb.pixels], config, on_step=on_step, objective=objective
            )
        seconds = time.perf_counter() - started
    except LikenessError as e:
        fail(e.message)

    output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.pixels).save(output)
    report = {
        **result.report,
        "input": str(thumbnail),
        "notes": thumb.notes,
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
    err.print(
        f"wrote {output} and {sidecar.name} (downscale MSE "
        f"{result.report['downscale_mse']:.5f}, {seconds:.1f} s)",
        highlight=False,
    )
