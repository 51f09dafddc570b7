"""How good a face generator is, measured the ways issue 3 asks for.

- face rate: the fraction of random samples in which MTCNN finds a face with
  probability ≥ 0.95;
- FD: the Fréchet distance between the face embeddings (MobileFaceNet,
  aligned through the one alignment path) of samples and of real photos;
- search fit: the fraction of real thumbnails for which the latent search
  finds a candidate within eps — whether the generator can express the faces
  it will be asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from worker.engine.downscale import downscale
from worker.engine.face.alignment import detect_landmarks
from worker.engine.face.extractor import FaceExtractor
from worker.engine.generator import Generator
from worker.engine.mapping_fit import MappingFit
from worker.engine.search import SearchConfig, run_search

FACE_PROBABILITY = 0.95

Progress = Callable[[int], None]


@torch.no_grad()
def samples(G: Generator, count: int, seed: int = 0, batch: int = 50) -> Iterator[Tensor]:
    """``count`` random faces in [0, 1], in batches, from a fixed seed (no truncation)."""
    rng = torch.Generator().manual_seed(seed)
    device = next(G.parameters()).device
    done = 0
    while done < count:
        n = min(batch, count - done)
        z = torch.randn(n, G.config.style_dim, generator=rng).to(device)
        yield ((G(z) + 1) / 2).clamp(0, 1)
        done += n


def face_probabilities(images: Tensor) -> Tensor:
    """MTCNN's probability of the largest face per image (0 where none): (B,)."""
    _, _, probs = detect_landmarks(images)
    return probs


@torch.no_grad()
def embeddings(face: FaceExtractor, images: Tensor) -> Tensor:
    """L2-normalised embeddings of detected-and-aligned faces (fallback frame when
    none is found, as everywhere else): (B, D)."""
    return face.embed(images)


def frechet_distance(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of vectors (N, D).

    ``tr(sqrt(S_a S_b))`` is computed as the trace of the square root of the
    symmetric ``sqrt(S_a) S_b sqrt(S_a)``, which has the same eigenvalues and
    needs only symmetric eigendecompositions (no scipy).
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    vals, vecs = np.linalg.eigh(s_x)
    root_x = (vecs * np.sqrt(vals.clip(min=0))) @ vecs.T
    cross = np.linalg.eigvalsh(root_x @ s_y @ root_x).clip(min=0)
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x) + np.trace(s_y)
                 - 2 * np.sqrt(cross).sum())


def search_fit(G: Generator, fit: MappingFit, photos: Tensor, thumb: int = 16,
               config: SearchConfig | None = None, batch: int = 8,
               progress: Progress | None = None) -> dict[str, list[float] | list[bool]]:
    """Search each photo's thumbnail (bicubic, PIL-exact) and report, per photo, the
    best downscale MSE, whether it is within eps, and MTCNN's face probability of the
    chosen face: a search that reaches eps by leaving the face manifold (too little
    GEOCROSS, say) shows there."""
    config = config or SearchConfig(seed=0)
    mse: list[float] = []
    accepted: list[bool] = []
    face: list[float] = []
    for chunk in photos.split(batch):
        thumbs = downscale(chunk, (thumb, thumb))
        result = run_search(G, fit, thumbs, config)
        mse += result.mse.tolist()
        accepted += result.accepted.tolist()
        face += face_probabilities(result.images).tolist()
        if progress is not None:
            progress(len(chunk))
    return {"mse": mse, "accepted": accepted, "face_probability": face}
