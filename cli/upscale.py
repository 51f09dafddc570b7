"""``likeness upscale``: one thumbnail, or every chosen face of a photo, through the
pipeline, with a JSON sidecar."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.output import EXIT_NOT_ACCEPTED, err, fail, progress_bar
from cli.request_options import request_option
from likeness.errors import LikenessError

if TYPE_CHECKING:
    from likeness.settings import Settings
    from worker.engine.checkpoints import LoadedGenerator
    from worker.engine.search import SearchConfig
    from worker.pipeline import Objective


def upscale(
    thumbnail: Annotated[
        Path,
        typer.Argument(
            help="a face thumbnail or a photo with faces (PNG, JPEG, WebP, BMP, GIF)",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="output PNG (default: <thumbnail>_likeness.png)"),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            help="auto, thumbnail or photo: photo finds the faces anywhere in the image, "
            "aligns, upscales and pastes them back; auto is thumbnail up to "
            "LIKENESS_THUMBNAIL_MAX_SIDE (64) pixels, photo above"
        ),
    ] = "auto",
    faces: Annotated[
        str,
        typer.Option(
            help="photo mode: all, largest, or face indices (largest first, from 0) such as "
            "0,2; all and largest skip faces already over half the generator's side "
            "(LIKENESS_PHOTO_MAX_FACE_FRACTION), which upscaling would not improve, and "
            "refuse a photo with only such faces (exit 2); indices upscale them anyway. "
            "--race, --attr and --reference apply to each chosen face"
        ),
    ] = "all",
    no_align: Annotated[
        bool,
        typer.Option(
            "--no-align",
            help="the input is one face already framed like FFHQ: no face detection "
            "(the same as --mode thumbnail)",
        ),
    ] = False,
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
    keep_race: Annotated[
        bool,
        request_option(
            "keep_race",
            "--keep-race/--no-keep-race",
            help="with no --race: keep the race the thumbnail shows, as the race reader "
            "reads it (a soft target, never a reason to reject a face); --no-keep-race "
            "lets the generator choose, as plain PULSE does (default: keep)",
        ),
    ] = True,
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
    """Upscale a face thumbnail, or the faces of a photo, by latent search; writes
    OUTPUT and OUTPUT.json.

    A photo (larger than a thumbnail, or --mode photo) has its faces detected and
    aligned; each chosen face is upscaled and pasted back into an enlarged copy of the
    photo, written as OUTPUT, with each face as OUTPUT-stem.face<N>.png. With --race,
    --attr or --reference the search also steers toward those targets through the face
    extractor F, and rejects candidates whose final race or attribute loss exceeds 0.1.
    Without --race it keeps the race the thumbnail shows (--no-keep-race: it does not).
    """
    from likeness.images import decode_image, prepare_thumbnail
    from likeness.labels import parse_attribute_pairs
    from likeness.photo import resolve_mode
    from likeness.request import choose_seed, settle, validate_request
    from likeness.settings import get_settings

    if no_align and mode not in ("auto", "thumbnail"):
        fail(f"--no-align is thumbnail mode; it cannot go with --mode {mode}")
    settings = get_settings()

    try:
        request = settle(
            validate_request(
                {
                    "steps": steps,
                    "restarts": restarts,
                    "seed": seed,
                    "race": race,
                    "keep_race": keep_race,
                    "attributes": parse_attribute_pairs(attr or []),
                    "identity_weight": identity_weight,
                    "race_weight": race_weight,
                    "attr_weight": attr_weight,
                    "eps": eps,
                    "views": views,
                    "mode": "thumbnail" if no_align else mode,
                    "faces": faces,
                }
            ),
            settings,
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
            freeze_extractor,
            load_extractor,
            load_race_reader,
            load_search_model,
            objective_weights,
            pick_device,
            reference_embedding,
            resolve_search,
        )
        from worker.pipeline import upscale as run_upscale

        dev = pick_device(device)
        if request.mode != "thumbnail":
            header = decode_image(data, max_pixels=settings.photo_max_pixels)
            width, height = header.original_size
            request.mode = resolve_mode(  # type: ignore[assignment]
                request.mode, width, height, settings.thumbnail_max_side
            )
        model, name = load_search_model(weights, dev)
        res = model.generator.config.resolution
        number_format = fastest_precision(precision, dev)  # type: ignore[arg-type]
        layout = fastest_layout(None, dev, number_format)
        config = resolve_search(
            request,
            model,
            geocross_weight=geocross_weight,
            precision=number_format,
            channels_last=layout,
        )
        make_objective: Callable[[int], Objective | None] = lambda n: None  # noqa: E731
        named = bool(request.race or request.attributes) or reference_bytes is not None
        keeps = request.keep_race and not request.race
        notes: list[str] = []
        reader, ext = None, None
        try:
            reader = load_race_reader(dev) if keeps else None
            if keeps and reader is None:
                notes.append("the thumbnail's race is not kept: the weights list no race reader")
            if named or reader is not None:
                ext, threshold, _ = load_extractor(extractor, dev)
        except LikenessError as e:
            if named:
                raise
            # the kept race is a default, not something asked for: upscale without it
            reader = None
            notes.append(f"the thumbnail's race is not kept: {e.message}")
        if ext is not None:
            freeze_extractor(ext, channels_last=layout)
            embedding = None
            if reference_bytes is not None:
                try:
                    embedding = reference_embedding(ext, decode_image(reference_bytes).pixels)
                except LikenessError as e:
                    fail(f"reference: {e.message}")
            weights_of = objective_weights(request, threshold)

            def make_objective(n: int) -> Objective | None:
                return build_objective(
                    ext,
                    weights_of,
                    [request.race] * n,
                    [request.attributes] * n,
                    [embedding] * n,
                    keep_races=[request.keep_race] * n,
                    race_reader=reader,
                )

        for note in notes:
            err.print(f"note: {note}", highlight=False)
        if request.mode == "photo":
            _upscale_photo(
                data, thumbnail, output, model, name, config, settings, faces, make_objective, notes
            )
            return
        thumb = prepare_thumbnail(data, res)
        objective = make_objective(1)
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
        "notes": [*notes, *thumb.notes],
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


def _upscale_photo(
    data: bytes,
    source: Path,
    output: Path,
    model: LoadedGenerator,
    name: str,
    config: SearchConfig,
    settings: Settings,
    faces: str,
    make_objective: Callable[[int], Objective | None],
    notes: list[str],
) -> None:
    """Photo mode: detect, align, upscale each chosen face, paste back; write the
    composite, each face, and the report."""
    from PIL import Image

    from likeness.face_detect import SharedDetector
    from likeness.images import decode_image
    from likeness.manifest import BUNDLED_MANIFEST_PATH
    from likeness.photo import plan_with_settings
    from worker.pipeline import upscale_photo

    assert config.seed is not None
    try:
        photo = decode_image(data, max_pixels=settings.photo_max_pixels)
        detector = SharedDetector((settings.manifest_path, BUNDLED_MANIFEST_PATH))
        res = model.generator.config.resolution
        plan = plan_with_settings(photo.pixels, detector, res, faces, settings)
    except LikenessError as e:
        fail(e.message)
    for note in photo.notes:
        err.print(f"note: {note}", highlight=False)
    for face in plan.faces:
        x1, y1, x2, y2 = face.box
        state = "chosen" if face.chosen else "not chosen"
        if face.reason:
            state = f"{state}: {face.reason}" if face.usable else face.reason
        err.print(
            f"face {face.index}: {x2 - x1:.0f}x{y2 - y1:.0f} px at ({x1:.0f}, {y1:.0f}), "
            f"thumbnail {face.thumbnail_size}px, {state}",
            highlight=False,
        )
    started = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("faces", total=config.steps, status="")
        shown = [-float("inf")]

        def on_group(size: int, count: int, index: int) -> None:
            bar.reset(task, total=config.steps, status="")
            bar.update(task, description=f"{count} face(s) {size}px → {res}px")

        def on_step(s: Any) -> None:
            bar.update(task, completed=s.step)
            if time.perf_counter() - shown[0] >= 0.5 or s.step == s.steps:
                shown[0] = time.perf_counter()
                bar.update(task, status=f"best MSE {float(s.best_mse.min()):.5f}")

        try:
            result = upscale_photo(
                model,
                photo.pixels,
                plan,
                config,
                seed=config.seed,
                max_side=settings.photo_output_max_side,
                on_step=on_step,
                on_group=on_group,
                objective_for=make_objective,
            )
        except LikenessError as e:
            fail(e.message)
    seconds = time.perf_counter() - started

    output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.composite.pixels).save(output)
    report = result.report()
    for face, upscaled, crop in zip(plan.chosen, result.faces, result.crops, strict=True):
        face_path = output.with_name(f"{output.stem}.face{face.index}.png")
        Image.fromarray(upscaled.pixels).save(face_path)
        crop_path = output.with_name(f"{output.stem}.face{face.index}.thumbnail.png")
        Image.fromarray(crop).save(crop_path)
        entry = next(e for e in report["faces"] if e["index"] == face.index)
        entry["output"], entry["thumbnail"] = str(face_path), str(crop_path)
    report |= {
        "input": str(source),
        "notes": [*notes, *photo.notes],
        "resolution": model.generator.config.resolution,
        "output_path": str(output),
        "weights": {"name": name, "sha256": model.sha256},
        "device": str(next(model.generator.parameters()).device),
        "seconds": round(seconds, 3),
    }
    sidecar = output.with_suffix(".json")
    sidecar.write_text(json.dumps(report, indent=2) + "\n")
    refused = [u.report for u in result.faces if not u.report["accepted"]]
    if refused:
        fail(
            f"{len(refused)} of {len(result.faces)} face(s) not accepted ({refused[0]['reason']}); "
            f"best attempts pasted into {output}",
            EXIT_NOT_ACCEPTED,
        )
    err.print(
        f"wrote {output} ({len(result.faces)} face(s), x{result.composite.factor}), its faces "
        f"and {sidecar.name} ({seconds:.1f} s)",
        highlight=False,
    )
