"""Race and attribute classifiers on the face extractor's features.

Each head carries its label names, so a checkpoint says what its outputs mean
(UTKFace's five races here; FairFace's seven work the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import torch
from torch import Tensor, nn

from likeness.labels import CELEBA_ATTRIBUTES, FAIRFACE_RACES, UTKFACE_RACES

__all__ = ["CELEBA_ATTRIBUTES", "FAIRFACE_RACES", "UTKFACE_RACES", "AttributeHead", "RaceHead"]


class LabelledHead(nn.Module):
    """A two-layer MLP from features to one logit per label name."""

    kind = "head"
    default_labels: tuple[str, ...] = ()

    def __init__(
        self,
        in_dim: int = 512,
        labels: Sequence[str] | None = None,
        hidden: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.labels: tuple[str, ...] = tuple(labels if labels is not None else self.default_labels)
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{type(self).__name__} needs distinct label names, got {self.labels}")
        self.in_dim, self.hidden, self.dropout = in_dim, hidden, dropout
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            # LayerNorm rather than BatchNorm: the search runs heads on a single image.
            nn.LayerNorm(hidden),
            nn.PReLU(hidden),
            nn.Dropout(dropout),
            nn.Linear(hidden, len(self.labels)),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.mlp(features)

    def index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise KeyError(f"{label!r} is not one of {self.labels}") from None

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain data (strings, ints, tensors) that ``torch.load(weights_only=True)`` accepts."""
        return {
            "kind": self.kind,
            "labels": list(self.labels),
            "in_dim": self.in_dim,
            "hidden": self.hidden,
            "dropout": self.dropout,
            "state_dict": self.state_dict(),
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> Self:
        if ckpt.get("kind") != cls.kind:
            raise ValueError(f"checkpoint holds a {ckpt.get('kind')!r} head, not {cls.kind!r}")
        head = cls(ckpt["in_dim"], ckpt["labels"], ckpt["hidden"], ckpt["dropout"])
        head.load_state_dict(ckpt["state_dict"], strict=True)
        return head

    def save(self, path: str | Path) -> None:
        torch.save(self.to_checkpoint(), path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Self:
        return cls.from_checkpoint(torch.load(path, map_location=map_location, weights_only=True))


class RaceHead(LabelledHead):
    """Single-label race classifier: logits [B, len(labels)] for cross-entropy."""

    kind = "race"
    default_labels = UTKFACE_RACES


class AttributeHead(LabelledHead):
    """Multi-label CelebA attribute classifier: one logit per attribute for BCE."""

    kind = "attributes"
    default_labels = CELEBA_ATTRIBUTES
