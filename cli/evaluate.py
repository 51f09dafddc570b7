"""``likeness evaluate``: the paper's tables on held-out people."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.output import err, fail
from likeness.errors import LikenessError


def evaluate_command(
    celeba: Annotated[
        int | None,
        typer.Option(
            min=2, help="held-out CelebA-HQ people, Tables 1 and 3 (default: 128; --quick 4)"
        ),
    ] = None,
    utkface: Annotated[
        int | None,
        typer.Option(min=1, help="held-out UTKFace images, Table 2 (default: 128; --quick 5)"),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1, max=10_000, help="optimiser steps per search (default: 100; --quick 5)"
        ),
    ] = None,
    restarts: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="random restarts per thumbnail (default: 4; --quick 2)"),
    ] = None,
    batch: Annotated[
        int | None, typer.Option(min=1, help="thumbnails per batched search (default: 8)")
    ] = None,
    swap_people: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="UTKFace thumbnails asked for every race, race_swaps.png (default: 4; "
            "--quick 2; 0: no figure)",
        ),
    ] = None,
    pair_people: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="CelebA-HQ thumbnails asked for each attribute on and off, "
            "attribute_pairs.png (default: 2; --quick 1; 0: no figure)",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="base of the per-thumbnail seeds, shared by every strategy (default: 0)"),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="generator: manifest name or file (default: the manifest's default)"),
    ] = None,
    extractor: Annotated[
        str | None,
        typer.Option(help="F with heads: manifest name or file (default: the manifest's default)"),
    ] = None,
    f0: Annotated[
        Path | None,
        typer.Option(
            help="F0, a MobileFaceNet checkpoint "
            "(default: ../shared/weights/mobilefacenet_casia_068.ckpt)"
        ),
    ] = None,
    race_judge: Annotated[
        str | None, typer.Option(help="race judge: manifest name or file (default: judge-race)")
    ] = None,
    attribute_judge: Annotated[
        str | None,
        typer.Option(help="attribute judge: manifest name or file (default: judge-attributes)"),
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(help="folder holding celebahq/ and utkface/ (default: ../shared/data)"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="where README.md, results.json and the PNGs go (default: runs/evaluate)"),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            help="search results per batch, reused by later runs (default: runs/evaluate/cache)"
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="tiny sizes for CI and smoke checks (options given still win)"
        ),
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda, cuda:N (default: auto)")
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch")] = None,
    identity_weight: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="weight of the identity objective in the steered searches "
            "(default: the objectives' default)",
        ),
    ] = None,
    race_weight: Annotated[
        float | None,
        typer.Option(min=0, help="weight of the race objective (default: the objectives' default)"),
    ] = None,
    attr_weight: Annotated[
        float | None,
        typer.Option(
            min=0, help="weight of the attribute objective (default: the objectives' default)"
        ),
    ] = None,
    views: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=16,
            help="views F sees of each candidate in the steered searches "
            "(default: the objectives' default)",
        ),
    ] = None,
) -> None:
    """Reproduce the paper's Tables 1-3 on held-out people: README.md, results.json and
    PNG plots in --out. Searches are cached per batch: an interrupted run resumes."""
    from worker.evaluation.config import EvalConfig
    from worker.evaluation.run import evaluate

    config = EvalConfig.with_quick(
        quick,
        celeba=celeba,
        utkface=utkface,
        steps=steps,
        restarts=restarts,
        batch=batch,
        swap_people=swap_people,
        pair_people=pair_people,
        seed=seed,
        weights=weights,
        extractor=extractor,
        f0=f0,
        race_judge=race_judge,
        attribute_judge=attribute_judge,
        data_root=data_root,
        out=out,
        cache=cache,
        device=device,
        threads=threads,
        identity_weight=identity_weight,
        race_weight=race_weight,
        attr_weight=attr_weight,
        views=views,
    )
    try:
        results = evaluate(config, log=lambda line: err.print(line, highlight=False))
    except LikenessError as e:
        fail(e.message)
    for check in results["targets"]:
        met = {None: "not measured", True: "met", False: "not met"}[check["met"]]
        err.print(f"{check['target']}: {check['ours']} ({met})", highlight=False)
    pngs = ["angles.png", "reidentification.png", *results["figures"]]
    err.print(f"wrote {config.out / 'README.md'}, results.json, {', '.join(pngs)}", highlight=False)
