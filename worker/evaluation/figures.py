"""The qualitative figures: one per table, as in the paper, and an overview grid.

Only generated faces and the 16×16 thumbnails they came from are drawn, never a
held-out photo (those stay out of the repository); the captions carry what F,
F0 or a judge reads in the drawn faces.

- ``grid.png``: the first rows of each data set under every strategy
- ``lookalikes.png`` (Table 1): plain PULSE and the identity objective through F0
  and through F, each captioned with its angle to the person's photo I under F0 and F
- ``race_swaps.png`` (Table 2): plain PULSE and the race objective asking for each
  race, captioned with the race judge's reading
- ``attribute_pairs.png`` (Table 3): the attribute objective asking for each
  attribute on and off, captioned with the attribute judge's reading

The last two need searches of their own (other races and values than the photo's):
they are planned here as jobs of the race and attribute strategies, so they run
batched and cached like the tables' (the photo's own race or value is the tables'
search, read from its cache file).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from likeness.labels import UTKFACE_RACES
from worker.engine.objectives import ObjectiveWeights
from worker.evaluation.config import TABLE3_ATTRIBUTES, EvalConfig
from worker.evaluation.measures import (
    angles_deg,
    attribute_predictions,
    embed,
    race_predictions,
)
from worker.evaluation.models import Models
from worker.evaluation.plots import GridRow, qualitative_grid
from worker.evaluation.samples import Samples
from worker.evaluation.searches import (
    ATTRIBUTES,
    RACE,
    Outputs,
    Plan,
    attribute_pair_jobs,
    images_by_file,
    plan_strategy,
    race_swap_jobs,
)
from worker.pipeline import to_pixels

GRID_ROWS = 3  # per data set
# The grid's columns: strategy name → column title.
GRID_COLUMNS = {
    "none": "PULSE",
    "identity-f0": "identity (F0)",
    "identity-f": "identity (F)",
    "race": "race",
    "attributes": "one attribute",
    "identity+race": "identity + race",
}
LOOKALIKE_ROWS = 4  # no search of its own: the people of Table 1 with a second photo
LOOKALIKE_COLUMNS = {k: GRID_COLUMNS[k] for k in ("none", "identity-f0", "identity-f")}

# What the figures' own searches are filed under (results.json's "searches").
RACE_SWAPS = "race-swaps"
ATTRIBUTE_PAIRS = "attribute-pairs"
FIGURE_LABELS = {
    RACE_SWAPS: "race objective, races other than the photo's (race_swaps.png)",
    ATTRIBUTE_PAIRS: "attribute objective, values Table 3 did not search (attribute_pairs.png)",
}

# (data set, strategy or figure name) → its outputs, as run.py gathers them
OutputsByName = Mapping[tuple[str, str], Outputs]


def to_pixel_array(image: Tensor) -> np.ndarray:
    """One (3, H, W) image in [0, 1] as an (H, W, 3) uint8 array."""
    return to_pixels(image[None])[0]


def row_image(out: Outputs, row: int) -> Tensor | None:
    """The output of ``out``'s first job on ``row``; None if it ran none there."""
    jobs = [k for k, j in enumerate(out.jobs) if j.row == row]
    return out.images[jobs[0]] if jobs else None


def plan_rows(plan: Plan) -> list[int]:
    """The sample rows a figure's plan shows, in its order."""
    return list(dict.fromkeys(j.row for j in plan.jobs))


def figure_plans(
    models: Models,
    config: EvalConfig,
    celeba: Samples,
    utk: Samples,
    weights: ObjectiveWeights,
) -> dict[str, Plan]:
    """Every search the race-swap and attribute-pair figures show, in figure order (none
    for a figure turned off by a count of 0), the tables' own included: run them
    ``without`` the tables' cache files, look their images up by file."""
    wanted = {
        RACE_SWAPS: (utk, RACE, race_swap_jobs(utk, config.swap_people)),
        ATTRIBUTE_PAIRS: (celeba, ATTRIBUTES, attribute_pair_jobs(celeba, config.pair_people)),
    }
    return {
        name: plan_strategy(
            models,
            samples,
            strategy,
            jobs,
            config.steps,
            config.restarts,
            config.cache,
            weights,
            name,
        )
        for name, (samples, strategy, jobs) in wanted.items()
        if jobs
    }


def captioned_row(
    label: str,
    thumbnail: np.ndarray,
    images: dict[str, Tensor],
    captions: Callable[[Tensor], Sequence[str]],
) -> GridRow:
    """A row of outputs (column → image), each captioned by ``captions`` of them all."""
    read = captions(torch.stack(list(images.values())))
    return GridRow(
        label,
        thumbnail,
        {c: to_pixel_array(image) for c, image in images.items()},
        dict(zip(images, read, strict=True)),
    )


def grid_rows(celeba: Samples, utk: Samples, outputs: OutputsByName) -> list[GridRow]:
    """The first rows of each set (CelebA-HQ: of the people with a second photo, so the
    identity columns are filled); a strategy with several jobs on a row shows the first."""
    rows = []
    for samples, label in ((celeba, "CelebA-HQ"), (utk, "UTKFace")):
        shown = (samples.with_reference or list(range(len(samples))))[:GRID_ROWS]
        for n, i in enumerate(shown):
            cells = {}
            for (dataset, strategy), out in outputs.items():
                image = row_image(out, i) if strategy in GRID_COLUMNS else None
                if dataset == samples.dataset and image is not None:
                    cells[GRID_COLUMNS[strategy]] = to_pixel_array(image)
            rows.append(GridRow(f"{label} #{n + 1}", samples.thumbnails[i], cells))
    return rows


def lookalike_rows(models: Models, celeba: Samples, outputs: OutputsByName) -> list[GridRow]:
    """Table 1's faces for the first people with a second photo, each captioned with its
    angle to the person's photo I (the table's measure) under F0 and F."""
    shown = celeba.with_reference[:LOOKALIKE_ROWS]
    photos = {
        name: embed(ext, celeba.photos[shown]) for name, ext in (("F0", models.f0), ("F", models.f))
    }
    rows = []
    for n, i in enumerate(shown):
        images = {}
        for strategy, column in LOOKALIKE_COLUMNS.items():
            image = row_image(outputs["celebahq", strategy], i)
            if image is not None:
                images[column] = image

        def angles(faces: Tensor, n: int = n) -> list[str]:
            by = {
                name: angles_deg(photos[name][n : n + 1].expand(len(faces), -1), embed(ext, faces))
                for name, ext in (("F0", models.f0), ("F", models.f))
            }
            return [f"F0 {a0:.0f}° · F {a:.0f}°" for a0, a in zip(by["F0"], by["F"], strict=True)]

        rows.append(captioned_row(f"CelebA-HQ #{n + 1}", celeba.thumbnails[i], images, angles))
    return rows


def race_column(race: str) -> str:
    return f"asked {race}"


def race_swap_rows(
    models: Models, utk: Samples, plan: Plan, images: Mapping[str, Tensor], outputs: OutputsByName
) -> list[GridRow]:
    """Per person of the plan: plain PULSE and the race objective asking for each race,
    captioned with the race the judge reads."""

    def judged(faces: Tensor) -> list[str]:
        return [f"judge: {UTKFACE_RACES[p]}" for p in race_predictions(models.race_judge, faces)]

    rows = []
    for n, i in enumerate(plan_rows(plan)):
        cells = {}
        plain = row_image(outputs["utkface", "none"], i)
        if plain is not None:
            cells["PULSE"] = plain
        for job, path in zip(plan.jobs, plan.paths, strict=True):
            if job.row == i and job.race is not None:
                cells[race_column(job.race)] = images[path.name]
        true = UTKFACE_RACES[int(utk.labels[i])]
        rows.append(captioned_row(f"UTKFace #{n + 1} ({true})", utk.thumbnails[i], cells, judged))
    return rows


def pair_column(attribute: str, value: int) -> str:
    return f"{attribute}: {'yes' if value else 'no'}"


def attribute_pair_rows(
    models: Models, celeba: Samples, plan: Plan, images: Mapping[str, Tensor]
) -> list[GridRow]:
    """Per person of the plan: the attribute objective asking for each attribute on and
    off, captioned with the judge's reading of that attribute (and which of the two is
    the photo's own value)."""
    rows = []
    for n, i in enumerate(plan_rows(plan)):
        asked = [
            (job.attribute, job.value, images[path.name])
            for job, path in zip(plan.jobs, plan.paths, strict=True)
            if job.row == i and job.attribute is not None and job.value is not None
        ]

        def judged(
            faces: Tensor, asked: list[tuple[str, int, Tensor]] = asked, i: int = i
        ) -> list[str]:
            read = attribute_predictions(models.attribute_judge, faces, TABLE3_ATTRIBUTES)
            lines = []
            for k, (attribute, value, _) in enumerate(asked):
                column = TABLE3_ATTRIBUTES.index(attribute)
                line = f"judge: {'yes' if read[k, column] else 'no'}"
                own = value == int(celeba.labels[i, column])
                lines.append(line + (" (photo's value)" if own else ""))
            return lines

        cells = {pair_column(a, v): image for a, v, image in asked}
        rows.append(captioned_row(f"CelebA-HQ #{n + 1}", celeba.thumbnails[i], cells, judged))
    return rows


def write_figures(
    models: Models,
    celeba: Samples,
    utk: Samples,
    outputs: OutputsByName,
    figures: Mapping[str, Plan],
    out: Path,
) -> dict[str, dict[str, Any]]:
    """grid.png and each table's figure into ``out`` (a figure whose plan is absent is
    off); per file written, what results.json records of it: the rows' photos (by
    name), the columns, the captions, and where its own searches are counted."""
    written: dict[str, dict[str, Any]] = {}

    def write(
        name: str,
        rows: list[GridRow],
        columns: list[str],
        samples: Samples | None,
        shown: Sequence[int] = (),
        searches: str | None = None,
    ) -> None:
        if not rows:  # e.g. no held-out person with a second photo: nothing to draw
            return
        qualitative_grid(rows, columns, out / name)
        written[name] = {
            "rows": [r.label for r in rows],
            "names": [samples.names[i] for i in shown] if samples is not None else None,
            "columns": columns,
            "captions": [[r.captions.get(c) for c in columns] for r in rows],
            "searches": searches,
        }

    write("grid.png", grid_rows(celeba, utk, outputs), list(GRID_COLUMNS.values()), None)
    write(
        "lookalikes.png",
        lookalike_rows(models, celeba, outputs),
        list(LOOKALIKE_COLUMNS.values()),
        celeba,
        celeba.with_reference[:LOOKALIKE_ROWS],
    )
    images = images_by_file(outputs.values())
    if RACE_SWAPS in figures:
        plan = figures[RACE_SWAPS]
        write(
            "race_swaps.png",
            race_swap_rows(models, utk, plan, images, outputs),
            ["PULSE", *map(race_column, UTKFACE_RACES)],
            utk,
            plan_rows(plan),
            f"utkface/{RACE_SWAPS}",
        )
    if ATTRIBUTE_PAIRS in figures:
        plan = figures[ATTRIBUTE_PAIRS]
        write(
            "attribute_pairs.png",
            attribute_pair_rows(models, celeba, plan, images),
            [pair_column(a, v) for a in TABLE3_ATTRIBUTES for v in (1, 0)],
            celeba,
            plan_rows(plan),
            f"celebahq/{ATTRIBUTE_PAIRS}",
        )
    return written
