"""The generator that ships in weights/: it is the default, it loads
offline with its mapping fit, and a short search upscales a real face with it."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from skimage import data

from likeness.manifest import resolve_weights, sha256_file
from worker.engine.search import run_search
from worker.pipeline import load_search_model


def test_the_bundled_generator_loads_and_searches_a_real_thumbnail() -> None:
    path, entry = resolve_weights(None, "generator")
    assert entry is not None and entry.default, "a default generator ships in weights/"
    assert sha256_file(path) == entry.sha256
    assert path.stat().st_size <= 25 * 2**20
    assert {"face_rate", "fd", "search_fit"} <= set(entry.metrics), "measured, not assumed"

    loaded, _ = load_search_model(None, torch.device("cpu"))
    assert loaded.mapping_fit is not None, "the search needs the fit; it ships with the weights"
    # the settings its search fit was measured with are the ones every search starts from
    fit_config = entry.metrics["search_fit"]
    assert loaded.search_config().geocross_weight == fit_config["geocross_weight"]
    G = loaded.generator
    assert G.config.resolution == 128

    face = Image.fromarray(data.astronaut()[:256, 100:356])  # the astronaut's head and shoulders
    thumb = np.asarray(face.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    thumbs = torch.from_numpy(thumb).permute(2, 0, 1)[None]
    best: list[float] = []
    result = run_search(
        G,
        loaded.mapping_fit,
        thumbs,
        loaded.search_config(steps=5, restarts=2, seed=0),
        on_step=lambda step: best.append(float(step.best_mse[0])),
    )
    assert result.images.shape == (1, 3, 128, 128)
    assert bool(torch.isfinite(result.images).all())
    # five steps already pull the candidate toward the thumbnail: after step 1 the best is
    # still the random start
    assert len(best) == 5 and float(result.mse[0]) < best[0]
