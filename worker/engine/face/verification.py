"""Face verification by angle: two faces are the same person when the angle
between their embeddings is at most θ_t (PAPER.md §2).

NumPy only: anything holding angles in degrees (tensors, arrays, lists) can
use it, so training, evaluation and the benchmarks share one threshold search.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["best_angle_threshold", "threshold_accuracy"]


def _degrees(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, maybe on a GPU or needing grad
        values = values.detach().cpu().numpy()
    angles = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all((angles >= 0.0) & (angles <= 180.0)):  # also refuses NaN
        raise ValueError("angles must be degrees in [0, 180]")
    return angles


def threshold_accuracy(same_angles: Any, diff_angles: Any, theta_deg: float) -> float:
    """Fraction of pairs that ``theta_deg`` labels right: same-person pairs at
    most θ apart, different-person pairs more than θ apart."""
    same, diff = _degrees(same_angles), _degrees(diff_angles)
    if len(same) + len(diff) == 0:
        raise ValueError("threshold_accuracy needs at least one pair")
    correct = np.sum(same <= theta_deg) + np.sum(diff > theta_deg)
    return float(correct / (len(same) + len(diff)))


def best_angle_threshold(same_angles: Any, diff_angles: Any) -> tuple[float, float]:
    """θ_t with the best same/different accuracy on these pairs, and that accuracy.

    Brute force over every threshold that labels the pairs differently: cut k
    calls the k smallest angles "same", and θ_t is the middle of the gap the cut
    falls in, which leaves the most margin on both sides. Ties go to the
    smallest θ. ``threshold_accuracy`` of the result equals the accuracy returned.
    """
    same, diff = _degrees(same_angles), _degrees(diff_angles)
    angles = np.concatenate([same, diff])
    if len(angles) == 0:
        raise ValueError("best_angle_threshold needs at least one pair")
    is_same = np.concatenate([np.ones(len(same), bool), np.zeros(len(diff), bool)])
    order = np.argsort(angles, kind="stable")
    sorted_angles, sorted_same = angles[order], is_same[order]
    # correct[k] for k = 0..n: same pairs among the k smallest + different ones above them.
    same_below = np.concatenate([[0], np.cumsum(sorted_same)])
    diff_above = len(diff) - np.concatenate([[0], np.cumsum(~sorted_same)])
    correct = same_below + diff_above
    edges = np.concatenate([[0.0], sorted_angles, [180.0]])
    low, high = edges[:-1], edges[1:]
    # No threshold splits equal angles: such a cut is not one a θ can make.
    correct = np.where(low < high, correct, -1)
    k = int(np.argmax(correct))
    return float((low[k] + high[k]) / 2), float(correct[k] / len(angles))
