"""The numbers of Tables 1–3 (PAPER.md §4) from angles and judge predictions.

NumPy only; the threshold search and the threshold accuracy are the project's
one implementation (worker/engine/face/verification.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from worker.engine.face.verification import best_angle_threshold, threshold_accuracy

# Table 1's rows, in the paper's order.
PAIR_TYPES: tuple[str, ...] = (
    "CelebA-Same",
    "CelebA-Diff",
    "PULSE-Pairs",
    "Lookalike-Baseline",
    "Lookalike-Ours",
)


def angle_stats(angles: np.ndarray) -> dict[str, float | int]:
    """Mean ± SD (population SD, as the extractor's metrics) in degrees, and N."""
    a = np.asarray(angles, dtype=np.float64)
    if len(a) == 0:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": float(a.mean()), "sd": float(a.std()), "n": len(a)}


def threshold_options(angles: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """One threshold θ separating same from different people, fitted two ways.

    Opt 1: on CelebA Same + Diff only. Opt 2: on Same + Diff + Lookalike-Baseline,
    the lookalikes counted as different people (they only downscale alike). Each is
    scored on Same + Diff and on Lookalike-Baseline (the fraction called "different").
    """
    same, diff, look = (angles["CelebA-Same"], angles["CelebA-Diff"], angles["Lookalike-Baseline"])
    fits = {"opt1": (same, diff), "opt2": (same, np.concatenate([diff, look]))}
    out: dict[str, dict[str, float]] = {}
    for name, (fit_same, fit_diff) in fits.items():
        theta, fit_accuracy = best_angle_threshold(fit_same, fit_diff)
        out[name] = {
            "threshold_deg": theta,
            "fit_accuracy": fit_accuracy,
            "same_diff_accuracy": threshold_accuracy(same, diff, theta),
            "lookalike_baseline_accuracy": threshold_accuracy([], look, theta),
        }
    return out


def table1(angles: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """``angles[extractor][pair type]`` (extractor "F0" or "F") → rows and thresholds."""
    return {
        "rows": {
            pair: {ext: angle_stats(by_pair[pair]) for ext, by_pair in angles.items()}
            for pair in PAIR_TYPES
        },
        "thresholds": {ext: threshold_options(by_pair) for ext, by_pair in angles.items()},
    }


def accuracy(hits: np.ndarray) -> float | None:
    return float(np.mean(hits)) if len(hits) else None


def table2(
    predicted: Mapping[str, np.ndarray], truth: np.ndarray, races: Sequence[str]
) -> dict[str, Any]:
    """Race re-identification: the judge's race of each output vs the photo's true race,
    overall and per race (None where the sample has no one of that race)."""
    truth = np.asarray(truth)
    rows = {}
    for strategy, pred in predicted.items():
        hits = np.asarray(pred) == truth
        rows[strategy] = {
            "overall": accuracy(hits),
            "per_race": {name: accuracy(hits[truth == r]) for r, name in enumerate(races)},
        }
    return {
        "rows": rows,
        "n": len(truth),
        "n_per_race": {name: int(np.sum(truth == r)) for r, name in enumerate(races)},
    }


def table3(
    predicted: Mapping[str, np.ndarray], truth: np.ndarray, attributes: Sequence[str]
) -> dict[str, Any]:
    """Attribute re-identification: the judge's 0/1 on each output vs the photo's label,
    per attribute and averaged over the attributes."""
    truth = np.asarray(truth)
    rows = {}
    for strategy, pred in predicted.items():
        per = (
            (np.asarray(pred) == truth).mean(0) if len(truth) else np.full(len(attributes), np.nan)
        )
        rows[strategy] = {
            "per_attribute": {a: float(v) for a, v in zip(attributes, per, strict=True)},
            "average": float(np.mean(per)),
        }
    return {
        "rows": rows,
        "n": len(truth),
        "positives": {a: int(truth[:, j].sum()) for j, a in enumerate(attributes)},
    }
