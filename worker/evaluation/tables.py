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


def ratio(rate: float | None, photo: float | None) -> float | None:
    """A re-identification rate as a fraction of the judge's own rate on the real photos
    of the same rows: 1.0 means the outputs carry what the judge reads in the photos."""
    if rate is None or photo is None or photo == 0:
        return None
    return rate / photo


def rates(hits: np.ndarray, photo_hits: np.ndarray) -> dict[str, Any]:
    """A cell of Table 2 or 3: the outputs' rate, the judge's rate on the real photos of
    the same rows, their ratio, and the number of rows."""
    rate, photo = accuracy(hits), accuracy(photo_hits)
    return {"rate": rate, "photo": photo, "ratio": ratio(rate, photo), "n": len(hits)}


def balanced_subsets(
    labels: np.ndarray, attributes: Sequence[str]
) -> tuple[dict[str, list[int]], list[str]]:
    """Per attribute, the rows Table 3 asks about: every row of its rarer value and as many
    of the other (the first ones, in sample order), so that a judge that always answers
    the majority value scores 50%. An attribute with a single value among the rows cannot
    be balanced and is left out (returned second, in ``attributes``' order)."""
    labels = np.asarray(labels)
    subsets: dict[str, list[int]] = {}
    excluded: list[str] = []
    for j, a in enumerate(attributes):
        positives = np.flatnonzero(labels[:, j] == 1) if len(labels) else np.array([], int)
        negatives = np.flatnonzero(labels[:, j] == 0) if len(labels) else np.array([], int)
        k = min(len(positives), len(negatives))
        if k == 0:
            excluded.append(a)
            continue
        subsets[a] = sorted(int(i) for i in (*positives[:k], *negatives[:k]))
    return subsets, excluded


# What the judge read on a strategy's outputs: (sample rows, predictions), row-aligned.
Readings = tuple[np.ndarray, np.ndarray]


def table2(
    predicted: Mapping[str, Readings],
    photo: np.ndarray,
    truth: np.ndarray,
    races: Sequence[str],
) -> dict[str, Any]:
    """Race re-identification: the judge's race of each output vs the photo's true race,
    overall and per race, each beside the judge's rate on the same rows' real photos
    (``photo``: its race per sample row). A strategy that ran on no row of a race has
    None there."""
    truth, photo = np.asarray(truth), np.asarray(photo)
    photo_row = {
        "overall": rates(photo == truth, photo == truth),
        "per_race": {
            name: rates(photo[truth == r] == r, photo[truth == r] == r)
            for r, name in enumerate(races)
        },
    }
    rows = {}
    for strategy, (where, pred) in predicted.items():
        where = np.asarray(where, dtype=int)
        t = truth[where]
        hits, photo_hits = np.asarray(pred) == t, photo[where] == t
        rows[strategy] = {
            "overall": rates(hits, photo_hits),
            "per_race": {
                name: rates(hits[t == r], photo_hits[t == r]) for r, name in enumerate(races)
            },
        }
    return {
        "rows": rows,
        "photo": photo_row,
        "n": len(truth),
        "n_per_race": {name: int(np.sum(truth == r)) for r, name in enumerate(races)},
    }


def table3(
    predicted: Mapping[str, Mapping[str, Readings]],
    photo: np.ndarray,
    truth: np.ndarray,
    attributes: Sequence[str],
    subsets: Mapping[str, Sequence[int]],
    excluded: Sequence[str] = (),
) -> dict[str, Any]:
    """Attribute re-identification: per strategy and attribute, the judge's 0/1 on each
    output vs the photo's label, beside its rate on the same rows' real photos
    (``photo``: (N, len(attributes)) 0/1 per sample row); averaged over the attributes
    with rows (``subsets``: each attribute's balanced rows)."""
    truth, photo = np.asarray(truth), np.asarray(photo)
    col = {a: j for j, a in enumerate(attributes)}

    def row_of(cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
        done = [c for c in cells.values() if c["n"]]
        rate = float(np.mean([c["rate"] for c in done])) if done else None
        photo_rate = float(np.mean([c["photo"] for c in done])) if done else None
        return {
            "per_attribute": cells,
            "average": {
                "rate": rate,
                "photo": photo_rate,
                "ratio": ratio(rate, photo_rate),
                "attributes": len(done),
            },
        }

    photo_cells = {}
    for a, where in subsets.items():
        hits = photo[list(where), col[a]] == truth[list(where), col[a]]
        photo_cells[a] = rates(hits, hits)
    rows = {}
    for strategy, by_attribute in predicted.items():
        cells = {}
        for a in subsets:
            ran, pred = by_attribute.get(a, (np.array([], int), np.array([], int)))
            ran = np.asarray(ran, dtype=int)
            t = truth[ran, col[a]]
            cells[a] = rates(np.asarray(pred) == t, photo[ran, col[a]] == t)
        rows[strategy] = row_of(cells)
    return {
        "rows": rows,
        "photo": row_of(photo_cells),
        "n": len(truth),
        "attributes": list(subsets),
        "excluded": list(excluded),
        "positives": {a: int(truth[list(w), col[a]].sum()) for a, w in subsets.items()},
        "rows_per_attribute": {a: len(w) for a, w in subsets.items()},
    }
