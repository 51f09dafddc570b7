"""``likeness train-race-reader``: the network that reads a thumbnail's race, so an
upscale that names no race keeps the one the thumbnail shows."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.output import err, fail, typed_command


def train_race_reader(
    data: Annotated[
        Path,
        typer.Option(
            help="the generator's training zip (likeness prepare-generator-data): its "
            "utkface/ faces, already in the FFHQ frame"
        ),
    ] = Path("runs/mix/images.zip"),
    labels: Annotated[Path, typer.Option(help="UTKFace's labels.csv (the faces' races)")] = Path(
        "../shared/data/utkface/labels.csv"
    ),
    epochs: Annotated[int, typer.Option(min=1, help="passes over the faces")] = 30,
    into: Annotated[
        Path | None,
        typer.Option(
            help="folder of the manifest to register the reader in (default: LIKENESS_WEIGHTS_DIR)"
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch")] = None,
) -> None:
    """Train the race reader on 16-px thumbnails of UTKFace's train split; a tenth of
    the faces is held out and scores it. Registers it in the weights manifest."""
    import torch

    from likeness.errors import LikenessError
    from likeness.manifest import WeightsEntry, manifest_in, register, sha256_file
    from worker.engine.face.race_reader import INPUT_SIZE, save_reader
    from worker.training.race_reader import HELD_OUT, thumbnail_faces, train_reader

    if threads is not None:
        torch.set_num_threads(threads)

    def log(line: str) -> None:
        err.print(line, highlight=False)

    try:
        faces = thumbnail_faces(data, labels, log)
    except LikenessError as exc:
        fail(exc.message)
    log(f"race reader: {len(faces.train_y)} faces to train on, {len(faces.test_y)} held out")
    reader, metrics = train_reader(faces, epochs=epochs, log=log)
    manifest_path = manifest_in(into)
    path = manifest_path.parent / "race_reader.pt"
    save_reader(reader, path, metrics)
    register(
        WeightsEntry(
            name="race-reader",
            kind="race-reader",
            file=path.name,
            sha256=sha256_file(path),
            default=True,
            config={
                "architecture": f"6-conv CNN, width {reader.width}, {INPUT_SIZE}-px thumbnails",
                "labels": list(reader.labels),
            },
            provenance={
                "data": f"utkface/ faces of {data.name} (UTKFace train split, likeness/splits.py "
                f"salt likeness-v1, in the FFHQ frame), a {HELD_OUT:.0%} hash-chosen share held "
                "out",
                "init": "random",
                "command": typed_command(),
                "device": "cpu",
            },
            metrics=metrics,
        ),
        manifest_path,
    )
    log(
        f"race reader: held-out top-1 {metrics['top1']:.3f}, mean per race "
        f"{metrics['mean_per_class']:.3f} ({metrics['test_images']} faces); wrote {path}"
    )
