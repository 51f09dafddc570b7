"""How good a face generator is: its samples, its fit to real thumbnails, its upscales.

- face rate: the fraction of random samples in which MTCNN finds a face with
  probability ≥ 0.95;
- FD: the Fréchet distance between the face embeddings (MobileFaceNet,
  aligned through the one alignment path) of samples and of real photos;
- search fit: the fraction of real thumbnails for which the latent search
  finds a candidate within eps — whether the generator can express the faces
  it will be asked for;
- sharpness: the mean Sobel gradient of the luminance, to compare upscales with
  photos and with the plain bicubic enlargement (``bicubic_upscale``) that an
  upscaler has to beat;
- grain: the finest-scale texture of the middle of the face (what a small blur
  removes), so that speckle, which raises sharpness too, shows on its own.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from likeness.splits import members, read_rows, split_of
from worker.engine.downscale import downscale
from worker.engine.face.alignment import detect_landmarks
from worker.engine.face.extractor import FaceExtractor
from worker.engine.generator import Generator
from worker.engine.mapping_fit import MappingFit
from worker.engine.search import SearchConfig, run_search
from worker.pipeline import to_tensor
from worker.training.extractor_data import read_image, subset

FACE_PROBABILITY = 0.95
SHARPNESS_SIZE = 128  # one pixel grid for every image compared: gradients scale with it
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
BINOMIAL_5 = (1.0, 4.0, 6.0, 4.0, 1.0)

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
    return float(
        ((mu_x - mu_y) ** 2).sum() + np.trace(s_x) + np.trace(s_y) - 2 * np.sqrt(cross).sum()
    )


def held_out_photos(dataset: Path, limit: int, one_per_person: bool) -> Tensor:
    """Photos of a data set's val + test people (``dataset`` holds images.zip and
    labels.csv with an ``identity`` column) in [0, 1], a fixed hash-ordered choice."""
    labels = dataset / "labels.csv"
    names = members(labels, "val") + members(labels, "test")
    if one_per_person:
        first: dict[str, str] = {}
        for row in read_rows(labels):
            if split_of(row["identity"]) != "train":
                first.setdefault(row["identity"], row["file"])
        names = sorted(first.values())
    names = subset(sorted(names), limit)
    with zipfile.ZipFile(dataset / "images.zip") as zf:
        return torch.stack([read_image(zf, n) for n in names])


def photo_embeddings(
    face: FaceExtractor, photos: Tensor, batch: int = 50, progress: Progress | None = None
) -> Tensor:
    """``embeddings`` of many photos, a batch at a time."""
    out = []
    for chunk in photos.split(batch):
        out.append(embeddings(face, chunk.to(next(face.parameters()).device)))
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out)


def sample_fd(
    G: Generator,
    face: FaceExtractor,
    reference: Tensor,
    count: int,
    seed: int = 1,
    progress: Progress | None = None,
) -> float:
    """FD between the embeddings of ``count`` random samples of G and ``reference`` (N, D)."""
    fake = []
    for images in samples(G, count, seed=seed):
        fake.append(embeddings(face, images))
        if progress is not None:
            progress(len(images))
    return frechet_distance(torch.cat(fake).cpu(), reference.cpu())


def search_fit(
    G: Generator,
    fit: MappingFit,
    photos: Tensor,
    thumb: int = 16,
    config: SearchConfig | None = None,
    batch: int = 8,
    progress: Progress | None = None,
) -> dict[str, list[float] | list[bool]]:
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


def bicubic_upscale(thumbnails: np.ndarray, size: int) -> Tensor:
    """(N, t, t, 3) uint8 thumbnails → (N, 3, size, size) in [0, 1]: the plain enlargement
    an upscaler has to beat, by the engine's one bicubic (PIL's, as an image editor
    would enlarge)."""
    return downscale(to_tensor(list(thumbnails), torch.device("cpu")), (size, size))


def luminance(images: Tensor) -> Tensor:
    """(N, 3, H, W) → (N, 1, H, W): the BT.601 luma."""
    return (images * torch.tensor(LUMA, device=images.device).view(1, 3, 1, 1)).sum(1, keepdim=True)


def on_grid(images: Tensor, size: int = SHARPNESS_SIZE) -> Tensor:
    """(N, 3, H, W) in [0, 1] → (N, 3, size, size): area when shrinking (it averages,
    adding no edges of its own), bicubic when enlarging."""
    x = images.float()
    if x.shape[-2:] == (size, size):
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def sharpness(images: Tensor, size: int = SHARPNESS_SIZE) -> Tensor:
    """Mean Sobel gradient magnitude of the luminance of (N, 3, H, W) images in [0, 1]: (N,).

    Images are first brought to ``size`` px (``on_grid``), so photos, outputs and
    enlargements of any size are measured on one grid. Only interior pixels count
    (no padding), so the border adds no false edge.
    """
    x = on_grid(images, size)
    luma = luminance(x)
    kx = torch.tensor(SOBEL_X, device=x.device).view(1, 1, 3, 3)
    gx, gy = F.conv2d(luma, kx), F.conv2d(luma, kx.transpose(2, 3))
    return (gx.square() + gy.square()).sqrt().mean((1, 2, 3))


def grain(images: Tensor, size: int = SHARPNESS_SIZE) -> Tensor:
    """Mean |luminance − its 5×5 binomial blur| over the middle half of each side (a
    quarter of the area) of (N, 3, H, W) images in [0, 1], on the ``size`` px grid: (N,).

    The middle (eyes, nose, mouth, cheeks) because hair and backgrounds carry
    fine texture of their own; a 5×5 blur because it removes only the finest
    scale: pore-sized speckle and single-pixel noise, not the edges of features.
    Compared with photos' grain it tells a crisp face from a noisy one, which the
    Sobel sharpness alone cannot.
    """
    luma = luminance(on_grid(images, size))
    k = torch.tensor(BINOMIAL_5, device=luma.device)
    k = (k.view(-1, 1) * k.view(1, -1) / k.sum() ** 2).view(1, 1, 5, 5)
    q = size // 4
    middle = luma[..., q - 2 : size - q + 2, q - 2 : size - q + 2]  # 2 px margin: valid conv
    return (middle[..., 2:-2, 2:-2] - F.conv2d(middle, k)).abs().mean((1, 2, 3))
