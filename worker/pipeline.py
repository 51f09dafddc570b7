"""From decoded thumbnails to upscaled faces and their reports.

The CLI and the worker process both go through here, so a job and a command
line give the same result for the same inputs, seed, weights and device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from likeness.errors import LikenessError
from likeness.labels import canonical_attributes, canonical_race
from likeness.manifest import resolve_weights, verified_sha256
from likeness.photo import Composite, PhotoPlan, composite, crops_for, output_factor
from likeness.request import UpscaleRequest
from worker.engine.checkpoints import LoadedGenerator, load_generator
from worker.engine.face.export import load_export
from worker.engine.face.extractor import FaceExtractor
from worker.engine.face.mobilefacenet import MobileFaceNet, fold_batch_norms
from worker.engine.face.race_reader import RaceReader, load_reader, race_targets
from worker.engine.objectives import (
    DEFAULT_THRESHOLD_DEG,
    ObjectiveWeights,
    Targets,
    build_targets,
    describe,
    objective_loss,
    with_read_races,
)
from worker.engine.search import (
    ExtraLoss,
    SearchConfig,
    SearchResult,
    SearchStep,
    pull_eps,
    run_search,
)


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise LikenessError(
            "bad_device", f"unknown device '{spec}' (try cpu, cuda, cuda:0)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LikenessError("bad_device", "CUDA was asked for but no GPU is available")
    return device


def load_search_model(
    weights: str | None, device: torch.device, manifest_path: Path | None = None
) -> tuple[LoadedGenerator, str]:
    """The generator to search in, with its mapping fit; returns it and its display name.
    ``weights`` is a name in the manifest (default: the settings'), a file, or None for
    the manifest's default generator."""
    path, entry = resolve_weights(weights, "generator", manifest_path)
    loaded = load_generator(path, device)
    if loaded.mapping_fit is None:
        raise LikenessError(
            "missing_mapping_fit",
            f"{path} has no mapping fit; run `likeness weights fit-mapping {path}` once",
        )
    if entry is None:
        return loaded, str(path)
    if entry.sha256 != loaded.sha256:
        raise LikenessError(
            "weights_corrupt", f"{path} does not match its manifest sha256 (re-checkout weights/)"
        )
    loaded.search_defaults = dict(entry.search)
    return loaded, entry.name


def to_tensor(pixels: Sequence[np.ndarray], device: torch.device) -> Tensor:
    """(H, W, 3) uint8 images of one size → (B, 3, H, W) float in [0, 1]."""
    batch = np.stack([np.asarray(p, dtype=np.uint8) for p in pixels])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255).to(device)


def to_pixels(images: Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [0, 1] → (H, W, 3) uint8 arrays."""
    arr = images.detach().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(arr)


@dataclass
class Upscaled:
    pixels: np.ndarray  # (R, R, 3) uint8, the chosen candidate
    report: dict[str, Any]
    candidates: list[np.ndarray]


@dataclass
class Objective:
    """The conditioned search's targets for a batch: F, what each thumbnail asks, weights;
    and, where a thumbnail asks to keep its race, the reader that reads it (``upscale``
    reads the thumbnails before the search)."""

    extractor: FaceExtractor
    targets: Targets
    weights: ObjectiveWeights
    race_reader: RaceReader | None = None
    keep: Tensor | None = None  # (B,) bool: keep the race read from the thumbnail

    def reading(self, thumbnails: Tensor) -> Objective:
        """The objective with each kept race read from ``thumbnails`` (B, 3, h, w)."""
        if self.race_reader is None or self.keep is None or not bool(self.keep.any()):
            return self
        races, _ = extractor_labels(self.extractor)
        read = race_targets(self.race_reader.read(thumbnails), self.race_reader.labels, races)
        return replace(self, targets=with_read_races(self.targets, read, self.keep))


def resolve_search(request: UpscaleRequest, model: LoadedGenerator, **run: Any) -> SearchConfig:
    """The search a request runs: the request's fields, then the generator's manifest
    settings (``likeness weights set-search``), then the engine's defaults. ``run`` holds
    how this process runs it (precision, layout, compile) and options only the command
    line has; None there means not given."""
    return model.search_config(
        steps=request.steps, restarts=request.restarts, seed=request.seed, eps=request.eps, **run
    )


def objective_weights(
    request: UpscaleRequest | None = None, threshold_deg: float = DEFAULT_THRESHOLD_DEG
) -> ObjectiveWeights:
    """The request's objective weights, the engine's defaults where it has none, with the
    steering extractor's θ_t."""
    given = (
        {}
        if request is None
        else {
            "identity": request.identity_weight,
            "race": request.race_weight,
            "attributes": request.attr_weight,
            "views": request.views,
        }
    )
    return ObjectiveWeights(
        threshold_deg=threshold_deg, **{k: v for k, v in given.items() if v is not None}
    )


def extractor_labels(extractor: FaceExtractor) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The race and attribute names F's heads know."""
    races = extractor.race_head.labels if extractor.race_head is not None else ()
    names = extractor.attribute_head.labels if extractor.attribute_head is not None else ()
    return tuple(races), tuple(names)


def canonical_targets(
    extractor: FaceExtractor, race: str | None, attributes: Mapping[str, int]
) -> tuple[str | None, dict[str, int]]:
    """A thumbnail's race and attribute targets as F's heads spell them; a name F does not
    know is a LikenessError (code unknown_label) that lists what it knows."""
    races, names = extractor_labels(extractor)
    try:
        return canonical_race(race, races), dict(canonical_attributes(attributes, names))
    except LikenessError as exc:
        if exc.code == "invalid_attribute":
            raise
        raise LikenessError("unknown_label", exc.message, status=422) from None


def build_objective(
    extractor: FaceExtractor,
    weights: ObjectiveWeights,
    races: Sequence[str | None],
    attributes: Sequence[Mapping[str, int]],
    references: Sequence[Tensor | None],
    keep_races: Sequence[bool] | None = None,
    race_reader: RaceReader | None = None,
) -> Objective:
    """The steering objective of B thumbnails, the one way the CLI, the worker, the
    evaluation and the lookalike stage assemble it: each thumbnail's race, attributes and
    reference embedding (or None), names checked against F's heads, and the weights
    (``objective_weights``) with F's θ_t. ``keep_races`` (with a ``race_reader``) marks
    the thumbnails that name no race but keep the one the reader sees in them."""
    device = next(extractor.parameters()).device
    checked = [canonical_targets(extractor, r, a) for r, a in zip(races, attributes, strict=True)]
    targets = build_targets(
        extractor, [r for r, _ in checked], [a for _, a in checked], list(references), device
    )
    keep = None
    if race_reader is not None and keep_races is not None and extractor.race_head is not None:
        keep = torch.tensor(list(keep_races), dtype=torch.bool, device=device)
        if keep.shape[0] != len(races):
            raise ValueError("keep_races must have one entry per thumbnail")
    return Objective(extractor, targets, weights, race_reader if keep is not None else None, keep)


def load_race_reader(device: torch.device, manifest_path: Path | None = None) -> RaceReader | None:
    """The manifest's race reader, or None where the weights folder has none (searches
    then keep no race but the one a request names)."""
    try:
        path, entry = resolve_weights(None, "race-reader", manifest_path)
    except LikenessError as exc:
        if exc.code == "no_default_weights":
            return None
        raise
    verified_sha256(path, entry)
    reader = load_reader(path).to(device).eval()
    for p in reader.parameters():
        p.requires_grad_(False)
    return reader


def load_extractor(
    spec: str | None, device: torch.device, manifest_path: Path | None = None
) -> tuple[FaceExtractor, float, str]:
    """F with its race and attribute heads, its threshold angle θ_t, and its display name.

    ``spec`` None: the manifest's default extractor. θ_t comes from the export itself
    (fitted when F was trained); older exports without one get ``DEFAULT_THRESHOLD_DEG``.
    """
    path, entry = resolve_weights(spec, "extractor", manifest_path)
    verified_sha256(path, entry)
    extractor = load_export(path).to(device).eval()
    for p in extractor.parameters():
        p.requires_grad_(False)
    threshold = extractor.threshold_deg
    if threshold is None:
        threshold = DEFAULT_THRESHOLD_DEG
    return extractor, float(threshold), entry.name if entry is not None else str(path)


def freeze_extractor(extractor: FaceExtractor, channels_last: bool = False) -> FaceExtractor:
    """F made cheaper for searches, in place: batch norms folded into the convolutions
    (F's backward pass is paid at every step) and, with ``channels_last``, NHWC weights in
    the search's layout (faster where bf16 runs on a CPU). The same function of its input,
    but no longer F's checkpoint: not for training or exporting."""
    if isinstance(extractor.backbone, MobileFaceNet):
        fold_batch_norms(extractor.backbone)
    if channels_last:
        extractor.to(memory_format=torch.channels_last)
    return extractor


def reference_embedding(extractor: FaceExtractor, pixels: np.ndarray) -> Tensor:
    """F's embedding (D,) of the one face in a reference photo; MTCNN finds it."""
    device = next(extractor.parameters()).device
    image = to_tensor([pixels], device)
    with torch.no_grad():
        aligned = extractor.align(image)
        if not bool(aligned.detected[0]):
            raise LikenessError(
                "no_face",
                "no face was found in the reference photo; use a photo where one "
                "face is clearly visible",
                status=422,
            )
        return extractor.embed_crops(aligned.crops)[0]


def upscale(
    model: LoadedGenerator,
    thumbnails: Sequence[np.ndarray],
    config: SearchConfig,
    extra_loss: ExtraLoss | None = None,
    on_step: Callable[[SearchStep], bool | None] | None = None,
    seeds: Sequence[int] | None = None,
    objective: Objective | None = None,
) -> list[Upscaled]:
    """Run one batched search over same-sized thumbnails; one ``Upscaled`` each.

    ``seeds`` (one per thumbnail) replaces ``config.seed``, so each of several
    jobs batched together gets the image it would get alone with its seed.
    ``objective`` adds identity, race and attribute targets (PAPER.md §2).
    """
    device = next(model.generator.parameters()).device
    assert model.mapping_fit is not None
    if objective is not None and extra_loss is not None:
        raise ValueError("pass an objective or an extra_loss, not both")
    pixels = to_tensor(thumbnails, device)
    if objective is not None:
        objective = objective.reading(pixels)
    if objective is not None and objective.targets.any:
        extra_loss = objective_loss(
            objective.extractor, objective.targets, objective.weights, config.restarts
        )
    result = run_search(
        model.generator,
        model.mapping_fit,
        pixels,
        config,
        extra_loss,
        on_step,
        seeds,
    )
    seen = (
        describe(objective.extractor, result.images, objective.targets, objective.weights)
        if objective is not None
        else [{}] * len(thumbnails)
    )
    return [
        Upscaled(
            pixels=to_pixels(result.images[i : i + 1])[0],
            report=element_report(result, i, config) | seen[i],
            candidates=to_pixels(result.candidates[i]),
        )
        for i in range(len(thumbnails))
    ]


def element_report(result: SearchResult, i: int, config: SearchConfig) -> dict[str, Any]:
    accepted = bool(result.accepted[i])
    mse = float(result.mse[i])
    report: dict[str, Any] = {
        "accepted": accepted,
        "downscale_mse": mse,
        "eps": config.eps,
        "fit_eps": pull_eps(config),  # the MSE the search pulled to, at most eps
        "loss": float(result.loss[i]),
        "restart": int(result.restart[i]),
        "candidates": [
            {"downscale_mse": float(m), "loss": float(loss), "accepted": bool(a)}
            for m, loss, a in zip(
                result.candidate_mse[i],
                result.candidate_loss[i],
                result.candidate_accepted[i],
                strict=True,
            )
        ],
        "terms": {name: float(t[i, int(result.restart[i])]) for name, t in result.terms.items()},
        "steps": result.steps,
        "restarts": config.restarts,
        "seed": result.seeds[i] if result.seeds else result.seed,
        "precision": config.precision,  # bf16 rounds differently: part of what a seed gives
        "channels_last": config.channels_last,
        "compiled": config.compile != "off",
        "geocross_weight": config.geocross_weight,  # the generator's setting, or an option's
    }
    chosen = int(result.restart[i])
    if result.constraints:
        report["constraints"] = {
            name: {
                "value": float(v[i, chosen]),
                "limit": result.limits[name],
                "held": bool(v[i, chosen] <= result.limits[name]),
            }
            for name, v in result.constraints.items()
        }
        for c, cand in enumerate(report["candidates"]):
            cand["constraints"] = {name: float(v[i, c]) for name, v in result.constraints.items()}
    if not accepted:
        within_eps = bool((result.candidate_mse[i] <= config.eps).any())
        if within_eps and result.constraints:
            broken = sorted(
                name for name, held in report["constraints"].items() if not held["held"]
            )
            report["reason"] = (
                "faces downscale to this thumbnail, but none meets the targets: "
                f"{', '.join(broken) or 'a constraint'} loss above its limit in every restart "
                f"({result.steps} steps x {config.restarts} restarts)"
            )
        else:
            report["reason"] = (
                f"no face downscales to this thumbnail: best downscale MSE {mse:.5f} > eps "
                f"{config.eps:g} after {result.steps} steps x {config.restarts} restarts"
            )
    return report


@dataclass
class UpscaledPhoto:
    """A photo with its chosen faces upscaled and pasted back, and each face's result."""

    plan: PhotoPlan
    crops: list[np.ndarray]  # each chosen face in its FFHQ frame at its thumbnail size
    faces: list[Upscaled]  # in the order of ``plan.chosen``
    composite: Composite

    @property
    def accepted(self) -> bool:
        return all(bool(u.report["accepted"]) for u in self.faces)

    def report(self) -> dict[str, Any]:
        """The photo's report: its faces (all detected, the chosen ones with their search
        report) and how the result was composed."""
        chosen = {
            f.index: (f, u, p)
            for f, u, p in zip(self.plan.chosen, self.faces, self.composite.pasted, strict=True)
        }
        faces = []
        for face in self.plan.faces:
            entry = face.describe()
            if face.index in chosen:
                _, upscaled, pasted = chosen[face.index]
                entry["result"] = upscaled.report
                entry["pasted_box"] = list(pasted.box)
                entry["colour_shift"] = [round(v, 2) for v in pasted.colour_shift]
            faces.append(entry)
        height, width = self.composite.pixels.shape[:2]
        return {
            "mode": "photo",
            "accepted": self.accepted,
            "photo": {"width": self.plan.width, "height": self.plan.height},
            "output": {"width": width, "height": height, "factor": self.composite.factor},
            "min_face_size": round(self.plan.min_face_size, 1),
            "faces_chosen": [f.index for f in self.plan.chosen],
            "faces": faces,
        }


def face_seed(seed: int, index: int) -> int:
    """Face ``index``'s seed: the same whichever faces are chosen and batched with it."""
    return (seed + index) % (2**63)


def upscale_photo(
    model: LoadedGenerator,
    pixels: np.ndarray,
    plan: PhotoPlan,
    config: SearchConfig,
    *,
    seed: int,
    max_side: int,
    on_step: Callable[[SearchStep], bool | None] | None = None,
    on_group: Callable[[int, int, int], None] | None = None,
    objective_for: Callable[[int], Objective | None] | None = None,
) -> UpscaledPhoto:
    """Upscale the chosen faces of a photo and paste them back into an enlarged copy.

    Faces whose thumbnails share a size run as one batched search (``upscale``), each
    with its own seed (``face_seed``); ``objective_for(n)`` gives the targets of a batch
    of n faces (the same targets for each). ``on_group(size, faces, group_index)`` is
    told before each batch. The photo is enlarged by the factor at which the smallest
    chosen face's new resolution is used, within ``max_side``.
    """
    chosen = plan.chosen
    resolution = model.generator.config.resolution
    crops = crops_for(pixels, chosen)
    by_size: dict[int, list[int]] = {}
    for k, face in enumerate(chosen):
        by_size.setdefault(face.thumbnail_size, []).append(k)
    results: dict[int, Upscaled] = {}
    for g, (size, members) in enumerate(sorted(by_size.items(), reverse=True)):
        if on_group is not None:
            on_group(size, len(members), g)
        out = upscale(
            model,
            [crops[k] for k in members],
            config,
            on_step=on_step,
            seeds=[face_seed(seed, chosen[k].index) for k in members],
            objective=objective_for(len(members)) if objective_for is not None else None,
        )
        results.update(zip(members, out, strict=True))
    faces = [results[k] for k in range(len(chosen))]
    factor = output_factor(chosen, resolution, plan.width, plan.height, max_side)
    pasted = composite(pixels, chosen, [u.pixels for u in faces], factor)
    return UpscaledPhoto(plan, crops, faces, pasted)
