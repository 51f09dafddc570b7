"""Control objectives on top of PULSE (PAPER.md §2): identity, race, attributes.

Everything is per batch element. A batch of B thumbnails × K restarts may mix
jobs with different targets: each target tensor carries a mask, and a term is
zero (and its constraint void) where the mask is off, never indexed with
``[0]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor

from worker.engine.face.alignment import fallback_landmarks
from worker.engine.face.extractor import FaceExtractor, FaceOutput, angle
from worker.engine.face.views import ViewSampler, view_crops
from worker.engine.search import ExtraLoss, ExtraTerms

# F0's verification threshold on LFW through our alignment (bench/lfw_verification.py),
# for extractors without their own: train-extractor stores the θ_t it fits in its export.
DEFAULT_THRESHOLD_DEG = 73.2


class ObjectiveWeights(BaseModel):
    """``L = L_pulse + identity·L_s + race·L_r + attributes·L_a`` (0 turns a term off), with
    ``kept_race`` in place of ``race`` where the race is the one read from the thumbnail."""

    identity: float = Field(5.0, ge=0, description="weight of L_s (the reference code's 5.0)")
    race: float = Field(2.0, ge=0, description="weight of L_r (the reference code's 2.0)")
    kept_race: float = Field(
        0.5,
        ge=0,
        description="weight of L_r toward the race read from the thumbnail (a soft target, "
        "kept when no race is named); it pulls against the fit: at 2 and 1 it cost sharpness "
        "and fit and carried no more race than at 0.5 (docs/experiments.md)",
    )
    attributes: float = Field(2.0, ge=0, description="weight of L_a")
    threshold_deg: float = Field(
        DEFAULT_THRESHOLD_DEG,
        ge=0,
        lt=180,
        description="θ_t: F's same/different threshold angle; 0 pulls toward the reference "
        "without ever counting it reached (the lookalike stage's first searches)",
    )
    temperature_deg: float = Field(5.0, gt=0, description="τ of the similarity sigmoid")
    max_class_loss: float = Field(
        0.1, gt=0, description="reject a candidate whose final L_r or L_a exceeds this"
    )
    views: int = Field(
        1,
        ge=1,
        le=16,
        description="F sees each candidate in this many views "
        "(the first as is, the others randomly shifted, scaled, rotated, "
        "mirrored and blurred) and every term averages over them, so a target "
        "is met only by changes that survive them all; each view costs F's "
        "forward and backward pass again (bench/steering.py)",
    )


@dataclass
class Targets:
    """What each of B thumbnails asks for; masks say which targets are set."""

    reference: Tensor  # (B, D) unit embeddings of the reference photos (zeros where unset)
    has_reference: Tensor  # (B,) bool
    race: Tensor  # (B, R) wanted race distribution: one-hot where named (zeros where unset)
    has_race: Tensor  # (B,) bool
    race_kept: Tensor  # (B,) bool: the race read from the thumbnail, steered toward, never
    # a reason to reject a candidate (a reading can be wrong; a user's target is not)
    attributes: Tensor  # (B, A) wanted values 0/1
    has_attribute: Tensor  # (B, A) bool

    @property
    def any(self) -> bool:
        return bool(self.has_reference.any() or self.has_race.any() or self.has_attribute.any())

    def _fields(self) -> tuple[Tensor, ...]:
        return (
            self.reference,
            self.has_reference,
            self.race,
            self.has_race,
            self.race_kept,
            self.attributes,
            self.has_attribute,
        )

    def repeat(self, k: int) -> Targets:
        """Element i·K + j gets thumbnail i's targets (the search's restart layout)."""
        return Targets(*(t.repeat_interleave(k, dim=0) for t in self._fields()))

    def tile(self, v: int) -> Targets:
        """The whole batch ``v`` times over, one copy per view (view-major)."""
        return Targets(*(t.repeat(v, *([1] * (t.ndim - 1))) for t in self._fields()))


def build_targets(
    extractor: FaceExtractor,
    races: Sequence[str | None],
    attributes: Sequence[Mapping[str, int]],
    references: Sequence[Tensor | None],
    device: torch.device,
) -> Targets:
    """Targets for B thumbnails from names (validated against F's heads) and
    reference embeddings (already computed, (D,) each, or None)."""
    b = len(races)
    if not (len(attributes) == len(references) == b):
        raise ValueError("races, attributes and references must have one entry per thumbnail")
    race_labels = extractor.race_head.labels if extractor.race_head is not None else ()
    attr_labels = extractor.attribute_head.labels if extractor.attribute_head is not None else ()
    d = extractor.embedding_dim
    reference = torch.zeros(b, d, device=device)
    has_reference = torch.zeros(b, dtype=torch.bool, device=device)
    race = torch.zeros(b, max(len(race_labels), 1), device=device)
    has_race = torch.zeros(b, dtype=torch.bool, device=device)
    wanted = torch.zeros(b, max(len(attr_labels), 1), device=device)
    has_attr = torch.zeros(b, max(len(attr_labels), 1), dtype=torch.bool, device=device)
    for i in range(b):
        if references[i] is not None:
            reference[i] = F.normalize(references[i].to(device).flatten(), dim=0)
            has_reference[i] = True
        if races[i] is not None:
            if races[i] not in race_labels:
                raise KeyError(f"race {races[i]!r} is not one of {race_labels}")
            race[i, race_labels.index(races[i])], has_race[i] = 1.0, True
        for name, value in attributes[i].items():
            if name not in attr_labels:
                raise KeyError(f"attribute {name!r} is not one of {attr_labels}")
            j = attr_labels.index(name)
            wanted[i, j], has_attr[i, j] = float(value), True
    kept = torch.zeros_like(has_race)
    return Targets(reference, has_reference, race, has_race, kept, wanted, has_attr)


def with_read_races(targets: Targets, read: Tensor, keep: Tensor) -> Targets:
    """``targets`` with the race distributions ``read`` (B, R) from the thumbnails as the
    target of each row that ``keep`` marks and that names no race itself."""
    fill = keep.to(targets.has_race.device) & ~targets.has_race
    return replace(
        targets,
        race=torch.where(fill[:, None], read.to(targets.race), targets.race),
        has_race=targets.has_race | fill,
        race_kept=targets.race_kept | fill,
    )


def similarity_loss(
    embedding: Tensor,
    reference: Tensor,
    target: float,
    threshold_deg: float,
    temperature_deg: float,
) -> Tensor:
    """``BCE(sigmoid((θ_t − angle) / τ), t)`` per element (PAPER.md §2)."""
    theta = angle(embedding, reference, degrees=True)
    logit = (threshold_deg - theta) / temperature_deg
    return F.binary_cross_entropy_with_logits(
        logit, torch.full_like(logit, target), reduction="none"
    )


@dataclass
class ObjectiveValues:
    """Per-element values of one step: weighted terms for the total, raw
    class losses for the rejection rule (+inf-free: 0 where a target is unset)."""

    weighted: dict[str, Tensor]
    raw: dict[str, Tensor]
    detected: Tensor  # (N,) bool: MTCNN found the face (else the FFHQ-frame fallback)
    angle_deg: Tensor  # (N,) angle to the reference (nan where unset)
    race_probs: Tensor | None  # (N, R)
    attribute_probs: Tensor | None  # (N, A)


def evaluate_objectives(
    extractor: FaceExtractor,
    images: Tensor,
    targets: Targets,
    weights: ObjectiveWeights,
    landmarks: Tensor | None = None,
) -> ObjectiveValues:
    """F on generated images (N, 3, R, R) in [0, 1] → the identity, race and
    attribute terms for N = B·K elements (``targets`` already repeated).

    ``landmarks`` (N, 5, 2) skip detection: the generator draws faces in the
    FFHQ frame, so its fixed landmarks align them without running MTCNN on
    every candidate at every step; None detects.
    """
    return objective_values(extractor(images, landmarks), targets, weights)


def objective_values(
    out: FaceOutput, targets: Targets, weights: ObjectiveWeights
) -> ObjectiveValues:
    """The terms from what F saw (one row per element of ``targets``)."""
    zero = torch.zeros(out.embedding.shape[0], device=out.embedding.device)
    weighted: dict[str, Tensor] = {}
    raw: dict[str, Tensor] = {}
    theta = torch.full_like(zero, math.nan)
    if targets.has_reference.any():
        l_s = similarity_loss(
            out.embedding, targets.reference, 1.0, weights.threshold_deg, weights.temperature_deg
        )
        l_s = torch.where(targets.has_reference, l_s, zero)
        weighted["identity"] = weights.identity * l_s
        raw["identity"] = l_s
        theta = torch.where(
            targets.has_reference,
            angle(out.embedding, targets.reference, degrees=True).detach(),
            theta,
        )
    race_probs = attr_probs = None
    if out.race_logits is not None:
        race_probs = out.race_logits.float().softmax(1).detach()
        if targets.has_race.any():
            # KL(target ‖ F's reading): the cross-entropy less the target's entropy, so a
            # one-hot target's loss is the usual cross-entropy and a read distribution's
            # reaches 0 when F reads just that
            logq = F.log_softmax(out.race_logits.float(), 1)
            p = targets.race
            l_r = (p * (p.clamp_min(1e-12).log() - logq)).sum(1)
            l_r = torch.where(targets.has_race, l_r, zero)
            scale = torch.where(
                targets.race_kept, l_r.new_tensor(weights.kept_race), l_r.new_tensor(weights.race)
            )
            weighted["race"] = scale * l_r
            raw["race"] = torch.where(targets.race_kept, zero, l_r)
    if out.attribute_logits is not None:
        attr_probs = out.attribute_logits.float().sigmoid().detach()
        if targets.has_attribute.any():
            bce = F.binary_cross_entropy_with_logits(
                out.attribute_logits.float(), targets.attributes, reduction="none"
            )
            l_a = (bce * targets.has_attribute).sum(1)
            weighted["attributes"] = weights.attributes * l_a
            raw["attributes"] = l_a
    return ObjectiveValues(weighted, raw, out.detected, theta, race_probs, attr_probs)


def objective_loss(
    extractor: FaceExtractor, targets: Targets, weights: ObjectiveWeights, restarts: int
) -> ExtraLoss:
    """The search's extra loss for B thumbnails' targets, over their B·K candidates.

    Candidates are aligned with the generator's fixed FFHQ-frame landmarks
    (see ``evaluate_objectives``). Race and attribute losses are constraints:
    a candidate whose final value exceeds ``weights.max_class_loss`` is rejected.
    """
    repeated = targets.repeat(restarts)
    named_race = bool((targets.has_race & ~targets.race_kept).any())
    sampler = ViewSampler(weights.views, restarts) if weights.views > 1 else None

    def loss(images: Tensor) -> ExtraTerms:
        n, _, h, w = images.shape
        landmarks = fallback_landmarks(n, h, w, images.device)
        if sampler is None:
            values = evaluate_objectives(extractor, images, repeated, weights, landmarks)
            weighted, raw = values.weighted, values.raw
        else:
            views = sampler.draw()
            out = extractor.forward_crops(view_crops(extractor, images, landmarks, views))
            values = objective_values(out, repeated.tile(views.count), weights)
            weighted, raw = (
                {name: t.view(views.count, n).mean(0) for name, t in d.items()}
                for d in (values.weighted, values.raw)
            )
        constraints = {k: raw[k] for k in ("race", "attributes") if k in raw}
        if not named_race:  # kept races only: nothing a candidate can be rejected for
            constraints.pop("race", None)
        return ExtraTerms(weighted, constraints, dict.fromkeys(constraints, weights.max_class_loss))

    return loss


@torch.no_grad()
def describe(
    extractor: FaceExtractor, images: Tensor, targets: Targets, weights: ObjectiveWeights
) -> list[dict[str, object]]:
    """Per image (B results, one per thumbnail): what F sees in it, for the report."""
    b, _, h, w = images.shape
    values = evaluate_objectives(
        extractor, images, targets, weights, fallback_landmarks(b, h, w, images.device)
    )
    reports: list[dict[str, object]] = []
    race_labels = extractor.race_head.labels if extractor.race_head is not None else ()
    attr_labels = extractor.attribute_head.labels if extractor.attribute_head is not None else ()
    for i in range(b):
        report: dict[str, object] = {}
        if bool(targets.has_reference[i] | targets.has_race[i] | targets.has_attribute[i].any()):
            report["views"] = weights.views  # how F saw the candidates: part of what a seed gives
        if bool(targets.has_reference[i]):
            report["angle_to_reference_deg"] = round(float(values.angle_deg[i]), 2)
            report["same_person"] = bool(values.angle_deg[i] <= weights.threshold_deg)
            report["threshold_deg"] = weights.threshold_deg
        if bool(targets.race_kept[i]):
            report["race_read_from_thumbnail"] = {
                name: round(float(p), 4)
                for name, p in zip(race_labels, targets.race[i], strict=True)
            }
        if values.race_probs is not None:
            report["race_probabilities"] = {
                name: round(float(p), 4)
                for name, p in zip(race_labels, values.race_probs[i], strict=True)
            }
        if values.attribute_probs is not None and bool(targets.has_attribute[i].any()):
            report["attribute_probabilities"] = {
                attr_labels[j]: round(float(values.attribute_probs[i, j]), 4)
                for j in targets.has_attribute[i].nonzero().flatten().tolist()
            }
        reports.append(report)
    return reports
