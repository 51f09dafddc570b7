"""``likeness train-extractor``: the command-line face of ``worker.training.extractor``.

Torch loads inside the command, so importing this module (as ``likeness``
does to register the command) stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from likeness.errors import LikenessError

err = Console(stderr=True, soft_wrap=True)


def train_extractor(
    data_root: Annotated[Path | None, typer.Option(
        help="folder holding celebahq/, utkface/ (and lfw/) in the ../shared format "
             "(default ../shared/data; ignored with --smoke)")] = None,
    weights: Annotated[Path | None, typer.Option(
        help="pretrained MobileFaceNet (default ../shared/weights/mobilefacenet_casia_068.ckpt)"
    )] = None,
    out: Annotated[Path | None, typer.Option(
        help="run folder (default runs/extractor, runs/extractor-smoke)")] = None,
    lfw: Annotated[bool, typer.Option("--lfw", help="add LFW identities to the ArcFace set")]
    = False,
    steps: Annotated[int | None, typer.Option(min=1, help="training steps (default 20000)")]
    = None,
    batch: Annotated[int | None, typer.Option(min=2, help="batch per data set (default 64)")]
    = None,
    optimizer: Annotated[str | None, typer.Option(help="adam or sgd (default adam)")] = None,
    lr: Annotated[float | None, typer.Option(help="backbone learning rate (default 1e-4)")]
    = None,
    head_lr: Annotated[float | None, typer.Option(
        help="heads and ArcFace centres learning rate (default 1e-3)")] = None,
    max_minutes: Annotated[float | None, typer.Option(
        help="stop (with a checkpoint and an export) after this long in this session")] = None,
    checkpoint_minutes: Annotated[float | None, typer.Option(
        help="minutes between checkpoints (default 10)")] = None,
    resume: Annotated[str | None, typer.Option(
        help="checkpoint file, or 'auto' for <out>/checkpoint.pt if present")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="export weights as float16")] = False,
    max_images: Annotated[int | None, typer.Option(
        min=2, help="cap images per data set (quick runs; MTCNN runs once per image, "
                    "~55 ms each on one CPU thread)")] = None,
    eval_limit: Annotated[int | None, typer.Option(
        help="held-out images per evaluation set (default 2000)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    workers: Annotated[int | None, typer.Option(
        help="data-loading processes (default 0 on CPU, 4 on CUDA)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed (default 0)")] = None,
    smoke: Annotated[bool, typer.Option(
        "--smoke", help="synthetic data, random init, 4 steps: runs on CPU in under a minute")]
    = False,
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU threads for torch (default: torch's; 1 with --smoke)")] = None,
) -> None:
    """Train F (MobileFaceNet) jointly with ArcFace, race and attribute heads; writes
    OUT/checkpoint.pt, OUT/extractor.pt (F + heads + metrics) and OUT/log.jsonl."""
    options = dict(data_root=data_root, weights=weights, steps=steps, batch=batch,
                   optimizer=optimizer, lr=lr, head_lr=head_lr, max_minutes=max_minutes,
                   checkpoint_minutes=checkpoint_minutes, eval_limit=eval_limit,
                   max_images=max_images,
                   workers=workers, seed=seed)
    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()
                 if v is not None}
    out = out or Path("runs/extractor-smoke" if smoke else "runs/extractor")
    overrides |= {"out": str(out), "device": device, "use_lfw": lfw, "export_fp16": fp16}
    try:
        import torch
        from pydantic import ValidationError

        from worker.training.extractor import CHECKPOINT_NAME, ExtractorConfig, train

        threads = threads or (1 if smoke else None)
        if threads is not None:
            torch.set_num_threads(threads)
        resume_path: Path | None = None
        if resume == "auto":
            candidate = out / CHECKPOINT_NAME
            resume_path = candidate if candidate.is_file() else None
        elif resume is not None:
            resume_path = Path(resume)
            if not resume_path.is_file():
                raise LikenessError("checkpoint_not_found", f"no such checkpoint: {resume}",
                                    status=404)
        try:
            config = ExtractorConfig.smoke(**overrides) if smoke else ExtractorConfig(**overrides)
        except ValidationError as e:
            first = e.errors()[0]
            raise LikenessError("bad_option", f"{'.'.join(map(str, first['loc']))}: "
                                f"{first['msg']}") from None
        if resume_path is not None:
            err.print(f"resuming from {resume_path}", highlight=False)
        err.print(f"train-extractor: data {config.data_root or 'synthetic'}, init "
                  f"{config.weights or 'random'}, batch {config.batch}, {config.steps} steps, "
                  f"out {config.out}", highlight=False)
        result = train(config, resume=resume_path)
    except LikenessError as e:
        err.print(f"[bold red]error:[/] {e.message}", highlight=False)
        raise typer.Exit(2) from None
    m = result.metrics
    err.print(f"stopped ({result.reason}) at step {result.step}; export {result.export}",
              highlight=False)
    if m:
        err.print(f"race top-1 {m['race_top1']:.3f}, attribute mAP {m['attribute_map']:.3f}, "
                  f"same {m['angle_same']['mean']:.1f}±{m['angle_same']['sd']:.1f}°, "
                  f"diff {m['angle_diff']['mean']:.1f}±{m['angle_diff']['sd']:.1f}°",
                  highlight=False)
