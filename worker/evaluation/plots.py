"""PNG figures of an evaluation (matplotlib, Agg: no display needed).

Only generated faces and the 16×16 thumbnails they came from are drawn: the
held-out photos themselves stay out of the repository.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.evaluation.tables import PAIR_TYPES

DPI = 120


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and servers have no display
    import matplotlib.pyplot as plt

    return plt


def angle_histograms(
    angles: Mapping[str, Mapping[str, np.ndarray]], thresholds: Mapping[str, float], path: Path
) -> None:
    """The paper's Fig. 5: per extractor, the angle histogram of each pair type, with
    the Opt-1 threshold (fitted on Same + Diff) as a dashed line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(angles), figsize=(6 * len(angles), 4), squeeze=False)
    bins = np.linspace(0, 180, 46)
    for ax, (ext, by_pair) in zip(axes[0], angles.items(), strict=True):
        for pair in PAIR_TYPES:
            values = np.asarray(by_pair[pair])
            ax.hist(values, bins=bins, alpha=0.45, label=f"{pair} (N={len(values)})")
        ax.axvline(
            thresholds[ext],
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"θ Opt 1 = {thresholds[ext]:.1f}°",
        )
        ax.set_title(f"angle between features under {ext}")
        ax.set_xlabel("degrees")
        ax.set_ylabel("pairs")
        ax.set_xlim(0, 180)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def reidentification_bars(
    table2: Mapping[str, Any],
    table3: Mapping[str, Any],
    labels: Mapping[str, str],
    paper: Mapping[str, Mapping[str, float]],
    path: Path,
) -> None:
    """Tables 2 and 3 at a glance: overall race and average attribute accuracy per
    strategy (bars), the judge's on the real photos (dotted line) and the paper's (black
    ticks, percent in ``paper["table2"|"table3"]``); a strategy with no rows is left out."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (
        (
            axes[0],
            {s: r["overall"]["rate"] for s, r in table2["rows"].items() if r["overall"]["n"]},
            table2["photo"]["overall"]["rate"],
            paper["table2"],
            f"race re-identification (UTKFace, N={table2['n']})",
        ),
        (
            axes[1],
            {
                s: r["average"]["rate"]
                for s, r in table3["rows"].items()
                if r["average"]["attributes"]
            },
            table3["photo"]["average"]["rate"],
            paper["table3"],
            f"attribute re-identification (CelebA-HQ, N={table3['n']})",
        ),
    )
    for ax, values, photo, theirs, title in panels:
        names = list(values)
        heights = [np.nan if values[s] is None else 100 * values[s] for s in names]
        bars = ax.bar(range(len(names)), heights, color="tab:blue", label="ours")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        marked = [(i, theirs[s]) for i, s in enumerate(names) if s in theirs]
        ax.scatter(
            [i for i, _ in marked],
            [v for _, v in marked],
            marker="_",
            s=600,
            color="black",
            label="paper",
            zorder=3,
        )
        if photo is not None:
            ax.axhline(
                100 * photo, color="tab:green", linestyle=":", label="judge on the real photos"
            )
        ax.legend(fontsize=8, loc="upper left")
        ax.set_xticks(
            range(len(names)),
            [labels.get(s, s) for s in names],
            rotation=20,
            ha="right",
            fontsize=8,
        )
        ax.set_ylim(0, 105)
        ax.set_ylabel("judge accuracy (%)")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


@dataclass
class GridRow:
    label: str  # e.g. "CelebA-HQ #3"
    thumbnail: np.ndarray  # (t, t, 3) uint8
    cells: dict[str, np.ndarray]  # column → (R, R, 3) uint8 output; absent: not run
    captions: dict[str, str] = field(default_factory=dict)  # column → a line under its cell


def grid_inches(rows: int, columns: int, captioned: bool) -> tuple[float, float]:
    """The figure size of ``qualitative_grid`` for ``rows`` × ``columns`` outputs (the
    thumbnail column added), with room for a line under each cell if ``captioned``."""
    return 1.6 * (columns + 1), (1.95 if captioned else 1.7) * rows


def nearest_upscale(thumbnail: np.ndarray, size: int) -> np.ndarray:
    """Blocky on purpose: shows exactly the pixels the search was given."""
    factor = max(1, size // thumbnail.shape[0])
    return np.repeat(np.repeat(thumbnail, factor, axis=0), factor, axis=1)


def qualitative_grid(rows: Sequence[GridRow], columns: Sequence[str], path: Path) -> None:
    """Per row: the thumbnail (nearest-upscaled), then one output per column, with its
    caption if the row has one; a column without an output on a row is left blank."""
    plt = _pyplot()
    size = max((c.shape[0] for r in rows for c in r.cells.values()), default=64)
    fig, axes = plt.subplots(
        len(rows),
        len(columns) + 1,
        squeeze=False,
        figsize=grid_inches(len(rows), len(columns), any(r.captions for r in rows)),
    )
    t = rows[0].thumbnail.shape[0] if rows else 16
    for i, row in enumerate(rows):
        axes[i][0].imshow(nearest_upscale(row.thumbnail, size), interpolation="nearest")
        axes[i][0].set_ylabel(row.label, fontsize=7)
        for j, column in enumerate(columns, start=1):
            if column in row.cells:
                axes[i][j].imshow(row.cells[column])
            if column in row.captions:
                axes[i][j].set_xlabel(row.captions[column], fontsize=6)
        for j, title in enumerate([f"{t}×{t} thumbnail", *columns]):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
            if j > 0 and columns[j - 1] not in row.cells:
                ax.set_facecolor("#eeeeee")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
