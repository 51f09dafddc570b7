"""θ_t: the brute-force search for F's same/different threshold angle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.engine.face.verification import best_angle_threshold, threshold_accuracy


def test_separable_angles_give_the_middle_of_the_gap_and_full_accuracy() -> None:
    same, diff = [20.0, 35.0, 41.0], [70.0, 85.0, 90.0]
    theta, accuracy = best_angle_threshold(same, diff)
    assert theta == pytest.approx((41 + 70) / 2) and accuracy == 1.0
    assert threshold_accuracy(same, diff, theta) == 1.0


def test_hand_checked_overlap() -> None:
    # Sorted: 10 same, 40 diff, 50 same, 80 diff. Correct pairs per cut:
    # θ=5 → 2, θ=25 → 3, θ=45 → 2, θ=65 → 3, θ=130 → 2: the first best is 25 (3 of 4).
    same, diff = [50.0, 10.0], [80.0, 40.0]
    assert best_angle_threshold(same, diff) == (25.0, 0.75)
    assert threshold_accuracy(same, diff, 25.0) == 0.75
    assert threshold_accuracy(same, diff, 45.0) == 0.5
    assert threshold_accuracy(same, diff, 65.0) == 0.75
    assert threshold_accuracy(same, diff, 50.0) == 0.75, "an angle equal to θ counts as same"


def test_no_threshold_splits_tied_angles() -> None:
    # Three pairs at 30°: one θ calls all three same or all three different.
    theta, accuracy = best_angle_threshold([30.0, 30.0], [30.0, 60.0])
    assert (theta, accuracy) == (45.0, 0.75)


def test_search_beats_every_threshold_on_a_fine_grid() -> None:
    rng = np.random.default_rng(0)
    same = rng.normal(55, 12, 300).clip(0, 180)
    diff = rng.normal(85, 6, 300).clip(0, 180)
    theta, accuracy = best_angle_threshold(same, diff)
    assert threshold_accuracy(same, diff, theta) == accuracy
    grid = max(threshold_accuracy(same, diff, t) for t in np.arange(0, 180.01, 0.05))
    assert accuracy >= grid and 0.8 < accuracy < 1.0


def test_tensors_and_refusals() -> None:
    same = torch.tensor([10.0, 20.0], requires_grad=True)
    assert best_angle_threshold(same, torch.tensor([80.0])) == (50.0, 1.0)
    with pytest.raises(ValueError, match="at least one pair"):
        best_angle_threshold([], [])
    with pytest.raises(ValueError, match=r"\[0, 180\]"):
        threshold_accuracy([float("nan")], [90.0], 45.0)
    with pytest.raises(ValueError, match=r"\[0, 180\]"):
        best_angle_threshold([-1.0], [90.0])
