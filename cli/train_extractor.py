"""``likeness train-extractor``: the command-line face of ``worker.training.extractor``.

Torch loads inside the command, so registering it keeps ``likeness --help`` fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.output import err, typed_command
from likeness.errors import LikenessError


def train_extractor(
    data_root: Annotated[
        Path | None,
        typer.Option(
            help="folder holding celebahq/, utkface/ (and lfw/) in the ../shared format "
            "(default: ../shared/data; ignored with --smoke)"
        ),
    ] = None,
    architecture: Annotated[
        str,
        typer.Option(
            help="mobilefacenet (112x96 SphereFace crops) or iresnet (112x112 ArcFace crops)"
        ),
    ] = "mobilefacenet",
    weights: Annotated[
        Path | None,
        typer.Option(
            help="pretrained backbone: a MobileFaceNet .ckpt (default: "
            "../shared/weights/mobilefacenet_casia_068.ckpt) or, with --architecture iresnet, "
            "an insightface arcface_torch backbone.pth (required)"
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="run folder (default: runs/extractor, runs/extractor-smoke)")
    ] = None,
    lfw: Annotated[
        bool, typer.Option("--lfw", help="add LFW identities to the ArcFace set")
    ] = False,
    steps: Annotated[
        int | None,
        typer.Option(min=0, help="joint training steps (default: 20000; 0: fit the heads only)"),
    ] = None,
    head_epochs: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="epochs fitting the heads and ArcFace centres on frozen features before "
            "joint training (default: 30; 0: skip)",
        ),
    ] = None,
    batch: Annotated[
        int | None, typer.Option(min=2, help="batch per data set (default: 64)")
    ] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam or sgd (default: adam)")] = None,
    lr: Annotated[float | None, typer.Option(help="backbone learning rate (default: 1e-4)")] = None,
    head_lr: Annotated[
        float | None, typer.Option(help="heads and ArcFace centres learning rate (default: 1e-3)")
    ] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option(help="stop (with a checkpoint and an export) after this long in this run"),
    ] = None,
    checkpoint_minutes: Annotated[
        float | None, typer.Option(help="minutes between checkpoints (default: 10)")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="checkpoint file, a folder holding one, committed parts (the --save-parts "
            "folder), or 'auto' for <out>/checkpoint.pt if present; the current meta-epoch's "
            "lookalikes the run folder lacks are searched again"
        ),
    ] = None,
    save_parts: Annotated[
        Path | None,
        typer.Option(
            help="also write every checkpoint (no lookalikes: they stay in <out>) as ≤15 "
            "MiB parts in this folder, replacing the previous ones: small enough to commit; "
            "resume elsewhere with --resume FOLDER"
        ),
    ] = None,
    init_export: Annotated[
        Path | None,
        typer.Option(
            help="start from an F export (e.g. weights/extractor.pt: backbone, heads, θ_t) "
            "instead of --weights: only the ArcFace centres are fitted, and --steps defaults "
            "to 0, so the lookalike stage starts at once"
        ),
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="export weights as float16")] = False,
    max_images: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="cap images per data set (quick runs; MTCNN runs once per image, "
            "~55 ms each on one CPU thread)",
        ),
    ] = None,
    eval_limit: Annotated[
        int | None, typer.Option(help="held-out images per evaluation set (default: 2000)")
    ] = None,
    blur_fraction: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=1,
            help="share of each joint-training batch resampled through a lower "
            "resolution first (crop's longer edge 20-64 px), so F reads a blurry face like a "
            "sharp one (default: 0, off)",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    workers: Annotated[
        int | None, typer.Option(help="data-loading processes (default: 0 on CPU, 4 on CUDA)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed (default: 0)")] = None,
    meta_epochs: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="lookalike stage after the joint steps: meta-epochs of generate lookalikes "
            "with the current F → train with L_siamese → re-fit θ_t (paper: 5; default: "
            "0: off)",
        ),
    ] = None,
    lookalike_pairs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="people per meta-epoch, two photos each: two searches per person (default: 24)",
        ),
    ] = None,
    siamese_steps: Annotated[
        int | None,
        typer.Option(min=0, help="joint steps with L_siamese per meta-epoch (default: 50)"),
    ] = None,
    siamese_batch: Annotated[
        int | None, typer.Option(min=1, help="lookalikes per step (default: 16)")
    ] = None,
    siamese_weight: Annotated[
        float | None, typer.Option(min=0, help="weight of L_siamese (default: 1)")
    ] = None,
    generator: Annotated[
        str | None,
        typer.Option(
            help="generator of the lookalike searches: manifest name or checkpoint (default: the "
            "manifest's default generator)"
        ),
    ] = None,
    search_steps: Annotated[
        int | None, typer.Option(min=1, help="steps per lookalike search (default: 50; PULSE: 100)")
    ] = None,
    search_restarts: Annotated[
        int | None, typer.Option(min=1, help="restarts per lookalike search (default: 4)")
    ] = None,
    lookalike_thumbnail: Annotated[
        int | None,
        typer.Option(min=2, help="thumbnail side the photos are downscaled to (default: 16)"),
    ] = None,
    lookalike_batch: Annotated[
        int | None, typer.Option(min=1, help="thumbnails per search batch (default: 8)")
    ] = None,
    first_search_threshold: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=179.9,
            help="θ (degrees) of the identity objective in meta-epoch 1's searches (default: "
            "0, the paper's Algorithm 1: pull all the way; later ones use F's θ_t). With the "
            "bundled 128-px generator 0 pulls faces far off their thumbnails; pass F's θ_t "
            "(docs/training.md)",
        ),
    ] = None,
    search_precision: Annotated[
        str | None,
        typer.Option(
            help="the lookalike searches' number format: auto (default: bf16 + channels-last "
            "where the CPU has bf16 units, as likeness upscale), fp32 or bf16"
        ),
    ] = None,
    lfw_pairs: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="LFW held-out pairs measured around each meta-epoch (default: 2000; 0: off)",
        ),
    ] = None,
    smoke: Annotated[
        bool,
        typer.Option(
            "--smoke", help="synthetic data, random init, 4 steps: runs on CPU in under a minute"
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="CPU threads for torch (default: torch's; 1 with --smoke)"),
    ] = None,
    ship: Annotated[
        bool,
        typer.Option(
            "--ship",
            help="then put the export (float16) in weights/extractor.pt as the default "
            "extractor of the manifest",
        ),
    ] = False,
    into: Annotated[
        Path | None,
        typer.Option(
            help="with --ship: folder of the manifest to ship into (default: LIKENESS_WEIGHTS_DIR)"
        ),
    ] = None,
) -> None:
    """Train F jointly with ArcFace, race and attribute heads (after fitting the heads on
    frozen features), then optionally with the Siamese loss on lookalikes (--meta-epochs);
    writes OUT/checkpoint.pt, OUT/extractor.pt (F + heads + θ_t + metrics), OUT/log.jsonl
    and OUT/lookalikes/."""
    if architecture == "iresnet" and weights is None and not smoke:
        err.print(
            "[bold red]error:[/] --architecture iresnet needs --weights: an insightface "
            "arcface_torch backbone.pth",
            highlight=False,
        )
        raise typer.Exit(2)
    options = dict(
        data_root=data_root,
        weights=weights,
        steps=steps,
        batch=batch,
        head_epochs=head_epochs,
        optimizer=optimizer,
        lr=lr,
        head_lr=head_lr,
        max_minutes=max_minutes,
        checkpoint_minutes=checkpoint_minutes,
        eval_limit=eval_limit,
        max_images=max_images,
        blur_fraction=blur_fraction,
        workers=workers,
        seed=seed,
        meta_epochs=meta_epochs,
        lookalike_pairs=lookalike_pairs,
        siamese_steps=siamese_steps,
        siamese_batch=siamese_batch,
        siamese_weight=siamese_weight,
        generator=generator,
        search_steps=search_steps,
        search_restarts=search_restarts,
        lookalike_thumbnail=lookalike_thumbnail,
        lookalike_batch=lookalike_batch,
        init_export=init_export,
        first_search_threshold_deg=first_search_threshold,
        search_precision=search_precision,
        lfw_pairs=lfw_pairs,
    )
    if init_export is not None and steps is None:
        options["steps"] = 0  # F is trained already: straight to the lookalike stage
    overrides = {
        k: str(v) if isinstance(v, Path) else v for k, v in options.items() if v is not None
    }
    out = out or Path("runs/extractor-smoke" if smoke else "runs/extractor")
    overrides |= {
        "out": str(out),
        "device": device,
        "use_lfw": lfw,
        "export_fp16": fp16,
        "architecture": architecture,
    }
    try:
        import torch
        from pydantic import ValidationError

        from worker.training.extractor.config import CHECKPOINT_NAME, ExtractorConfig
        from worker.training.extractor.loop import train
        from worker.training.extractor.state import checkpoint_source
        from worker.training.parts import has_parts

        threads = threads or (1 if smoke else None)
        if threads is not None:
            torch.set_num_threads(threads)
        resume_path: Path | None = None
        if resume == "auto":
            candidate = out / CHECKPOINT_NAME
            resume_path = candidate if candidate.is_file() else None
        elif resume is not None:
            resume_path = Path(resume)
            source = checkpoint_source(resume_path)
            if not source.is_file() and not has_parts(source):
                raise LikenessError(
                    "checkpoint_not_found", f"no such checkpoint: {resume}", status=404
                )
        try:
            config = ExtractorConfig.smoke(**overrides) if smoke else ExtractorConfig(**overrides)
        except ValidationError as e:
            first = e.errors()[0]
            raise LikenessError(
                "bad_option", f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
            ) from None
        if resume_path is not None:
            err.print(f"resuming from {resume_path}", highlight=False)
        err.print(
            f"train-extractor: {config.architecture}, data "
            f"{config.data_root or 'synthetic'}, "
            f"init {config.init_export or config.weights or 'random'}, batch "
            f"{config.batch}, head fit {config.head_epochs} epochs, {config.steps} steps, "
            f"out {config.out}",
            highlight=False,
        )
        if config.meta_epochs:
            err.print(
                f"lookalike stage: meta-epochs {config.meta_epochs}, each "
                f"{config.lookalike_pairs} pairs ({config.search_steps}-step searches × "
                f"{config.search_restarts} restarts) and {config.siamese_steps} Siamese "
                "steps",
                highlight=False,
            )
        result = train(config, resume=resume_path, save_parts=save_parts)
        err.print(
            f"stopped ({result.reason}) at step {result.step}; export {result.export}",
            highlight=False,
        )
        print_metrics(result.metrics)
        if save_parts is not None:
            err.print(f"checkpoint parts in {save_parts} (commit them to carry on elsewhere)")
        verdict = print_stage(result.meta_history, config.meta_epochs)
        if ship and result.reason == "signal":
            err.print("interrupted: not shipped", highlight=False)
        elif ship and not verdict:
            err.print("the lookalike stage's F is not shipped", highlight=False)
        elif ship:
            ship_export(result.export, into)
    except LikenessError as e:
        err.print(f"[bold red]error:[/] {e.message}", highlight=False)
        raise typer.Exit(2) from None


def print_metrics(m: dict[str, Any]) -> None:
    if not m:
        return
    err.print(
        f"race top-1 {m['race_top1']:.3f}, attribute mAP {m['attribute_map']:.3f}, "
        f"same {m['angle_same']['mean']:.1f}±{m['angle_same']['sd']:.1f}°, "
        f"diff {m['angle_diff']['mean']:.1f}±{m['angle_diff']['sd']:.1f}°",
        highlight=False,
    )
    if m.get("threshold_deg") is not None:
        held = m["threshold_accuracy"]
        err.print(
            f"θ_t {m['threshold_deg']:.1f}°: accuracy {m['threshold_fit_accuracy']:.3f} "
            f"on training people, {'n/a' if held is None else format(held, '.3f')} "
            "held out",
            highlight=False,
        )


def print_stage(history: list[dict[str, Any]], meta_epochs: int) -> bool:
    """The lookalike stage's curve, one line per measurement (before it, then after each
    meta-epoch), and its verdict; True when there is no stage or F may ship."""
    from worker.training.extractor.verdict import curve_line, stage_verdict

    if meta_epochs == 0 and not history:
        return True
    for entry in history:
        err.print(curve_line(entry), highlight=False)
    ok, why = stage_verdict(history, meta_epochs)
    if ok:
        err.print("ship: F kept LFW, race and attributes within bounds", highlight=False)
    for reason in why:
        err.print(f"do not ship: {reason}", highlight=False)
    return ok


def ship_export(export: Path, into: Path | None) -> None:
    from likeness.manifest import manifest_in
    from worker.training.extractor_ship import ship_extractor

    manifest = manifest_in(into)
    entry = ship_extractor(export, manifest_path=manifest, command=typed_command())
    err.print(
        f"shipped as the default extractor '{entry.name}' → "
        f"{manifest.parent / entry.file} (sha256 {entry.sha256[:12]}…)",
        highlight=False,
    )
