"""The pieces of `likeness evaluate` that need no search: tables, options, framing, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from likeness.labels import UTKFACE_RACES
from worker.engine.face.ffhq_frame import soft_pad
from worker.engine.objectives import ObjectiveWeights
from worker.evaluation.config import QUICK, EvalConfig
from worker.evaluation.samples import make_thumbnails, thumbnail_seed
from worker.evaluation.tables import angle_stats, table1, table2, table3, threshold_options


def test_threshold_options_fit_with_and_without_lookalikes() -> None:
    angles = {
        "CelebA-Same": np.array([10.0, 20.0, 30.0]),
        "CelebA-Diff": np.array([80.0, 85.0, 90.0]),
        "Lookalike-Baseline": np.array([25.0, 40.0]),
    }
    opts = threshold_options(angles)
    # Opt 1 sees only Same + Diff: the widest gap's middle, perfect there, blind to lookalikes
    assert opts["opt1"]["threshold_deg"] == pytest.approx(55.0)
    assert opts["opt1"]["same_diff_accuracy"] == 1.0
    assert opts["opt1"]["lookalike_baseline_accuracy"] == 0.0
    # Opt 2 counts lookalikes as different: a lower θ, trading a Same pair for both lookalikes
    assert opts["opt2"]["threshold_deg"] == pytest.approx(22.5)
    assert opts["opt2"]["fit_accuracy"] == pytest.approx(7 / 8)
    assert opts["opt2"]["same_diff_accuracy"] == pytest.approx(5 / 6)
    assert opts["opt2"]["lookalike_baseline_accuracy"] == 1.0


def test_table1_rows_per_extractor() -> None:
    pairs = {
        p: np.array([30.0, 50.0])
        for p in (
            "CelebA-Same",
            "CelebA-Diff",
            "PULSE-Pairs",
            "Lookalike-Baseline",
            "Lookalike-Ours",
        )
    }
    t = table1({"F0": pairs, "F": pairs})
    assert t["rows"]["PULSE-Pairs"]["F"] == {"mean": 40.0, "sd": 10.0, "n": 2}
    assert set(t["thresholds"]) == {"F0", "F"}
    assert angle_stats(np.array([]))["n"] == 0


def test_table2_per_race_and_overall() -> None:
    truth = np.array([0, 0, 1, 2])
    t = table2({"none": np.array([0, 1, 1, 0])}, truth, UTKFACE_RACES)
    row = t["rows"]["none"]
    assert row["overall"] == 0.5
    assert row["per_race"] == {
        "White": 0.5,
        "Black": 1.0,
        "Asian": 0.0,
        "Indian": None,
        "Others": None,
    }
    assert t["n_per_race"]["White"] == 2 and t["n"] == 4


def test_table3_per_attribute_and_average() -> None:
    truth = np.array([[1, 0], [0, 0]])
    t = table3({"attributes": np.array([[1, 1], [0, 0]])}, truth, ("Male", "Smiling"))
    assert t["rows"]["attributes"]["per_attribute"] == {"Male": 1.0, "Smiling": 0.5}
    assert t["rows"]["attributes"]["average"] == 0.75
    assert t["positives"] == {"Male": 1, "Smiling": 0}


def test_quick_sizes_apply_only_where_no_option_is_given() -> None:
    quick = EvalConfig.with_quick(True, steps=7, celeba=None)
    assert quick.steps == 7 and quick.celeba == QUICK["celeba"]
    assert quick.restarts == QUICK["restarts"]
    full = EvalConfig.with_quick(False)
    assert (full.celeba, full.utkface, full.steps, full.restarts, full.batch) == (25, 25, 100, 4, 8)
    assert "--steps 7" in quick.command() and "--celeba 4" in quick.command()


def test_steering_options_reach_the_command_and_the_objectives() -> None:
    from worker.evaluation.run import steering_settings

    plain = EvalConfig()
    assert not any(o in plain.command() for o in ("--views", "-weight"))
    assert steering_settings(plain) == ObjectiveWeights()
    config = EvalConfig(views=4, identity_weight=20.0, attr_weight=0.5)
    command = config.command()
    assert "--views 4" in command and "--identity-weight 20.0" in command
    assert "--attr-weight 0.5" in command and "--race-weight" not in command
    assert steering_settings(config) == ObjectiveWeights(views=4, identity=20.0, attributes=0.5)


def test_soft_pad_keeps_the_image_and_fades_to_its_mean() -> None:
    images = torch.rand(2, 3, 16, 16)
    padded = soft_pad(images, 16)
    assert padded.shape == (2, 3, 48, 48)
    torch.testing.assert_close(padded[:, :, 16:32, 16:32], images)
    torch.testing.assert_close(padded[:, :, 0, 0], images.mean((2, 3)))


def test_seeds_depend_on_the_thumbnail_not_the_strategy() -> None:
    assert thumbnail_seed(0, "celebahq", "a.webp") == thumbnail_seed(0, "celebahq", "a.webp")
    assert thumbnail_seed(0, "celebahq", "a.webp") != thumbnail_seed(0, "celebahq", "b.webp")
    assert thumbnail_seed(0, "celebahq", "a.webp") != thumbnail_seed(1, "celebahq", "a.webp")


def test_thumbnails_are_8_bit_and_16_px() -> None:
    thumbs = make_thumbnails(torch.rand(3, 3, 128, 128), 16)
    assert thumbs.shape == (3, 16, 16, 3) and thumbs.dtype == np.uint8


def test_targets_are_checked_on_the_tables() -> None:
    from worker.evaluation.report import targets

    def t2(none: float, ident: float, race: float, both: float) -> dict:
        rows = {"none": none, "identity-f": ident, "race": race, "identity+race": both}
        return {"rows": {k: {"overall": v} for k, v in rows.items()}}

    def t1(same: float, ours: float) -> dict:
        return {
            "rows": {"CelebA-Same": {"F": {"mean": same}}, "Lookalike-Ours": {"F": {"mean": ours}}}
        }

    t3 = {"rows": {"attributes": {"average": 0.96}}}
    met = [c["met"] for c in targets(t1(51.4, 34.8), t2(0.2, 0.4, 0.92, 0.95), t3)]
    assert met == [True, True, True, True]
    t3_low = {"rows": {"attributes": {"average": 0.8}}}
    met = [c["met"] for c in targets(t1(51.4, 60.0), t2(0.2, 0.4, 0.5, 0.5), t3_low)]
    assert met == [False, False, False, False]
