"""The three data sets joint training draws from (identity, race, attributes), real or
synthetic."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from likeness.errors import LikenessError
from worker.engine.face.alignment import Template
from worker.engine.face.extractor import ARCHITECTURES
from worker.training import extractor_data as d
from worker.training.extractor.config import ExtractorConfig


@dataclass
class Data:
    identity: Dataset
    race: Dataset
    attributes: Dataset
    eval_identity: Dataset
    eval_race: Dataset
    eval_attributes: Dataset
    threshold_identity: Dataset  # training people, no mirror images: θ_t is fitted on them
    photos: Dataset  # CelebA-HQ training people, no mirror images: the lookalike stage's photos
    classes: int


def make_data(config: ExtractorConfig) -> Data:
    t: Template = ARCHITECTURES[config.architecture].template
    if config.data_root is None:
        n, k, s = config.synthetic_count, config.synthetic_classes, config.seed
        identity: Dataset = d.SyntheticFaces("identity", n, k, t, s)
        return Data(
            identity,
            d.SyntheticFaces("race", n, 5, t, s),
            d.SyntheticFaces("attributes", n, k, t, s),
            d.SyntheticFaces("identity", n // 2, k, t, s + 1),
            d.SyntheticFaces("race", n // 2, 5, t, s + 1),
            d.SyntheticFaces("attributes", n // 2, k, t, s),
            identity,
            identity,
            classes=k,
        )
    root, cache = Path(config.data_root), Path(config.out) / "cache"
    for name in ("celebahq", "utkface") + (("lfw",) if config.use_lfw else ()):
        if not (root / name / "images.zip").is_file():
            raise LikenessError("data_not_found", f"no {name}/images.zip under {root}", status=404)
    id_roots = [root / "celebahq"] + ([root / "lfw"] if config.use_lfw else [])
    cap, held = config.max_images, min(config.max_images or config.eval_limit, config.eval_limit)
    id_sets = d.identity_faces(id_roots, "train", t, cache, mirror=True, limit=cap)
    identity = torch.utils.data.ConcatDataset(id_sets)
    # ``subset`` keeps people in one fixed order, so these are people the capped training
    # set holds too; CelebA-HQ only, like the held-out pairs that score θ_t.
    threshold_identity = d.identity_faces([root / "celebahq"], "train", t, cache, limit=held)[0]
    photos = d.identity_faces([root / "celebahq"], "train", t, cache, limit=cap)[0]
    return Data(
        identity,
        d.race_faces(root / "utkface", "train", t, cache, True, cap),
        d.attribute_faces(root / "celebahq", "train", t, cache, True, cap),
        d.identity_faces([root / "celebahq"], "test", t, cache, limit=held)[0],
        d.race_faces(root / "utkface", "test", t, cache, limit=held),
        d.attribute_faces(root / "celebahq", "test", t, cache, limit=held),
        threshold_identity,
        photos,
        classes=d.num_classes(id_sets),
    )


def dataset_targets(dataset: Dataset) -> Tensor:
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return torch.cat([dataset_targets(s) for s in dataset.datasets])
    return dataset.targets  # type: ignore[attr-defined]


def originals(dataset: Dataset) -> Dataset:
    """A training set without its mirror images (``AlignedFaces`` lists them after the
    originals): the head fit needs each face's features once, not twice."""
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return torch.utils.data.ConcatDataset([originals(s) for s in dataset.datasets])
    if getattr(dataset, "mirror", False):
        return torch.utils.data.Subset(dataset, range(len(dataset) // 2))  # type: ignore[arg-type]
    return dataset
