"""PULSE's Gaussian fit of the mapping output, with its last activation undone.

The mapping ends in ``gain * leaky_relu(x, 0.2)``. Undoing that exactly
(``leaky_relu(w / gain, 5)``) gives a roughly Gaussian variable whose
per-dimension mean and std let the search work on a unit sphere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.engine.generator import ACT_GAIN, ACT_SLOPE, Generator


class MappingFit(nn.Module):
    """Per-dimension mean/std of the pre-activation mapping output; maps v ↔ w."""

    def __init__(self, mean: Tensor, std: Tensor, samples: int = 0) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clone())
        self.samples = samples

    def to_w(self, v: Tensor) -> Tensor:
        """Search variable v (..., style_dim) → w in the mapping's output space."""
        return F.leaky_relu(v * self.std + self.mean, ACT_SLOPE) * ACT_GAIN

    def from_w(self, w: Tensor) -> Tensor:
        return (undo_activation(w) - self.mean) / self.std

    def to_dict(self) -> dict[str, object]:
        return {"mean": self.mean.cpu(), "std": self.std.cpu(), "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> MappingFit:
        return cls(d["mean"], d["std"], int(d.get("samples", 0)))  # type: ignore[arg-type]


def undo_activation(w: Tensor) -> Tensor:
    return F.leaky_relu(w / ACT_GAIN, 1.0 / ACT_SLOPE)


@torch.no_grad()
def fit_mapping(
    generator: Generator,
    samples: int = 100_000,
    batch: int = 10_000,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> MappingFit:
    """Mean and std over ``samples`` z ~ N(0, I), accumulated in float64 batches."""
    device = next(generator.parameters()).device
    dim = generator.config.style_dim
    rng = torch.Generator().manual_seed(seed)
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    done = 0
    while done < samples:
        n = min(batch, samples - done)
        z = torch.randn(n, dim, generator=rng).to(device)
        x = undo_activation(generator.mapping(z)).double()
        total += x.sum(0)
        total_sq += x.pow(2).sum(0)
        done += n
        if progress is not None:
            progress(n)
    mean = total / done
    var = (total_sq - done * mean.pow(2)) / (done - 1)
    return MappingFit(mean.float(), var.clamp_min(0).sqrt().float(), samples=done)
