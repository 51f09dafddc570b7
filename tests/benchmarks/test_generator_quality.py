"""bench/generator_quality.py's search summary: a bench is not run by the tests, so its
summary of the evaluation's search outputs is checked here against their fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.generator_quality import search_scores
from worker.evaluation.searches import Job, Outputs


def outputs(cached_jobs: int) -> Outputs:
    return Outputs(
        jobs=[Job(row) for row in range(4)],
        images=torch.zeros(4, 3, 8, 8),
        accepted=np.array([True, True, False, True]),
        mse=np.array([0.001, 0.002, 0.004, 0.001]),
        reports=[{} for _ in range(4)],
        search_seconds=8.0,
        cached_jobs=cached_jobs,
        batches=1,
    )


def test_search_scores_summarise_the_outputs_and_say_what_came_from_the_cache() -> None:
    fresh = search_scores(outputs(0))
    assert fresh["n"] == 4 and fresh["accepted"] == 0.75
    assert fresh["mse_mean"] == pytest.approx(0.002)
    assert fresh["seconds_per_thumbnail"] == 2.0 and "note" not in fresh
    cached = search_scores(outputs(3))
    assert cached["cached_jobs"] == 3 and cached["note"].startswith("3 of 4 thumbnails")
