"""The ``likeness`` command line. Heavy modules (torch) load inside commands,
so ``likeness --help`` and the torch-free commands start fast."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from likeness.errors import LikenessError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Identity- and attribute-preserving face thumbnail upscaling.")
weights_app = typer.Typer(no_args_is_help=True, help="Inspect and prepare generator weights.")
app.add_typer(weights_app, name="weights")
err = Console(stderr=True, soft_wrap=True)

EXIT_ERROR = 2
EXIT_NOT_ACCEPTED = 3


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                    console=err, transient=False)


@app.command()
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


@weights_app.command("inspect")
def weights_inspect(
    file: Annotated[Path, typer.Argument(help="generator checkpoint (.pt)")],
) -> None:
    """Print the generator config a checkpoint holds or implies (JSON)."""
    from worker.engine.checkpoints import fit_sidecar, infer_config, read_checkpoint
    from worker.engine.generator import GeneratorConfig

    try:
        ckpt = read_checkpoint(file)
        state = ckpt["g_ema"]
        config = GeneratorConfig(**ckpt["config"]) if "config" in ckpt else infer_config(state)
    except LikenessError as e:
        fail(e.message)
    info = {
        "file": str(file),
        "config": config.model_dump(),
        "config_source": "stored" if "config" in ckpt else "inferred from tensor shapes",
        "n_latent": config.n_latent,
        "parameters": int(sum(v.numel() for k, v in state.items() if "noises." not in k
                              and not k.endswith(".kernel"))),
        "dtype": str(next(iter(state.values())).dtype).replace("torch.", ""),
        "has_latent_avg": "latent_avg" in ckpt,
        "mapping_fit": ("embedded" if "mapping_fit" in ckpt
                        else "sidecar" if fit_sidecar(file).is_file() else "missing"),
    }
    typer.echo(json.dumps(info, indent=2))


@weights_app.command("fit-mapping")
def weights_fit_mapping(
    file: Annotated[Path, typer.Argument(help="generator checkpoint (.pt)")],
    samples: Annotated[int, typer.Option(min=1000, help="z samples")] = 100_000,
    batch: Annotated[int, typer.Option(min=1, help="samples per batch")] = 10_000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
    seed: Annotated[int, typer.Option(help="seed of the z samples")] = 0,
    embed: Annotated[bool, typer.Option(help="write into the checkpoint instead of a sidecar")]
    = False,
) -> None:
    """Fit PULSE's Gaussian to the mapping output once, and store it with the weights."""
    import torch

    from worker.engine.checkpoints import fit_sidecar, load_generator, read_checkpoint
    from worker.engine.mapping_fit import fit_mapping
    from worker.pipeline import pick_device

    try:
        loaded = load_generator(file, pick_device(device))
    except LikenessError as e:
        fail(e.message)
    with progress_bar() as bar:
        task = bar.add_task("fitting the mapping", total=samples, status="")
        fit = fit_mapping(loaded.generator, samples, batch, seed,
                          progress=lambda n: bar.advance(task, n))
    if embed:
        ckpt = read_checkpoint(file)
        ckpt["mapping_fit"] = fit.to_dict()
        tmp = file.with_suffix(file.suffix + ".tmp")
        torch.save(ckpt, tmp)
        tmp.replace(file)
        target = file
    else:
        target = fit_sidecar(file)
        torch.save(fit.to_dict(), target)
    err.print(f"wrote the mapping fit ({samples} samples) to {target}", highlight=False)


@weights_app.command("list")
def weights_list() -> None:
    """List the weights in the manifest."""
    from likeness.manifest import MANIFEST_PATH, load_manifest

    manifest = load_manifest()
    if not manifest.models:
        typer.echo(f"no weights in {MANIFEST_PATH}")
    for e in manifest.models:
        flag = " (default)" if e.default else ""
        typer.echo(f"{e.kind:10s} {e.name}{flag}  {e.file}  sha256 {e.sha256[:12]}…")


@weights_app.command("import")
def weights_import(
    file: Annotated[Path, typer.Argument(help="the checkpoint: a port .pt, an NVIDIA .pkl "
                                         "or an arcface_torch .pth")],
    kind: Annotated[str | None, typer.Option(
        help="generator or extractor (default: what the file holds)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="auto, port, nvidia-pkl or arcface")]
    = "auto",
    name: Annotated[str | None, typer.Option(help="manifest name (default: the file's stem)")]
    = None,
    into: Annotated[Path | None, typer.Option(
        help="folder for the converted file (default: $LIKENESS_DATA_DIR/weights)")] = None,
    manifest: Annotated[Path | None, typer.Option(
        help="manifest to record it in (default: the bundled weights/manifest.json)")] = None,
    default: Annotated[bool, typer.Option("--default", help="make it the default of its kind")]
    = False,
    fit: Annotated[bool, typer.Option("--fit-mapping/--no-fit-mapping",
                                      help="generators: fit the mapping now, once")] = True,
    fit_samples: Annotated[int, typer.Option(min=1000, help="z samples of the fit")] = 100_000,
    device: Annotated[str, typer.Option(help="device of the fit: auto, cpu, cuda")] = "auto",
    licence: Annotated[str | None, typer.Option(
        help="licence to record (default: what the format's official files carry)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an entry or file of that name")]
    = False,
) -> None:
    """Convert an official checkpoint to our format and record it in the manifest (JSON out)."""
    from likeness.manifest import MANIFEST_PATH
    from worker.pipeline import pick_device
    from worker.weights_import import import_weights

    try:
        with progress_bar() as bar:
            task = bar.add_task("fitting the mapping", total=fit_samples, status="",
                                visible=False)

            def advance(n: int) -> None:
                bar.update(task, advance=n, visible=True)

            result = import_weights(
                file, kind=kind, fmt=fmt, name=name, into=into,
                manifest_path=manifest or MANIFEST_PATH, default=default, fit=fit,
                fit_samples=fit_samples, device=pick_device(device), licence=licence,
                force=force, progress=advance,
            )
    except LikenessError as e:
        fail(e.message)
    typer.echo(json.dumps(result.entry.model_dump(), indent=2))
    err.print(f"imported {file.name} as {result.entry.kind} '{result.entry.name}' → "
              f"{result.path} (recorded in {result.manifest_path})", highlight=False)


@weights_app.command("ship-generator")
def weights_ship_generator(
    run: Annotated[Path, typer.Argument(help="a train-generator run folder (checkpoint.pt, "
                                        "g_ema.pt)")],
    quality: Annotated[Path | None, typer.Option(
        help="bench/generator_quality.py's JSON for the shipped file: its metrics go into the "
             "manifest")] = None,
    name: Annotated[str, typer.Option(help="manifest name; the file is <name>.pt")] = "generator",
    into: Annotated[Path | None, typer.Option(
        help="folder of the manifest to register in (default: the bundled weights/)")] = None,
    half: Annotated[bool, typer.Option("--fp16/--fp32", help="store float16 weights")] = True,
) -> None:
    """Bundle a trained generator: G_ema (fp16) with a fresh mapping fit, as the default
    generator, with its config, sha256, provenance and (with --quality) its metrics."""
    from likeness.manifest import MANIFEST_PATH
    from worker.training.generator_ship import read_quality, ship_generator

    manifest_path = into / "manifest.json" if into is not None else MANIFEST_PATH
    try:
        entry = ship_generator(run, quality=read_quality(quality), name=name,
                               manifest_path=manifest_path, half=half)
    except LikenessError as e:
        fail(e.message)
    typer.echo(json.dumps(entry.model_dump(), indent=2))
    err.print(f"shipped {run} as generator '{entry.name}' → {manifest_path.parent / entry.file}",
              highlight=False)


@weights_app.command("add-quality")
def weights_add_quality(
    quality: Annotated[Path, typer.Argument(help="bench/generator_quality.py's JSON for the "
                                            "shipped file")],
    name: Annotated[str, typer.Option(help="manifest name of the generator")] = "generator",
    into: Annotated[Path | None, typer.Option(
        help="folder of the manifest (default: the bundled weights/)")] = None,
) -> None:
    """Record a shipped generator's measured quality in its manifest entry, beside the
    measures the report does not repeat; the report must name that file's sha256."""
    from likeness.manifest import MANIFEST_PATH
    from worker.training.generator_ship import add_quality, read_quality

    manifest_path = into / "manifest.json" if into is not None else MANIFEST_PATH
    try:
        entry = add_quality(name, read_quality(quality) or {}, manifest_path=manifest_path)
    except LikenessError as e:
        fail(e.message)
    typer.echo(json.dumps(entry.metrics, indent=2))


@weights_app.command("set-search")
def weights_set_search(
    name: Annotated[str, typer.Argument(help="manifest name of the generator")],
    settings: Annotated[list[str] | None, typer.Argument(
        help="FIELD=VALUE search settings, e.g. geocross_weight=0.02")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="drop the settings it had first")]
    = False,
    into: Annotated[Path | None, typer.Option(
        help="folder of the manifest (default: the bundled weights/)")] = None,
) -> None:
    """Record search settings measured to suit a generator: every search in it (upscale,
    the worker, evaluate, the benches) starts from them; explicit options still win."""
    from likeness.manifest import MANIFEST_PATH
    from worker.training.generator_ship import search_pairs, set_search

    manifest_path = into / "manifest.json" if into is not None else MANIFEST_PATH
    try:
        entry = set_search(name, search_pairs(settings or []), clear=clear,
                           manifest_path=manifest_path)
    except LikenessError as e:
        fail(e.message)
    typer.echo(json.dumps(entry.search, indent=2))


@weights_app.command("export-detector")
def weights_export_detector(
    into: Annotated[Path | None, typer.Option(help="folder of the manifest to register in "
                                              "(default: the bundled weights/)")] = None,
) -> None:
    """Export MTCNN's three networks to ONNX, so the API can check reference photos
    for a face without torch, and register them in the manifest."""
    from importlib.metadata import version

    from likeness.manifest import MANIFEST_PATH, WeightsEntry, register, sha256_file
    from worker.engine.face.detector_export import OPSET, export_mtcnn

    manifest_path = into / "manifest.json" if into is not None else MANIFEST_PATH
    paths = export_mtcnn(manifest_path.parent)
    for stage, path in paths.items():
        register(
            WeightsEntry(
                name=f"mtcnn-{stage}",
                kind="detector",
                file=path.name,
                sha256=sha256_file(path),
                config={"network": stage, "format": "onnx", "opset": OPSET},
                provenance={
                    "source": f"facenet-pytorch {version('facenet-pytorch')} bundled "
                    f"{stage}.pt (MTCNN, Zhang et al. 2016)",
                    "exported_by": "likeness weights export-detector",
                },
            ),
            manifest_path,
        )
        err.print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)", highlight=False)


@app.command("train-judges")
def train_judges(
    data_root: Annotated[Path, typer.Option(help="folder holding celebahq/ and utkface/")]
    = Path("../shared/data"),
    task: Annotated[list[str] | None, typer.Option(
        help="race and/or attributes (default both)")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="passes over the training split")] = 8,
    max_minutes: Annotated[float | None, typer.Option(
        help="stop a judge's training after this long (per judge)")] = None,
    limit: Annotated[int | None, typer.Option(
        min=10, help="cap training images per judge (a fixed hash-ordered choice)")] = None,
    cache: Annotated[Path, typer.Option(help="landmark cache folder")] = Path("runs/judges"),
    into: Annotated[Path | None, typer.Option(
        help="folder of the manifest to register the judges in (default: weights/)")] = None,
    balanced: Annotated[bool, typer.Option(
        "--balanced/--no-balanced", help="race: weigh each race by its inverse frequency, so "
        "the rarest is still predicted")] = True,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch")] = None,
) -> None:
    """Train the race and attribute judges (issue 5): small ResNets from scratch on
    held-in people, scored on held-out ones; the search never sees them."""
    import torch

    from likeness.manifest import MANIFEST_PATH, WeightsEntry, register, sha256_file
    from worker.training.judges import JudgeData, prepare, save_judge, train_judge

    if threads is not None:
        torch.set_num_threads(threads)
    tasks = task or ["race", "attributes"]
    for t in tasks:
        if t not in ("race", "attributes"):
            fail(f"--task must be race or attributes, got '{t}'")
    manifest_path = into / "manifest.json" if into is not None else MANIFEST_PATH
    for t in tasks:
        root = data_root / ("utkface" if t == "race" else "celebahq")
        if not (root / "images.zip").is_file():
            fail(f"no {root / 'images.zip'}")
        err.print(f"{t} judge: aligning crops from {root}", highlight=False)
        train_x, train_y = prepare(root, t, "train", limit, cache)  # type: ignore[arg-type]
        test_x, test_y = prepare(root, t, "test", None, cache)  # type: ignore[arg-type]
        net, metrics = train_judge(t, JudgeData(train_x, train_y, test_x, test_y),  # type: ignore[arg-type]
                                   epochs=epochs, max_minutes=max_minutes, balanced=balanced,
                                   log=lambda line: err.print(line, highlight=False))
        path = manifest_path.parent / f"judge_{t}.pt"
        save_judge(net, t, path, metrics)  # type: ignore[arg-type]
        register(WeightsEntry(
            name=f"judge-{t}", kind="judge", file=path.name, sha256=sha256_file(path),
            config={"task": t, "architecture": "ResNet-10, 64-px ArcFace-aligned crops",
                    "labels": list(net.labels), "widths": list(net.widths),
                    "stem_stride": net.stem_stride},
            provenance={"data": f"{root.name} train split (likeness/splits.py, "
                                f"salt likeness-v1), {metrics['train_images']} images",
                        "init": "random (no pretrained weights: independent of F)",
                        "command": "likeness train-judges", "device": "cpu"},
            metrics=metrics), manifest_path)
        headline = (f"top-1 {metrics['top1']:.3f}, mean per race "
                    f"{metrics['mean_per_class']:.3f}" if t == "race"
                    else f"mAP {metrics['attribute_map']:.3f}")
        err.print(f"{t} judge: held-out {headline} ({metrics['test_images']} images); "
                  f"wrote {path}", highlight=False)


@app.command("evaluate")
def evaluate_command(
    celeba: Annotated[int | None, typer.Option(
        min=2, help="held-out CelebA-HQ people, Tables 1 and 3 (default: 25; --quick 4)")] = None,
    utkface: Annotated[int | None, typer.Option(
        min=1, help="held-out UTKFace images, Table 2 (default: 25; --quick 5)")] = None,
    steps: Annotated[int | None, typer.Option(
        min=1, max=10_000, help="optimiser steps per search (default: 100; --quick 5)")] = None,
    restarts: Annotated[int | None, typer.Option(
        min=1, max=64, help="random restarts per thumbnail (default: 4; --quick 2)")] = None,
    batch: Annotated[int | None, typer.Option(
        min=1, help="thumbnails per batched search (default: 8)")] = None,
    seed: Annotated[int | None, typer.Option(
        help="base of the per-thumbnail seeds, shared by every strategy (default: 0)")] = None,
    weights: Annotated[str | None, typer.Option(
        help="generator: manifest name or file (default: the manifest's default)")] = None,
    extractor: Annotated[str | None, typer.Option(
        help="F with heads: manifest name or file (default: the manifest's default)")] = None,
    f0: Annotated[Path | None, typer.Option(
        help="F0, a MobileFaceNet checkpoint "
             "(default: ../shared/weights/mobilefacenet_casia_068.ckpt)")] = None,
    race_judge: Annotated[str | None, typer.Option(
        help="race judge: manifest name or file (default: judge-race)")] = None,
    attribute_judge: Annotated[str | None, typer.Option(
        help="attribute judge: manifest name or file (default: judge-attributes)")] = None,
    data_root: Annotated[Path | None, typer.Option(
        help="folder holding celebahq/ and utkface/ (default: ../shared/data)")] = None,
    out: Annotated[Path | None, typer.Option(
        help="where README.md, results.json and the PNGs go (default: docs/results)")] = None,
    cache: Annotated[Path | None, typer.Option(
        help="search results per batch, reused by later runs (default: runs/evaluate/cache)")]
    = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="tiny sizes for CI and smoke checks (options given still win)")] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N (default: auto)")]
    = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch")] = None,
    identity_weight: Annotated[float | None, typer.Option(
        min=0, help="weight of the identity objective in the steered searches "
        "(default: the objectives' default)")] = None,
    race_weight: Annotated[float | None, typer.Option(
        min=0, help="weight of the race objective (default: the objectives' default)")]
    = None,
    attr_weight: Annotated[float | None, typer.Option(
        min=0, help="weight of the attribute objective (default: the objectives' default)")]
    = None,
    views: Annotated[int | None, typer.Option(
        min=1, max=16, help="views F sees of each candidate in the steered searches "
        "(default: the objectives' default)")] = None,
) -> None:
    """Reproduce the paper's Tables 1-3 on held-out people: README.md, results.json and
    PNG plots in --out. Searches are cached per batch: an interrupted run resumes."""
    from worker.evaluation.config import EvalConfig
    from worker.evaluation.run import evaluate

    config = EvalConfig.with_quick(
        quick, celeba=celeba, utkface=utkface, steps=steps, restarts=restarts, batch=batch,
        seed=seed, weights=weights, extractor=extractor, f0=f0, race_judge=race_judge,
        attribute_judge=attribute_judge, data_root=data_root, out=out, cache=cache,
        device=device, threads=threads, identity_weight=identity_weight,
        race_weight=race_weight, attr_weight=attr_weight, views=views)
    try:
        results = evaluate(config, log=lambda line: err.print(line, highlight=False))
    except LikenessError as e:
        fail(e.message)
    t2, t3 = results["table2"]["rows"], results["table3"]["rows"]
    err.print(f"race re-identification: none {t2['none']['overall']:.1%}, identity+race "
              f"{t2['identity+race']['overall']:.1%}; attributes: none "
              f"{t3['none']['average']:.1%}, attribute objective "
              f"{t3['attributes']['average']:.1%}", highlight=False)
    err.print(f"wrote {config.out / 'README.md'}, results.json, angles.png, "
              "reidentification.png and grid.png", highlight=False)


@app.command("worker")
def worker_command(
    once: Annotated[bool, typer.Option("--once", help="run at most one batch, then exit")]
    = False,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="most jobs per batched search (default: LIKENESS_BATCH_SIZE, 8)")] = None,
    parent_pid: Annotated[int | None, typer.Option(hidden=True,
                          help="stop when this process is gone (used by serve)")] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="run nothing: exit 0 if a worker on this host heartbeated within "
        "LIKENESS_WORKER_HEARTBEAT_TIMEOUT_SECONDS, else 1 (a container healthcheck)")] = False,
) -> None:
    """Run queued jobs: claim compatible ones, search them as one batch, store results.

    Settings come from LIKENESS_* variables (store, generator, device, ...).
    SIGTERM or Ctrl-C: finish the current batch, then exit 0; twice: abandon it.
    """
    if check:
        from likeness.settings import get_settings
        from likeness.worker_health import run_check

        health = run_check(get_settings())
        typer.echo(health.message)
        raise typer.Exit(0 if health.healthy else 1)

    from worker.process import main as run_worker

    try:
        code = run_worker(once=once, batch_size=batch_size, parent_pid=parent_pid)
    except LikenessError as e:
        fail(e.message)
    raise typer.Exit(code)


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port to listen on")] = 8000,
) -> None:
    """Run the HTTP API and one worker (jobs in LIKENESS_DATA_DIR); Ctrl-C stops both."""
    from likeness.serve import serve

    raise typer.Exit(serve(host, port))


# Training is heavy; its module is torch-free at import, like this one.
from worker.training.extractor_cli import train_extractor  # noqa: E402
from worker.training.generator_cli import prepare_generator_data, train_generator  # noqa: E402

app.command(
    "train-generator", help="Train a StyleGAN2 face generator on a zip of images (resumable)."
)(train_generator)
app.command(
    "prepare-generator-data",
    help="Build a generator training set: CelebA-HQ plus UTKFace re-framed, race-balanced.",
)(prepare_generator_data)
app.command(
    "train-extractor", help="Train the face extractor F with ArcFace, race and attribute heads."
)(train_extractor)


def main() -> None:
    try:
        app()
    except LikenessError as e:  # anything a command forgot to catch still reads well
        err.print(f"[bold red]error:[/] {e.message}", highlight=False)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
