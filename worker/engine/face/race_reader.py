"""The race reader: what race a thumbnail shows, read from the thumbnail itself.

A search with no race target takes every detail the thumbnail lacks from the
generator's prior, and the prior leans toward its majority: the race judge reads
the right race on fewer plain outputs than on bicubic enlargements of the same
thumbnails. F cannot say what the thumbnail shows (its race head reads bicubic
enlargements at chance), so a small network trained on thumbnails does: its
probabilities become a soft race target, the default when the user names none.

It sees the thumbnail at ``INPUT_SIZE`` px, as the search's downscaling operator
makes it, so 16-px and 32-px thumbnails are read alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from likeness.errors import LikenessError
from worker.engine.checkpoints import atomic_torch_save
from worker.engine.downscale import downscale

INPUT_SIZE = 16
READER_FORMAT = "likeness-race-reader/1"


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class RaceReader(nn.Module):
    """(B, 3, h, w) thumbnails in [0, 1] → (B, R) race logits."""

    def __init__(self, labels: Sequence[str], width: int = 32) -> None:
        super().__init__()
        self.labels = tuple(labels)
        self.width = width
        w = width
        self.features = nn.Sequential(
            _conv(3, w, 1),
            _conv(w, w, 1),
            _conv(w, 2 * w, 2),
            _conv(2 * w, 2 * w, 1),
            _conv(2 * w, 4 * w, 2),
            _conv(4 * w, 4 * w, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.3)
        self.classifier = nn.Linear(4 * w, len(self.labels))
        # the training thumbnails' mean colour, set once before training
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))

    def forward(self, thumbnails: Tensor) -> Tensor:
        x = thumbnails.float()
        if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
            x = downscale(x, INPUT_SIZE)
        return self.classifier(self.dropout(self.features(x - self.mean)))

    @torch.no_grad()
    def read(self, thumbnails: Tensor) -> Tensor:
        """(B, R) probabilities, averaged over the thumbnail and its mirror image (a
        face's race does not change with the side it turns to)."""
        logits = self(thumbnails) + self(thumbnails.flip(-1))
        return (logits / 2).softmax(1)


def save_reader(reader: RaceReader, path: Path, metrics: dict[str, Any]) -> None:
    atomic_torch_save(
        {
            "format": READER_FORMAT,
            "labels": list(reader.labels),
            "width": reader.width,
            "input_size": INPUT_SIZE,
            "state_dict": {k: v.detach().cpu() for k, v in reader.state_dict().items()},
            "metrics": metrics,
        },
        path,
    )


def load_reader(path: str | Path, map_location: str | torch.device = "cpu") -> RaceReader:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise LikenessError("weights_corrupt", f"cannot read race reader {path}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != READER_FORMAT:
        raise LikenessError(
            "weights_corrupt", f"{path} is not a race reader ({READER_FORMAT}) export"
        )
    reader = RaceReader(ckpt["labels"], ckpt["width"])
    reader.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
    return reader.eval()


def race_targets(probs: Tensor, reader_labels: Sequence[str], labels: Sequence[str]) -> Tensor:
    """The reader's (B, R') probabilities as a distribution over ``labels`` (F's race
    head's order): labels F does not know are dropped and the rest renormalised."""
    index = {name: j for j, name in enumerate(reader_labels)}
    shared = [name for name in labels if name in index]
    if not shared:
        raise LikenessError(
            "unknown_label",
            f"the race reader's labels {tuple(reader_labels)} share none with F's {tuple(labels)}",
            status=422,
        )
    out = torch.zeros(probs.shape[0], len(labels), device=probs.device)
    for j, name in enumerate(labels):
        if name in index:
            out[:, j] = probs[:, index[name]]
    return out / out.sum(1, keepdim=True).clamp_min(1e-8)
