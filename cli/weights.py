"""``likeness weights ...``: inspect, import, ship and tune the manifest's weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.output import err, fail, progress_bar
from likeness.errors import LikenessError

weights_app = typer.Typer(no_args_is_help=True, help="Inspect and prepare generator weights.")


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
        "parameters": int(
            sum(
                v.numel()
                for k, v in state.items()
                if "noises." not in k and not k.endswith(".kernel")
            )
        ),
        "dtype": str(next(iter(state.values())).dtype).replace("torch.", ""),
        "has_latent_avg": "latent_avg" in ckpt,
        "mapping_fit": (
            "embedded"
            if "mapping_fit" in ckpt
            else "sidecar"
            if fit_sidecar(file).is_file()
            else "missing"
        ),
    }
    typer.echo(json.dumps(info, indent=2))


@weights_app.command("fit-mapping")
def weights_fit_mapping(
    file: Annotated[Path, typer.Argument(help="generator checkpoint (.pt)")],
    samples: Annotated[int, typer.Option(min=1000, help="z samples")] = 100_000,
    batch: Annotated[int, typer.Option(min=1, help="samples per batch")] = 10_000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
    seed: Annotated[int, typer.Option(help="seed of the z samples")] = 0,
    embed: Annotated[
        bool, typer.Option(help="write into the checkpoint instead of a sidecar")
    ] = False,
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
        fit = fit_mapping(
            loaded.generator, samples, batch, seed, progress=lambda n: bar.advance(task, n)
        )
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
    from likeness.manifest import default_manifest, load_manifest

    manifest = load_manifest()
    if not manifest.models:
        typer.echo(f"no weights in {default_manifest()}")
    for e in manifest.models:
        flag = " (default)" if e.default else ""
        typer.echo(f"{e.kind:11s} {e.name}{flag}  {e.file}  sha256 {e.sha256[:12]}…")


@weights_app.command("import")
def weights_import(
    file: Annotated[
        Path,
        typer.Argument(help="the checkpoint: a port .pt, an NVIDIA .pkl or an arcface_torch .pth"),
    ],
    kind: Annotated[
        str | None, typer.Option(help="generator or extractor (default: what the file holds)")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="auto, port, nvidia-pkl or arcface")
    ] = "auto",
    name: Annotated[
        str | None, typer.Option(help="manifest name (default: the file's stem)")
    ] = None,
    into: Annotated[
        Path | None,
        typer.Option(help="folder for the converted file (default: $LIKENESS_DATA_DIR/weights)"),
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="manifest to record it in (default: LIKENESS_WEIGHTS_DIR)")
    ] = None,
    default: Annotated[
        bool, typer.Option("--default", help="make it the default of its kind")
    ] = False,
    fit: Annotated[
        bool,
        typer.Option(
            "--fit-mapping/--no-fit-mapping", help="generators: fit the mapping now, once"
        ),
    ] = True,
    fit_samples: Annotated[int, typer.Option(min=1000, help="z samples of the fit")] = 100_000,
    device: Annotated[str, typer.Option(help="device of the fit: auto, cpu, cuda")] = "auto",
    licence: Annotated[
        str | None,
        typer.Option(help="licence to record (default: what the format's official files carry)"),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace an entry or file of that name")
    ] = False,
) -> None:
    """Convert an official checkpoint to our format and record it in the manifest (JSON out)."""
    from likeness.manifest import default_manifest
    from worker.pipeline import pick_device
    from worker.weights_import import import_weights

    try:
        with progress_bar() as bar:
            task = bar.add_task("fitting the mapping", total=fit_samples, status="", visible=False)

            def advance(n: int) -> None:
                bar.update(task, advance=n, visible=True)

            result = import_weights(
                file,
                kind=kind,
                fmt=fmt,
                name=name,
                into=into,
                manifest_path=default_manifest(manifest),
                default=default,
                fit=fit,
                fit_samples=fit_samples,
                device=pick_device(device),
                licence=licence,
                force=force,
                progress=advance,
            )
    except LikenessError as e:
        fail(e.message)
    typer.echo(json.dumps(result.entry.model_dump(), indent=2))
    err.print(
        f"imported {file.name} as {result.entry.kind} '{result.entry.name}' → "
        f"{result.path} (recorded in {result.manifest_path})",
        highlight=False,
    )


@weights_app.command("ship-generator")
def weights_ship_generator(
    run: Annotated[
        Path, typer.Argument(help="a train-generator run folder (checkpoint.pt, g_ema.pt)")
    ],
    quality: Annotated[
        Path | None,
        typer.Option(
            help="bench/generator_quality.py's JSON for the shipped file: its metrics go into the "
            "manifest"
        ),
    ] = None,
    name: Annotated[str, typer.Option(help="manifest name; the file is <name>.pt")] = "generator",
    into: Annotated[
        Path | None,
        typer.Option(help="folder of the manifest to register in (default: LIKENESS_WEIGHTS_DIR)"),
    ] = None,
    half: Annotated[bool, typer.Option("--fp16/--fp32", help="store float16 weights")] = True,
) -> None:
    """Bundle a trained generator: G_ema (fp16) with a fresh mapping fit, as the default
    generator, with its config, sha256, provenance and (with --quality) its metrics."""
    from likeness.manifest import manifest_in
    from worker.training.generator_ship import read_quality, ship_generator

    manifest_path = manifest_in(into)
    try:
        entry = ship_generator(
            run, quality=read_quality(quality), name=name, manifest_path=manifest_path, half=half
        )
    except LikenessError as e:
        fail(e.message)
    typer.echo(json.dumps(entry.model_dump(), indent=2))
    err.print(
        f"shipped {run} as generator '{entry.name}' → {manifest_path.parent / entry.file}",
        highlight=False,
    )


@weights_app.command("add-quality")
def weights_add_quality(
    quality: Annotated[
        Path, typer.Argument(help="bench/generator_quality.py's JSON for the shipped file")
    ],
    name: Annotated[str, typer.Option(help="manifest name of the generator")] = "generator",
    into: Annotated[
        Path | None, typer.Option(help="folder of the manifest (default: LIKENESS_WEIGHTS_DIR)")
    ] = None,
) -> None:
    """Record a shipped generator's measured quality in its manifest entry, beside the
    measures the report does not repeat; the report must name that file's sha256."""
    from likeness.manifest import manifest_in
    from worker.training.generator_ship import add_quality, read_quality

    manifest_path = manifest_in(into)
    try:
        entry = add_quality(name, read_quality(quality) or {}, manifest_path=manifest_path)
    except LikenessError as e:
        fail(e.message)
    typer.echo(json.dumps(entry.metrics, indent=2))


@weights_app.command("set-search")
def weights_set_search(
    name: Annotated[str, typer.Argument(help="manifest name of the generator")],
    settings: Annotated[
        list[str] | None,
        typer.Argument(help="FIELD=VALUE search settings, e.g. geocross_weight=0.02"),
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="drop the settings it had first")] = False,
    into: Annotated[
        Path | None, typer.Option(help="folder of the manifest (default: LIKENESS_WEIGHTS_DIR)")
    ] = None,
) -> None:
    """Record search settings measured to suit a generator: every search in it (upscale,
    the worker, evaluate, the benches) starts from them; explicit options still win."""
    from likeness.manifest import manifest_in
    from worker.training.generator_ship import search_pairs, set_search

    manifest_path = manifest_in(into)
    try:
        entry = set_search(
            name, search_pairs(settings or []), clear=clear, manifest_path=manifest_path
        )
    except LikenessError as e:
        fail(e.message)
    typer.echo(json.dumps(entry.search, indent=2))


@weights_app.command("export-detector")
def weights_export_detector(
    into: Annotated[
        Path | None,
        typer.Option(help="folder of the manifest to register in (default: LIKENESS_WEIGHTS_DIR)"),
    ] = None,
) -> None:
    """Export MTCNN's three networks to ONNX, so the API can check reference photos
    for a face without torch, and register them in the manifest."""
    from importlib.metadata import version

    from likeness.manifest import WeightsEntry, manifest_in, register, sha256_file
    from worker.engine.face.detector_export import OPSET, export_mtcnn

    manifest_path = manifest_in(into)
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
