"""F's verification angle θ_t and the heads' scores on held-out people."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from worker.engine.face.extractor import FaceExtractor, angle
from worker.engine.face.verification import best_angle_threshold, threshold_accuracy
from worker.training.extractor.data import Data


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Non-interpolated AP (as sklearn's): mean precision at each positive's rank."""
    order = torch.argsort(scores, descending=True, stable=True)
    hits = labels[order].float()
    if hits.sum() == 0:
        return float("nan")
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


@torch.no_grad()
def _predict(
    ext: FaceExtractor,
    dataset: Dataset,
    limit: int,
    device: torch.device,
    fn: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    n = min(limit, len(dataset))  # type: ignore[arg-type]
    # An evenly spaced subset: deterministic and not biased to the first names.
    idx = torch.linspace(0, len(dataset) - 1, n).long().unique().tolist()  # type: ignore[arg-type]
    loader = DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=64)
    outs, ys = [], []
    for x, y in loader:
        outs.append(fn(ext.crop_features(x.to(device))).float().cpu())
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def same_diff_pairs(identities: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Index pairs [P, 2]: consecutive photos of each person (same) and as many
    random pairs of different people (diff)."""
    same = []
    for person in identities.unique():
        where = (identities == person).nonzero().flatten()
        same += [(int(a), int(b)) for a, b in zip(where[:-1], where[1:], strict=True)]
    g = torch.Generator().manual_seed(seed)
    diff: list[tuple[int, int]] = []
    n = len(identities)
    for _ in range(20 * max(len(same), 1)):
        if len(diff) >= len(same) or n < 2:
            break
        a, b = torch.randint(n, (2,), generator=g).tolist()
        if identities[a] != identities[b]:
            diff.append((a, b))
    return (
        torch.tensor(same, dtype=torch.long).view(-1, 2),
        torch.tensor(diff, dtype=torch.long).view(-1, 2),
    )


def pair_angles(embeddings: Tensor, identities: Tensor) -> tuple[Tensor, Tensor]:
    """Angles (degrees) of the same-person and the different-person pairs of ``same_diff_pairs``."""

    def angles(pairs: Tensor) -> Tensor:
        return angle(embeddings[pairs[:, 0]], embeddings[pairs[:, 1]], degrees=True)

    same, diff = same_diff_pairs(identities)
    return angles(same), angles(diff)


def verification(fit: tuple[Tensor, Tensor], held_out: tuple[Tensor, Tensor]) -> dict[str, Any]:
    """θ_t fitted on training people's (same, diff) angles, with its accuracy there and
    on held-out people's; None where a side has no pairs."""
    if min(len(a) for a in fit) == 0:
        return {"threshold_deg": None, "threshold_fit_accuracy": None, "threshold_accuracy": None}
    theta, fit_accuracy = best_angle_threshold(*fit)
    held = threshold_accuracy(*held_out, theta) if sum(len(a) for a in held_out) else None
    return {
        "threshold_deg": theta,
        "threshold_fit_accuracy": fit_accuracy,
        "threshold_accuracy": held,
        "threshold_pairs": {
            "fit": sum(len(a) for a in fit),
            "held_out": sum(len(a) for a in held_out),
        },
    }


@torch.no_grad()
def evaluate(ext: FaceExtractor, data: Data, limit: int, device: torch.device) -> dict[str, Any]:
    """Race top-1, attribute mAP, Same/Diff angles (degrees) on held-out people, and θ_t
    (fitted on training people) with its held-out accuracy."""
    was_training = ext.training
    ext.eval()
    race_logits, race_y = _predict(ext, data.eval_race, limit, device, ext.race_head)
    attr_logits, attr_y = _predict(ext, data.eval_attributes, limit, device, ext.attribute_head)
    emb, ids = _predict(ext, data.eval_identity, limit, device, lambda f: f)
    fit_emb, fit_ids = _predict(ext, data.threshold_identity, limit, device, lambda f: f)
    aps = [average_precision(attr_logits[:, j], attr_y[:, j]) for j in range(attr_y.shape[1])]
    valid = [a for a in aps if not math.isnan(a)]
    same, diff = pair_angles(emb, ids)

    def stats(a: Tensor) -> dict[str, float]:
        if len(a) == 0:
            return {"mean": float("nan"), "sd": float("nan"), "pairs": 0}
        return {"mean": float(a.mean()), "sd": float(a.std(unbiased=False)), "pairs": len(a)}

    ext.train(was_training)
    return {
        "race_top1": float((race_logits.argmax(1) == race_y).float().mean()),
        "attribute_map": float(np.mean(valid)) if valid else float("nan"),
        "attribute_ap": {n: ap for n, ap in zip(ext.attribute_head.labels, aps, strict=True)},
        "angle_same": stats(same),
        "angle_diff": stats(diff),
        **verification(pair_angles(fit_emb, fit_ids), (same, diff)),
        "samples": {
            "race": len(race_y),
            "attributes": len(attr_y),
            "identity": len(ids),
            "threshold_fit": len(fit_ids),
        },
    }
