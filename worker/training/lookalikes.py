"""The lookalike stage of ``train-extractor`` (PAPER.md §3 item 2; the paper's
Algorithms 1–2).

Algorithm 1 makes the data: for a training person with photos I and I', the
search upscales I's thumbnail with the identity objective toward I' (embedded
by the current F) to a face P, and I''s thumbnail toward I to P'. P downscales
like I and, to F, looks like the same person, yet it is someone else: exactly
the confusion F has to unlearn. Algorithm 2 is the loss on it,
``L(P, I, 0) + L(I, flip(I), 1)`` with the identity objective's own
similarity loss: lookalikes pushed away from the photo they imitate, a photo
pulled toward its mirror image.

Photos (CelebA-HQ) and lookalikes (the generator's output) share the FFHQ
framing, so both reach F through the frame's fixed landmarks, as the search's
candidates do. Each meta-epoch's lookalikes (the faces the searches chose, as
uint8 pixels) are written to one file in the run folder after every search
batch: a crash loses at most a batch, and a resumed run reads them back instead
of searching again. They are faces steered to reproduce data-set people, so
they stay in the run folder; nothing of them goes into the run checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from likeness.errors import LikenessError
from worker.engine.checkpoints import LoadedGenerator, atomic_torch_save
from worker.engine.downscale import downscale
from worker.engine.face.alignment import fallback_landmarks
from worker.engine.face.extractor import FaceExtractor, angle
from worker.engine.face.verification import threshold_accuracy
from worker.engine.objectives import (
    ObjectiveWeights,
    objective_loss,
    similarity_loss,
)
from worker.engine.search import (
    SearchConfig,
    SearchStep,
    SearchStopped,
    run_search,
)
from worker.pipeline import build_objective, freeze_extractor

LOOKALIKE_DIR = "lookalikes"
# Files from before the search latents were dropped hold them too; reading ignores them.
FORMAT = "likeness-lookalikes/2"
EMBED_BATCH = 64


def lookalike_path(out: Path, meta_epoch: int) -> Path:
    return out / LOOKALIKE_DIR / f"meta_{meta_epoch}.pt"


# ---------------------------------------------------------------- F on framed faces


def framed_crops(extractor: FaceExtractor, images: Tensor) -> Tensor:
    """F's crops of FFHQ-framed faces (N, 3, H, W) in [0, 1], aligned with the frame's
    fixed landmarks: the path the search's identity objective takes."""
    n, _, h, w = images.shape
    return extractor.align(images, fallback_landmarks(n, h, w, images.device)).crops


@torch.no_grad()
def embed_framed(extractor: FaceExtractor, images: Tensor) -> Tensor:
    """Unit embeddings (N, D) of FFHQ-framed faces, in batches, on the images' device."""
    device = next(extractor.parameters()).device
    return torch.cat(
        [
            extractor.embed_crops(framed_crops(extractor, chunk.to(device)))
            for chunk in images.split(EMBED_BATCH)
        ]
    )


def frozen_copy(extractor: FaceExtractor, channels_last: bool) -> FaceExtractor:
    """A copy of F for the searches, frozen as ``likeness upscale`` freezes F (batch norms
    folded, the search's layout), without parameter gradients. Never F itself: folding
    is for a frozen F, and the F being trained must keep its statistics and stay
    exportable."""
    copied = copy.deepcopy(extractor).eval().requires_grad_(False)
    return freeze_extractor(copied, channels_last=channels_last)


@contextlib.contextmanager
def inference(extractor: FaceExtractor) -> Iterator[None]:
    """F in eval mode without parameter gradients (the search differentiates through F
    into the latents only), restored afterwards."""
    was_training = extractor.training
    flags = [p.requires_grad for p in extractor.parameters()]
    extractor.eval().requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(extractor.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        extractor.train(was_training)


# ---------------------------------------------------------------- the Siamese loss


def siamese_terms(
    lookalike: Tensor, photo: Tensor, mirror: Tensor, threshold_deg: float, temperature_deg: float
) -> Tensor:
    """``L(P, I, 0) + L(I, flip(I), 1)`` per item from embeddings (B, D) of the lookalikes
    P, their photos I and the mirrored photos: (B,)."""
    away = similarity_loss(lookalike, photo, 0.0, threshold_deg, temperature_deg)
    toward = similarity_loss(photo, mirror, 1.0, threshold_deg, temperature_deg)
    return away + toward


def siamese_loss(
    extractor: FaceExtractor,
    lookalikes: Tensor,
    photos: Tensor,
    threshold_deg: float,
    temperature_deg: float,
) -> Tensor:
    """L_siamese of a batch (mean over items): lookalikes (B, 3, R, R) and the photos
    (B, 3, S, S) they imitate, in [0, 1]. One backbone pass over all 3B crops."""
    photo_crops = framed_crops(extractor, photos)
    crops = torch.cat([framed_crops(extractor, lookalikes), photo_crops, photo_crops.flip(-1)])
    p, i, m = extractor.embed_crops(crops).chunk(3)
    return siamese_terms(p, i, m, threshold_deg, temperature_deg).mean()


# ---------------------------------------------------------------- Algorithm 1


@dataclass
class Lookalikes:
    """One meta-epoch's lookalikes: thumbnail t searched toward reference[t]'s identity.

    Thumbnails come in pairs (I, I'), (I', I) of one person, so P is row 2j and
    P' row 2j + 1 of pair j. Rows past ``done`` are not generated yet.
    """

    images: Tensor  # (M, 3, R, R) uint8
    photo: Tensor  # (M,) long: the photo whose thumbnail was upscaled
    reference: Tensor  # (M,) long: the photo whose identity the search was steered toward
    accepted: Tensor  # (M,) bool: downscale MSE within eps
    mse: Tensor  # (M,)
    angle_deg: Tensor  # (M,) to its own photo, under the F that steered the search
    done: int
    key: dict[str, Any]  # the settings; key["generator"]: the generator's sha256

    @property
    def complete(self) -> bool:
        return self.done == len(self.photo)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT} | {f.name: getattr(self, f.name) for f in fields(self)}


def choose_pairs(identities: Tensor, count: int, seed: int, meta_epoch: int) -> Tensor:
    """(P, 2) photo indices, two photos each of up to ``count`` people with at least two.

    The people come from one fixed order per seed, meta-epoch k taking the k-th
    ``count`` of it: new people every meta-epoch until all have had a turn (then
    around again); the two photos are a fixed random choice per (seed, meta-epoch)."""
    people = [p for p in identities.unique().tolist() if int((identities == p).sum()) >= 2]
    order = torch.randperm(len(people), generator=torch.Generator().manual_seed(seed)).tolist()
    start = meta_epoch * count
    chosen = [order[(start + i) % len(order)] for i in range(min(count, len(order)))]
    g = torch.Generator().manual_seed(seed * 1_000_003 + meta_epoch)
    pairs = []
    for k in chosen:
        photos = (identities == people[k]).nonzero().flatten()
        pairs.append(photos[torch.randperm(len(photos), generator=g)[:2]])
    if not pairs:
        raise LikenessError(
            "data_not_found",
            "the lookalike stage needs training people with "
            "two or more photos; the identity set has none",
            status=404,
        )
    return torch.stack(pairs)


def search_seed(seed: int, meta_epoch: int, row: int) -> int:
    """The search seed of one thumbnail: fixed, so a regenerated batch is the same batch."""
    return (seed * 1_000_003 + meta_epoch * 10_007 + row) % (2**31 - 1)


def read_photos(photos: Dataset, indices: Tensor) -> Tensor:
    """(N, 3, S, S) images of the photo set (its ``photo`` method: whole, unaligned)."""
    return torch.stack([photos.photo(int(i)) for i in indices])  # type: ignore[attr-defined]


def to_uint8(images: Tensor) -> Tensor:
    return images.detach().clamp(0, 1).mul(255).round().byte().cpu()


def from_uint8(images: Tensor) -> Tensor:
    return images.float().div(255)


@dataclass
class LookalikeSettings:
    """How one meta-epoch's lookalikes are made."""

    search: SearchConfig
    objective: ObjectiveWeights  # its threshold_deg: θ_t of the F that steers the search
    thumbnail: int
    batch: int  # thumbnails per search batch


def _empty(pairs: Tensor, resolution: int, key: dict[str, Any]) -> Lookalikes:
    m = 2 * len(pairs)
    return Lookalikes(
        images=torch.zeros(m, 3, resolution, resolution, dtype=torch.uint8),
        photo=pairs.flatten(),
        reference=pairs.flip(1).flatten(),
        accepted=torch.zeros(m, dtype=torch.bool),
        mse=torch.full((m,), float("nan")),
        angle_deg=torch.full((m,), float("nan")),
        done=0,
        key=key,
    )


def read_lookalikes(path: Path, key: dict[str, Any] | None) -> Lookalikes | None:
    """The lookalikes saved at ``path`` (maybe partial), None if there are none; a file
    made with other settings than ``key`` (None: any) is an error rather than silently
    mixed in."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise LikenessError("bad_checkpoint", f"cannot read {path}: {e}") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise LikenessError("bad_checkpoint", f"{path} is not a {FORMAT} file")
    if key is not None and saved["key"] != key:
        changed = sorted(
            k for k in key.keys() | saved["key"].keys() if key.get(k) != saved["key"].get(k)
        )
        raise LikenessError(
            "lookalikes_mismatch",
            f"{path} was made with other settings "
            f"({', '.join(changed)}); resume with the same lookalike options "
            "or remove the file to make them again",
        )
    return Lookalikes(**{f.name: saved[f.name] for f in fields(Lookalikes)})


def generate_lookalikes(
    extractor: FaceExtractor,
    model: LoadedGenerator,
    photos: Dataset,
    pairs: Tensor,
    settings: LookalikeSettings,
    path: Path,
    key: dict[str, Any],
    seed: int,
    on_step: Callable[[int, SearchStep], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Lookalikes:
    """Algorithm 1 for ``pairs`` (P, 2): the lookalikes at ``path``, searching only for
    the rows not there yet and saving after every batch. Returns them complete, or
    partial when ``should_stop`` said so (checked at every search step).

    ``on_step(rows done, step)`` reports progress. F runs in eval mode without parameter
    gradients; nothing here draws from the global RNG, so training after it takes the
    same steps whether the lookalikes were searched or read back.
    """
    assert model.mapping_fit is not None
    device = next(model.generator.parameters()).device
    made = read_lookalikes(path, key) or _empty(pairs, model.generator.config.resolution, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_epoch = int(key["meta_epoch"])
    with inference(extractor):
        while not made.complete:
            rows = torch.arange(made.done, min(made.done + settings.batch, len(made.photo)))
            mine = read_photos(photos, made.photo[rows]).to(device)
            refs = embed_framed(extractor, read_photos(photos, made.reference[rows]))
            objective = build_objective(
                extractor, settings.objective, [None] * len(rows), [{}] * len(rows), list(refs)
            )
            loss = objective_loss(
                extractor, objective.targets, objective.weights, settings.search.restarts
            )

            def step(s: SearchStep, done: int = made.done) -> bool:
                if on_step is not None:
                    on_step(done, s)
                return not should_stop()

            try:
                result = run_search(
                    model.generator,
                    model.mapping_fit,
                    downscale(mine, settings.thumbnail),
                    settings.search,
                    loss,
                    step,
                    [search_seed(seed, meta_epoch, int(r)) for r in rows],
                )
            except SearchStopped:
                return made
            images = to_uint8(result.images)
            made.images[rows] = images
            made.accepted[rows] = result.accepted.cpu()
            made.mse[rows] = result.mse.detach().float().cpu()
            made.angle_deg[rows] = angle(
                embed_framed(extractor, from_uint8(images)),
                embed_framed(extractor, mine),
                degrees=True,
            ).cpu()
            made.done = int(rows[-1]) + 1
            atomic_torch_save(made.to_dict(), path)
            if should_stop():
                return made
    return made


# ---------------------------------------------------------------- training data, measures


class LookalikePairs(Dataset[tuple[Tensor, Tensor]]):
    """(lookalike, the photo it imitates), both [3, *, *] in [0, 1], from uint8 tensors."""

    def __init__(self, looks: Lookalikes, photos: Tensor) -> None:
        self.images, self.photos = looks.images, photos  # photos: (M, 3, S, S) uint8, row-aligned

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return from_uint8(self.images[index]), from_uint8(self.photos[index])


def training_pairs(looks: Lookalikes, photos: Dataset) -> LookalikePairs:
    return LookalikePairs(looks, to_uint8(read_photos(photos, looks.photo)))


def accumulated(pairs: list[LookalikePairs]) -> Dataset[tuple[Tensor, Tensor]]:
    """The lookalikes of every meta-epoch so far as one set, oldest first, as the paper
    trains: a later F must not unlearn the confusions an earlier one was taught."""
    return torch.utils.data.ConcatDataset(pairs)


def angle_stats(angles: Tensor) -> dict[str, float]:
    """Mean ± SD (degrees) of a set of angles, as the evaluation reports them."""
    a = angles.double()
    return {"mean": float(a.mean()), "sd": float(a.std(unbiased=False)), "pairs": len(a)}


def measure(
    extractor: FaceExtractor, pairs: LookalikePairs, looks: Lookalikes, threshold_deg: float | None
) -> dict[str, Any]:
    """Angles between the lookalikes and their photos under ``extractor`` (Lookalike-Ours
    of PAPER Table 1, on training people) and under the F that steered their search,
    the fraction the search accepted, and, given θ_t, the fraction F calls another person."""
    with inference(extractor):
        now = angle(
            embed_framed(extractor, from_uint8(pairs.images)),
            embed_framed(extractor, from_uint8(pairs.photos)),
            degrees=True,
        ).cpu()
    out: dict[str, Any] = {
        "angle": angle_stats(now),
        "angle_at_generation": angle_stats(looks.angle_deg),
        "accepted": float(looks.accepted.float().mean()),
        "threshold_at_generation_deg": looks.key["objective"]["threshold_deg"],
    }
    if threshold_deg is not None:
        out["called_different"] = threshold_accuracy([], now, threshold_deg)
    return out
