"""`likeness evaluate` end to end on a synthetic data root with tiny random networks:
every table and file, sane values, the requested N, the protocol (references, one
attribute per search, balanced attribute sets), a second run served by the cache, a
larger run that searches only what is new, and the figures: their own searches, their
grids, no held-out photo in them, and off with a count of 0."""

from __future__ import annotations

import csv
import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import worker.evaluation.figures as figures
import worker.evaluation.searches as searches
from cli.main import app
from likeness.labels import UTKFACE_RACES
from likeness.manifest import load_manifest
from tests.conftest import SHARED
from tests.evaluation.synthetic import TinyWeights, write_data_root, write_tiny_weights
from worker.evaluation.config import TABLE3_ATTRIBUTES
from worker.evaluation.plots import DPI, GridRow, grid_inches
from worker.evaluation.tables import PAIR_TYPES

# 3 held-out people with two photos and one with a single photo (write_data_root), all
# evaluated; UTKFace: 2 held-out images per race, 5 evaluated, then 7
PEOPLE, UTK_PER_RACE = 3, 2
CELEBA, UTK, UTK_MORE = PEOPLE + 1, len(UTKFACE_RACES), len(UTKFACE_RACES) + 2
# the figures' people: race swaps on 2 UTKFace thumbnails, attribute pairs on 1 CelebA-HQ one
SWAP, PAIR = 2, 1
FIGURES = ("grid.png", "lookalikes.png", "race_swaps.png", "attribute_pairs.png")
FILES = ("README.md", "results.json", "angles.png", "reidentification.png", *FIGURES)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyWeights]:
    d = tmp_path_factory.mktemp("evaluate")
    write_data_root(d / "data", PEOPLE, UTK_PER_RACE)
    return d, write_tiny_weights(d / "weights")


def evaluate(
    d: Path,
    weights: TinyWeights,
    out: str,
    *extra: str,
    utkface: int = UTK,
    figures: tuple[int, int] = (SWAP, PAIR),
) -> Any:
    args = [
        "evaluate",
        "--data-root",
        str(d / "data"),
        "--out",
        str(d / out),
        "--cache",
        str(d / "cache"),
        "--celeba",
        str(CELEBA),
        "--utkface",
        str(utkface),
        "--steps",
        "2",
        "--restarts",
        "2",
        "--batch",
        "3",
        "--seed",
        "7",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--swap-people",
        str(figures[0]),
        "--pair-people",
        str(figures[1]),
        *weights.options(),
        *extra,
    ]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def runs(setup: tuple[Path, TinyWeights]) -> dict[str, Any]:
    """The evaluation run four times (into four output folders), counting the searches:
    twice alike, then with more UTKFace images, then with the figures off. The first run
    also records the targets of every batch searched and what each figure drew."""
    d, weights = setup
    names = ("first", "second", "more", "off")
    calls: dict[str, list[int]] = {name: [] for name in names}
    targets: list[tuple[str, str, int, str | None, dict[str, int]]] = []
    drawn: dict[str, tuple[list[GridRow], list[str]]] = {}
    original, search_batch, grid = (
        searches.run_upscale,
        searches.search_batch,
        figures.qualitative_grid,
    )

    def recording(models: Any, samples: Any, jobs: Any, strategy: Any, *rest: Any) -> Any:
        races, attrs = searches.job_targets(strategy, samples, jobs)
        for job, race, attr in zip(jobs, races, attrs, strict=True):
            targets.append((samples.dataset, strategy.name, job.row, race, attr))
        return search_batch(models, samples, jobs, strategy, *rest)

    def drawing(rows: list[GridRow], columns: list[str], path: Path) -> None:
        drawn[path.name] = (list(rows), list(columns))
        grid(rows, columns, path)

    mp = pytest.MonkeyPatch()
    results = {}
    try:
        for name in names:

            def counting(*args: Any, name: str = name, **kwargs: Any) -> Any:
                calls[name].append(len(args[1]))
                return original(*args, **kwargs)

            mp.setattr(searches, "run_upscale", counting)
            if name == "first":
                mp.setattr(searches, "search_batch", recording)
                mp.setattr(figures, "qualitative_grid", drawing)
            else:
                mp.setattr(searches, "search_batch", search_batch)
                mp.setattr(figures, "qualitative_grid", grid)
            results[name] = evaluate(
                d,
                weights,
                name,
                utkface=UTK_MORE if name == "more" else UTK,
                figures=(0, 0) if name == "off" else (SWAP, PAIR),
            )
    finally:
        mp.undo()
    return {
        "dir": d,
        **results,
        **{f"{name}_calls": calls[name] for name in names},
        "targets": targets,
        "drawn": drawn,
    }


def results_of(runs: dict[str, Any], out: str = "first") -> Any:
    assert runs[out].exit_code == 0, runs[out].output
    return json.loads((runs["dir"] / out / "results.json").read_text())


def celeba_labels(d: Path) -> dict[str, dict[str, str]]:
    with open(d / "data" / "celebahq" / "labels.csv", newline="") as f:
        return {r["file"]: r for r in csv.DictReader(f)}


def expected_attribute_rows(d: Path, names: list[str]) -> dict[str, int]:
    """Per attribute, twice its rarer value's count among the evaluated photos (0: left out)."""
    labels = celeba_labels(d)
    counts = {}
    for a in TABLE3_ATTRIBUTES:
        positives = sum(labels[n][a] == "1" for n in names)
        counts[a] = 2 * min(positives, len(names) - positives)
    return counts


def test_every_file_is_written(runs: dict[str, Any]) -> None:
    results_of(runs)
    for name in FILES:
        assert (runs["dir"] / "first" / name).stat().st_size > 0, name
    readme = (runs["dir"] / "first" / "README.md").read_text()
    for heading in ("## Table 1", "## Table 2", "## Table 3", "## Weights", "likeness evaluate"):
        assert heading in readme
    assert "(paper)" in readme and "96.0%" in readme  # the paper's numbers beside ours
    assert "one attribute-value pair per search" in readme
    assert "of the judge's rate on the real photos" in readme  # the targets as ratios
    assert "cpu, torch" in readme and ", 1 thread;" in readme  # how it ran, in words
    assert "bicubic enlargement of the thumbnail (no search)" in readme  # the control row


def pair_searches(r: dict[str, Any], labels: dict[str, dict[str, str]]) -> int:
    """The attribute-pair figure's own searches: both values of each attribute on its
    people, less the photo's own value where Table 3's balanced set already has the row."""
    names = r["samples"]["celebahq"]["names"]
    return sum(
        not (labels[names[i]][a] == str(v) and i in r["table3_rows"].get(a, []))
        for i in range(PAIR)
        for a in TABLE3_ATTRIBUTES
        for v in (0, 1)
    )


def test_searches_run_once_per_job_in_batches(runs: dict[str, Any]) -> None:
    r = results_of(runs)
    attribute_jobs = sum(
        expected_attribute_rows(runs["dir"], r["samples"]["celebahq"]["names"]).values()
    )
    pairs = pair_searches(r, celeba_labels(runs["dir"]))
    assert 0 < pairs < 2 * len(TABLE3_ATTRIBUTES) * PAIR  # Table 3's searches are reused

    def batches(n: int) -> list[int]:
        return [min(3, n - s) for s in range(0, n, 3)]

    expected = (
        batches(CELEBA)  # no control: every person
        + batches(PEOPLE) * 2  # identity with F0 and with F: the people with a second photo
        + batches(attribute_jobs)  # one search per person and attribute of its balanced set
        + batches(UTK) * 2  # no control and race; the identity rows have no UTKFace image
        + batches(SWAP * (len(UTKFACE_RACES) - 1))  # race swaps: the races not the photo's
        + batches(pairs)  # attribute pairs: the values Table 3 did not search
    )
    assert sorted(runs["first_calls"]) == sorted(expected)
    assert r["searches"]["utkface/race-swaps"]["n"] == SWAP * (len(UTKFACE_RACES) - 1)
    assert r["searches"]["celebahq/attribute-pairs"]["n"] == pairs


def test_a_second_run_only_reads_the_cache(runs: dict[str, Any]) -> None:
    first, second = results_of(runs), results_of(runs, "second")
    assert runs["second_calls"] == []
    assert {"utkface/race-swaps", "celebahq/attribute-pairs"} <= set(second["searches"])
    for key in ("table1", "table2", "table3", "angles"):
        assert first[key] == second[key], key
    assert all(s["cached_jobs"] == s["n"] for s in second["searches"].values())
    assert all(s["batches_searched"] == 0 for s in second["searches"].values())


def test_a_larger_run_searches_only_the_new_images(runs: dict[str, Any]) -> None:
    first, more = results_of(runs), results_of(runs, "more")
    assert set(first["samples"]["utkface"]["names"]) < set(more["samples"]["utkface"]["names"])
    new = UTK_MORE - UTK
    assert sorted(runs["more_calls"]) == [new, new]  # no control and race, on the new ones
    assert more["searches"]["utkface/none"]["cached_jobs"] == UTK


def test_identity_references_are_other_photos_of_the_same_person(runs: dict[str, Any]) -> None:
    r = results_of(runs)
    cel, utk = r["samples"]["celebahq"], r["samples"]["utkface"]
    labels = celeba_labels(runs["dir"])
    pairs = list(zip(cel["names"], cel["reference_names"], strict=True))
    for name, ref in pairs:
        if ref is not None:
            assert ref != name and labels[ref]["identity"] == labels[name]["identity"]
    # the one held-out person with a single photo is skipped for the identity rows only
    assert cel["with_second_photo"] == PEOPLE and cel["skipped_for_identity"] == 1
    assert r["searches"]["celebahq/none"]["n"] == CELEBA
    assert r["searches"]["celebahq/identity-f"]["n"] == PEOPLE
    assert r["table1"]["rows"]["CelebA-Same"]["F"]["n"] == PEOPLE
    assert r["table1"]["rows"]["Lookalike-Ours"]["F"]["n"] == PEOPLE
    # UTKFace has no identities: no image has a second photo, so no identity search ran
    assert utk["with_second_photo"] == 0 and utk["skipped_for_identity"] == UTK
    assert r["searches"]["utkface/identity+race"]["n"] == 0
    assert r["table2"]["rows"]["identity+race"]["overall"]["n"] == 0
    both = next(c for c in r["targets"] if "identity and race" in c["target"])
    assert both["met"] is None and both["ours"].startswith("not measured")


def test_attribute_rows_are_balanced_and_single_valued_ones_left_out(
    runs: dict[str, Any],
) -> None:
    r = results_of(runs)
    names = r["samples"]["celebahq"]["names"]
    labels = celeba_labels(runs["dir"])
    expected = expected_attribute_rows(runs["dir"], names)
    t3 = r["table3"]
    assert t3["excluded"] == [a for a in TABLE3_ATTRIBUTES if expected[a] == 0]
    assert t3["attributes"] == [a for a in TABLE3_ATTRIBUTES if expected[a] > 0]
    for a in t3["attributes"]:
        rows = r["table3_rows"][a]
        assert len(rows) == expected[a] == t3["rows_per_attribute"][a]
        values = [labels[names[i]][a] for i in rows]
        assert values.count("1") == values.count("0") == t3["positives"][a]
        # the attribute objective searched each of these rows once, for this attribute
        assert t3["rows"]["attributes"]["per_attribute"][a]["n"] == expected[a]
        assert t3["rows"]["none"]["per_attribute"][a]["n"] == expected[a]
        # the bicubic control is read on every row of the balanced set, like plain PULSE
        assert t3["rows"]["bicubic"]["per_attribute"][a]["n"] == expected[a]
    assert r["searches"]["celebahq/attributes"]["n"] == sum(expected.values())


def in_unit(x: float | None) -> bool:
    return x is not None and 0.0 <= x <= 1.0


def test_tables_have_sane_values_and_the_requested_n(runs: dict[str, Any]) -> None:
    r = results_of(runs)
    assert r["samples"]["celebahq"]["n"] == CELEBA
    assert r["samples"]["utkface"]["n"] == UTK
    assert r["samples"]["utkface"]["per_race"] == dict.fromkeys(UTKFACE_RACES, 1)

    t1 = r["table1"]
    assert list(t1["rows"]) == list(PAIR_TYPES)
    for pair, by_ext in t1["rows"].items():
        for ext in ("F0", "F"):
            stats = by_ext[ext]
            assert stats["n"] == (CELEBA if pair == "PULSE-Pairs" else PEOPLE), (pair, ext)
            assert 0 <= stats["mean"] <= 180 and stats["sd"] >= 0
            assert all(0 <= a <= 180 for a in r["angles"][ext][pair])
    for ext in ("F0", "F"):
        for opt in ("opt1", "opt2"):
            o = t1["thresholds"][ext][opt]
            assert 0 <= o["threshold_deg"] <= 180
            assert in_unit(o["same_diff_accuracy"]) and in_unit(o["lookalike_baseline_accuracy"])

    t2 = r["table2"]
    assert set(t2["rows"]) == {"bicubic", "none", "identity-f", "race", "identity+race"}
    assert t2["n"] == UTK
    for name in ("bicubic", "none", "race"):
        cell = t2["rows"][name]["overall"]
        assert cell["n"] == UTK and in_unit(cell["rate"]) and in_unit(cell["photo"])
        # the judge's rate on the real photos beside each rate, on the same rows
        assert cell["photo"] == t2["photo"]["overall"]["rate"]
        if cell["photo"]:
            assert cell["ratio"] == pytest.approx(cell["rate"] / cell["photo"])

    t3 = r["table3"]
    assert set(t3["rows"]) == {"bicubic", "none", "identity-f0", "identity-f", "attributes"}
    assert t3["n"] == CELEBA
    for row in [*t3["rows"].values(), t3["photo"]]:
        assert list(row["per_attribute"]) == t3["attributes"]
        for cell in row["per_attribute"].values():
            assert in_unit(cell["rate"]) and in_unit(cell["photo"])
        if t3["attributes"]:
            assert in_unit(row["average"]["rate"])

    for s in r["searches"].values():
        if s["n"]:
            assert in_unit(s["accepted"]) and math.isfinite(s["mean_mse"])
    assert {w["role"] for w in r["weights"]} == {
        "generator",
        "F",
        "F0",
        "race judge",
        "attribute judge",
    }
    assert all(len(w["sha256"]) == 64 for w in r["weights"])
    assert r["command"].startswith("likeness evaluate ") and "--steps 2" in r["command"]

    checks = {c["target"]: c["met"] for c in r["targets"]}
    assert len(checks) == 4 and all(v is None or isinstance(v, bool) for v in checks.values())
    none, race = t2["rows"]["none"]["overall"]["rate"], t2["rows"]["race"]["overall"]["rate"]
    alone = next(k for k in checks if "alone above no control" in k)
    assert checks[alone] == (race > none)


def test_figures_ask_for_every_race_and_both_values_searching_nothing_twice(
    runs: dict[str, Any],
) -> None:
    results_of(runs)
    searched = runs["targets"]
    # the photo's own race or value is the tables' search, read back from its cache file
    keys = [(d, s, i, race, tuple(sorted(attrs.items()))) for d, s, i, race, attrs in searched]
    assert len(keys) == len(set(keys))
    for row in range(SWAP):
        races = {race for d, s, i, race, _ in searched if (d, s, i) == ("utkface", "race", row)}
        assert races == set(UTKFACE_RACES)
    for row in range(PAIR):
        for a in TABLE3_ATTRIBUTES:
            values = {
                attrs[a]
                for d, s, i, _, attrs in searched
                if (d, s, i) == ("celebahq", "attributes", row) and list(attrs) == [a]
            }
            assert values == {0, 1}, a


def test_figures_have_their_grids(runs: dict[str, Any]) -> None:
    r = results_of(runs)
    out, drawn = runs["dir"] / "first", runs["drawn"]
    assert set(drawn) == set(r["figures"]) == set(FIGURES)
    shapes = {
        "lookalikes.png": (PEOPLE, 3),  # PULSE, identity with F0, identity with F
        "race_swaps.png": (SWAP, 1 + len(UTKFACE_RACES)),  # PULSE, then each race asked
        "attribute_pairs.png": (PAIR, 2 * len(TABLE3_ATTRIBUTES)),  # each attribute on, off
    }
    for name, (n_rows, n_columns) in shapes.items():
        rows, columns = drawn[name]
        assert (len(rows), len(columns)) == (n_rows, n_columns), name
        for row in rows:  # every cell filled and captioned
            assert set(row.cells) == set(row.captions) == set(columns), name
        with Image.open(out / name) as png:
            size = grid_inches(n_rows, n_columns, captioned=True)
            assert png.size == (round(size[0] * DPI), round(size[1] * DPI)), name
        assert r["figures"][name]["captions"] == [
            [row.captions[c] for c in columns] for row in rows
        ]
        assert f"]({name})" in (out / "README.md").read_text()
    swaps, _ = drawn["race_swaps.png"]
    assert all(c.removeprefix("judge: ") in UTKFACE_RACES for c in swaps[0].captions.values())
    assert r["figures"]["race_swaps.png"]["names"] == r["samples"]["utkface"]["names"][:SWAP]
    pairs, _ = drawn["attribute_pairs.png"]
    for a in TABLE3_ATTRIBUTES:  # one of the two is the photo's own value
        own = ["photo's value" in pairs[0].captions[f"{a}: {v}"] for v in ("yes", "no")]
        assert sorted(own) == [False, True], a


def test_figures_show_no_held_out_photo(runs: dict[str, Any]) -> None:
    results_of(runs)
    d = runs["dir"]
    searched = [
        torch.load(f, weights_only=True)["pixels"].numpy()
        for pattern in ("celebahq-*.pt", "utkface-*.pt")
        for f in (d / "cache").glob(pattern)
    ]
    photos = []
    for dataset in ("celebahq", "utkface"):
        with zipfile.ZipFile(d / "data" / dataset / "images.zip") as zf:
            for member in zf.namelist():
                with Image.open(io.BytesIO(zf.read(member))) as image:
                    photos.append(np.asarray(image.convert("RGB").resize((32, 32)), int))
    for name, (rows, _) in runs["drawn"].items():
        for row in rows:
            assert row.thumbnail.shape == (16, 16, 3), name
            for cell in row.cells.values():
                assert any(np.array_equal(cell, face) for face in searched), name
                assert all(np.abs(cell - photo).mean() > 10 for photo in photos), name


def test_a_count_of_zero_turns_the_figures_off(runs: dict[str, Any]) -> None:
    r = results_of(runs, "off")
    out = runs["dir"] / "off"
    assert runs["off_calls"] == []
    assert set(r["figures"]) == {"grid.png", "lookalikes.png"}
    assert not (out / "race_swaps.png").exists() and not (out / "attribute_pairs.png").exists()
    assert not any(k.endswith(("race-swaps", "attribute-pairs")) for k in r["searches"])
    readme = (out / "README.md").read_text()
    assert "lookalikes.png" in readme and "race_swaps.png" not in readme
    assert "--swap-people 0 --pair-people 0" in r["command"]


def test_missing_judge_says_how_to_get_one(setup: tuple[Path, TinyWeights]) -> None:
    d, weights = setup
    result = evaluate(d, weights, "nojudge", "--race-judge", str(d / "absent.pt"))
    assert result.exit_code == 2
    assert "likeness train-judges" in result.output and "--race-judge" in result.output


def test_missing_data_says_where_it_looked(setup: tuple[Path, TinyWeights], tmp_path: Path) -> None:
    _, weights = setup
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--data-root",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--cache",
            str(tmp_path / "c"),
            "--quick",
            "--device",
            "cpu",
            *weights.options(),
        ],
    )
    assert result.exit_code == 2
    assert "images.zip" in result.output and "--data-root" in result.output


def bundled(kind: str, name: str | None = None) -> bool:
    return any(e.kind == kind and (name is None or e.name == name) for e in load_manifest().models)


@pytest.mark.data
@pytest.mark.slow
def test_quick_run_on_shared_data(tmp_path: Path) -> None:
    if not bundled("generator") or not bundled("extractor"):
        pytest.skip("no generator or no extractor F is bundled in weights/manifest.json")
    if not bundled("judge", "judge-race") or not bundled("judge", "judge-attributes"):
        pytest.skip("the judges are not bundled (likeness train-judges)")
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--quick",
            "--data-root",
            str(SHARED / "data"),
            "--f0",
            str(SHARED / "weights" / "mobilefacenet_casia_068.ckpt"),
            "--out",
            str(tmp_path / "out"),
            "--cache",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
            "--threads",
            "1",
            # --quick's own sizes (4 people, 5 images, 2 restarts) are for a smoke check by
            # hand; the smallest run that still fills every table keeps the suite fast
            "--celeba",
            "2",
            "--utkface",
            "1",
            "--restarts",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["samples"]["celebahq"]["n"] == 2 and r["samples"]["utkface"]["n"] == 1
    for c in r["targets"]:
        assert c["met"] in (None, True, False) and c["ours"]
    for name in FILES:
        assert (tmp_path / "out" / name).is_file()
