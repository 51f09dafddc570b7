"""``likeness train-generator``: the command-line face of ``worker.training.generator``.

Torch loads inside the command, so registering it keeps ``likeness --help`` fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.output import err
from likeness.errors import LikenessError


def resolve_resume(resume: str | None, out: Path) -> Path | None:
    """'auto' → ``<out>/checkpoint.pt`` when it exists (else a fresh start); else a path
    to a checkpoint or to committed parts of one (``<path>.parts.json``)."""
    from worker.training.generator.config import CHECKPOINT_NAME

    if resume is None:
        return None
    if resume == "auto":
        path = out / CHECKPOINT_NAME
        return path if path.is_file() else None
    from worker.training.parts import checkpoint_named, has_parts

    path = Path(resume)
    if not path.is_file() and not has_parts(checkpoint_named(path)):
        raise LikenessError("checkpoint_not_found", f"no such checkpoint: {resume}", status=404)
    return path


def extractor_path(spec: str | None) -> Path:
    """F for the race term: a manifest name, a file, or None for the manifest's default;
    relative to the working folder where it can be, as it is saved in the run's config
    and the shipped generator's provenance."""
    from likeness.manifest import resolve_weights

    path = resolve_weights(spec, "extractor")[0].resolve()
    cwd = Path.cwd().resolve()
    return path.relative_to(cwd) if path.is_relative_to(cwd) else path


def build_config(smoke: bool, overrides: dict[str, Any], resume: Path | None) -> Any:
    from worker.training.generator.config import TrainConfig, merge_resume_config
    from worker.training.generator.state import read_checkpoint

    saved = TrainConfig(**read_checkpoint(resume)["train_config"]) if resume else None
    race_weight = overrides.get("race_weight", saved.race_weight if saved else 0.0)
    if "race_extractor" in overrides and race_weight == 0:
        raise LikenessError("bad_option", "--race-extractor is for a --race-weight above 0")
    if race_weight > 0 and "race_extractor" not in overrides:
        # a resumed run keeps the F it was started with; a new one takes the manifest's
        known = saved.race_extractor if saved else None
        overrides["race_extractor"] = known if known is not None else extractor_path(None)
    if saved is not None:
        return merge_resume_config(saved, overrides)
    if not smoke and overrides.get("data") is None:
        raise LikenessError("no_data", "give --data ZIP (or --smoke for a synthetic-data run)")
    return TrainConfig.smoke(**overrides) if smoke else TrainConfig(**overrides)


def train_generator(
    data: Annotated[
        Path | None,
        typer.Option(
            help="zip of 128-px images (the ../shared format); --smoke without it uses synthetic "
            "images"
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="run folder (default: runs/generator, runs/smoke)")
    ] = None,
    resolution: Annotated[int | None, typer.Option(help="image side (default: 128)")] = None,
    channel_max: Annotated[int | None, typer.Option(help="widest layer (default: 128)")] = None,
    channel_base: Annotated[
        int | None, typer.Option(help="width at res r = min(channel_max, base / r) (default: 2048)")
    ] = None,
    style_dim: Annotated[int | None, typer.Option(help="width of z and w (default: 256)")] = None,
    n_mlp: Annotated[int | None, typer.Option(help="mapping depth (default: 4)")] = None,
    objective: Annotated[
        str | None,
        typer.Option(
            help="gan (StyleGAN2, for GPUs), vae (G as an autoencoder's decoder: faces after a few "
            "epochs, the CPU path) or vae-gan (default: gan)"
        ),
    ] = None,
    face_weights: Annotated[
        Path | None,
        typer.Option(
            help="MobileFaceNet checkpoint for the vae identity term and --fd-samples "
            "(../shared/weights/mobilefacenet_casia_068.ckpt)"
        ),
    ] = None,
    fd_samples: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="at every checkpoint, log the FD of this many samples vs as many "
            "held-out photos (needs --face-weights; default: 0, off)",
        ),
    ] = None,
    kl_weight: Annotated[float | None, typer.Option(help="vae: KL weight (default: 5e-5)")] = None,
    lowres_weight: Annotated[
        float | None, typer.Option(help="vae: weight of the 16/32-px downscale MSE (default: 10)")
    ] = None,
    identity_weight: Annotated[
        float | None, typer.Option(help="vae: weight of the identity term (default: 0.1)")
    ] = None,
    perceptual_weight: Annotated[
        float | None,
        typer.Option(
            help="vae: weight of the face-feature perceptual loss, the sharpener (needs "
            "--face-weights; default: 0, off)"
        ),
    ] = None,
    race_weight: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="vae training term: weight of the divergence of F's race readings of the "
            "photo and of its reconstruction, so that the decoder keeps what tells races "
            "apart (default: 0, off; a resume may change it)",
        ),
    ] = None,
    race_extractor: Annotated[
        str | None,
        typer.Option(
            help="F for --race-weight: a manifest name or an export file (default: the run's "
            "own when resuming, else the manifest's extractor)"
        ),
    ] = None,
    adv_weight: Annotated[
        float | None,
        typer.Option(
            help="weight of G's adversarial loss (with --d-fakes reconstructions: times the "
            "gradient balance; default: 1)"
        ),
    ] = None,
    adv_start_kimg: Annotated[
        float | None,
        typer.Option(help="vae-gan: adversarial updates begin after this many kimg (default: 0)"),
    ] = None,
    adv_ramp_kimg: Annotated[
        float | None,
        typer.Option(
            help="then G's adversarial weight rises from 0 to --adv-weight over this many kimg "
            "(default: 0, at once)"
        ),
    ] = None,
    d_lr_ratio: Annotated[
        float | None,
        typer.Option(
            min=0.01,
            help="D's learning rate as a multiple of G's (two time-scale updates; a resume may "
            "change it; default: 1)",
        ),
    ] = None,
    d_fakes: Annotated[
        str | None,
        typer.Option(
            help="vae-gan: what D judges as fake: samples (G's random samples, with G's own "
            "adversarial step on them) or reconstructions (the autoencoder's, VQGAN-style: no "
            "separate G step; the adversarial term is balanced against the reconstruction "
            "terms by their gradient norms at G's last layer, times --adv-weight). A resume "
            "may change it (default: samples)",
        ),
    ] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="batch size (default: 8)")] = None,
    kimg: Annotated[
        float | None,
        typer.Option(help="train until this many thousand images seen (default: 1000)"),
    ] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="stop (with a checkpoint) after this long in this run")
    ] = None,
    checkpoint_minutes: Annotated[
        float | None, typer.Option(help="minutes between checkpoints (default: 10)")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="checkpoint file (or committed parts of one: <file>.parts.json), or 'auto' "
            "for <out>/checkpoint.pt if present"
        ),
    ] = None,
    save_parts: Annotated[
        Path | None,
        typer.Option(
            help="when training stops, also write the checkpoint as ≤15 MiB parts at this path "
            "(PATH.partNNN + PATH.parts.json), small enough to commit; resume with "
            "--resume PATH"
        ),
    ] = None,
    prior_members: Annotated[
        Path | None,
        typer.Option(
            help="vae objectives: fit the exported prior to these members of --data (a split "
            "file, e.g. a race-balanced list) instead of the recent training batches"
        ),
    ] = None,
    init_generator: Annotated[
        Path | None,
        typer.Option(
            help="start G from this generator checkpoint of the same config (e.g. "
            "weights/generator.pt): a warm start when a run's checkpoint is gone"
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    smoke: Annotated[
        bool, typer.Option("--smoke", help="tiny 32-px config that runs on CPU in under a minute")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="seed (default: 0)")] = None,
    r1_gamma: Annotated[float | None, typer.Option(help="R1 weight (default: 0.5)")] = None,
    augment: Annotated[
        str | None,
        typer.Option(
            help="DiffAugment policy: comma list of color, translation, cutout; or 'none' "
            "(a resume may change it)"
        ),
    ] = None,
    members: Annotated[
        Path | None, typer.Option(help="split file: the zip members to train on, one per line")
    ] = None,
    mirror: Annotated[
        bool | None, typer.Option("--mirror/--no-mirror", help="add horizontal flips (default: on)")
    ] = None,
    pl_weight: Annotated[
        float | None, typer.Option(help="path-length regularisation weight (default: 0 = off)")
    ] = None,
    ema_kimg: Annotated[
        float | None, typer.Option(help="EMA half-life in kimg (default: batch·10/32)")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="data-loading processes (default: 0 on CPU, 4 on CUDA)")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="CPU threads for torch (default: torch's; 1 with --smoke). Keep it fixed "
            "across resumes for bit-exact continuation",
        ),
    ] = None,
) -> None:
    """Train the StyleGAN2 generator on a zip of face images; resumable, checkpoints
    to OUT (checkpoint.pt, g_ema.pt, samples_kimgXXXX.png, log.jsonl)."""
    options = dict(
        data=data,
        resolution=resolution,
        channel_max=channel_max,
        channel_base=channel_base,
        style_dim=style_dim,
        n_mlp=n_mlp,
        batch=batch,
        total_kimg=kimg,
        max_minutes=max_minutes,
        checkpoint_minutes=checkpoint_minutes,
        seed=seed,
        r1_gamma=r1_gamma,
        augment=augment,
        members=members,
        mirror=mirror,
        pl_weight=pl_weight,
        ema_kimg=ema_kimg,
        workers=workers,
        objective=objective,
        face_weights=face_weights,
        fd_samples=fd_samples,
        kl_weight=kl_weight,
        lowres_weight=lowres_weight,
        identity_weight=identity_weight,
        adv_weight=adv_weight,
        perceptual_weight=perceptual_weight,
        race_weight=race_weight,
        adv_start_kimg=adv_start_kimg,
        adv_ramp_kimg=adv_ramp_kimg,
        d_lr_ratio=d_lr_ratio,
        d_fakes=d_fakes,
        init_generator=init_generator,
        prior_members=prior_members,
    )
    overrides = {k: v for k, v in options.items() if v is not None}
    overrides["device"] = device
    try:
        if race_extractor is not None:
            overrides["race_extractor"] = extractor_path(race_extractor)
    except LikenessError as e:
        err.print(f"[bold red]error:[/] {e.message}", highlight=False)
        raise typer.Exit(2) from None
    out = out or Path("runs/smoke" if smoke else "runs/generator")
    overrides["out"] = out
    try:
        import torch
        from pydantic import ValidationError

        from worker.training.generator.loop import train
        from worker.training.generator_data import built_without_masks

        # tiny nets lose more to thread hand-offs than they gain, worst on a busy machine
        threads = threads or (1 if smoke else None)
        if threads is not None:
            torch.set_num_threads(threads)
        resume_path = resolve_resume(resume, out)
        try:
            config = build_config(smoke, overrides, resume_path)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(map(str, first["loc"]))
            message = first["msg"].removeprefix("Value error, ")
            raise LikenessError("bad_option", f"{where}: {message}" if where else message) from None
        if resume_path is not None:
            err.print(f"resuming from {resume_path}", highlight=False)
        elif resume == "auto":
            err.print(f"no checkpoint in {out}: starting fresh", highlight=False)
        gconf = config.generator_config()
        err.print(
            f"generator {gconf.resolution}px channels {gconf.channels} "
            f"style_dim {gconf.style_dim} n_mlp {gconf.n_mlp}; objective "
            f"{config.objective}, batch {config.batch}, "
            f"data {config.data or 'synthetic'}, out {config.out}",
            highlight=False,
        )
        if config.data is not None and built_without_masks(config.data):
            err.print(
                f"[yellow]warning:[/] {config.data} was built before validity masks: its "
                "framed UTKFace chips train with their invented margins taken as real "
                "(rebuild it with prepare-generator-data)",
                highlight=False,
            )
        result = train(config, resume=resume_path)
    except LikenessError as e:
        err.print(f"[bold red]error:[/] {e.message}", highlight=False)
        raise typer.Exit(2) from None
    err.print(
        f"stopped ({result.reason}) at step {result.step}, {result.kimg:.2f} kimg; "
        f"checkpoint {result.checkpoint}",
        highlight=False,
    )
    if save_parts is not None:
        from worker.training.parts import split_into_parts

        parts = split_into_parts(result.checkpoint, save_parts)
        err.print(f"wrote {len(parts)} parts of it beside {save_parts}", highlight=False)


def prepare_generator_data(
    out: Annotated[Path, typer.Option(help="the zip to write (for train-generator --data)")] = Path(
        "runs/generator-data/images.zip"
    ),
    data_root: Annotated[Path, typer.Option(help="folder holding celebahq/ and utkface/")] = Path(
        "../shared/data"
    ),
    celeba: Annotated[
        int, typer.Option(min=0, help="held-in CelebA-HQ photos (a fixed hash-ordered choice)")
    ] = 8000,
    utkface_per_race: Annotated[
        int,
        typer.Option(min=0, help="held-in UTKFace chips per race (fewer where a race has fewer)"),
    ] = 2000,
    size: Annotated[int, typer.Option(min=16, help="image side in pixels")] = 128,
    cache: Annotated[Path, typer.Option(help="MTCNN landmark cache for the UTKFace chips")] = Path(
        "runs/generator-data/utkface_landmarks.pt"
    ),
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch")] = None,
) -> None:
    """Build a generator training set from the train splits only: CelebA-HQ photos plus
    race-balanced UTKFace chips warped into the FFHQ frame, one zip with provenance.json."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    try:
        import torch

        from worker.training.generator_data import plan_mix, write_mix

        if threads is not None:
            torch.set_num_threads(threads)
        plan = plan_mix(data_root, celeba, utkface_per_race)
        per_race = ", ".join(f"{len(g)}" for g in plan.utkface)
        err.print(
            f"{len(plan.celeba)} CelebA-HQ photos and UTKFace chips per race ({per_race}) → {out}",
            highlight=False,
        )
        with Progress(
            TextColumn("framing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err,
        ) as bar:
            task = bar.add_task("framing", total=plan.total)
            summary = write_mix(
                data_root, out, plan, size, cache, advance=lambda n: bar.advance(task, n)
            )
    except LikenessError as e:
        err.print(f"[bold red]error:[/] {e.message}", highlight=False)
        raise typer.Exit(2) from None
    err.print(
        f"wrote {out}: {summary.images} images ({summary.celeba} CelebA-HQ, UTKFace "
        f"{summary.utkface_per_race}; {summary.skipped_no_face} chips without a face "
        f"left out) in {summary.seconds:.0f} s",
        highlight=False,
    )
