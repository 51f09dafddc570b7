"""Identity, race and attribute objectives: per element, masked, differentiable."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from worker.engine.face.alignment import SPHEREFACE_112x96
from worker.engine.face.extractor import FaceExtractor
from worker.engine.objectives import (
    ObjectiveWeights,
    build_targets,
    evaluate_objectives,
    similarity_loss,
)


def template_landmarks(n: int) -> torch.Tensor:
    return SPHEREFACE_112x96.tensor()[None].repeat(n, 1, 1)


def test_similarity_loss_is_log2_at_the_threshold_and_falls_with_the_angle() -> None:
    ref = torch.tensor([[1.0, 0.0]])
    at = lambda deg: torch.tensor([[math.cos(math.radians(deg)), math.sin(math.radians(deg))]])  # noqa: E731
    loss = lambda deg, t: float(similarity_loss(at(deg), ref, t, 60.0, 5.0))  # noqa: E731
    assert loss(60.0, 1.0) == pytest.approx(math.log(2), abs=1e-4)
    assert loss(30.0, 1.0) < loss(60.0, 1.0) < loss(90.0, 1.0)
    assert loss(90.0, 0.0) < loss(30.0, 0.0), "target 0 prefers orthogonal embeddings"


def test_targets_follow_names_and_refuse_unknown_ones(extractor: FaceExtractor) -> None:
    t = build_targets(
        extractor,
        ["Black", None],
        [{}, {"Smiling": 1, "Male": 0}],
        [None, torch.ones(128)],
        torch.device("cpu"),
    )
    assert t.has_race.tolist() == [True, False] and t.race[0].tolist() == [0, 1, 0, 0, 0]
    assert not t.race_kept.any() and not t.race[1].any()
    j_smile = extractor.attribute_head.index("Smiling")
    assert t.has_attribute[1].sum() == 2 and t.attributes[1, j_smile] == 1
    assert t.has_reference.tolist() == [False, True]
    assert torch.allclose(t.reference[1].norm(), torch.tensor(1.0))
    r = t.repeat(3)
    assert r.has_race.tolist() == [True] * 3 + [False] * 3
    with pytest.raises(KeyError, match="Martian"):
        build_targets(extractor, ["Martian"], [{}], [None], torch.device("cpu"))
    with pytest.raises(KeyError, match="Wings"):
        build_targets(extractor, [None], [{"Wings": 1}], [None], torch.device("cpu"))


def test_terms_are_per_element_and_masked(extractor: FaceExtractor) -> None:
    images = torch.rand(3, 3, 112, 96, requires_grad=True)
    ref = torch.randn(128)
    targets = build_targets(
        extractor,
        ["Asian", None, None],
        [{}, {"Smiling": 1, "Eyeglasses": 0}, {}],
        [None, None, ref],
        torch.device("cpu"),
    )
    weights = ObjectiveWeights(identity=5.0, race=2.0, attributes=3.0)
    values = evaluate_objectives(extractor, images, targets, weights, template_landmarks(3))

    out = extractor(images.detach(), template_landmarks(3))
    want_race = F.cross_entropy(out.race_logits[:1], torch.tensor([2]))
    assert torch.allclose(
        values.raw["race"], torch.stack([want_race, *[torch.tensor(0.0)] * 2]), atol=1e-5
    )
    js = [extractor.attribute_head.index(n) for n in ("Smiling", "Eyeglasses")]
    want_attr = F.binary_cross_entropy_with_logits(
        out.attribute_logits[1, js], torch.tensor([1.0, 0.0]), reduction="sum"
    )
    assert float(values.raw["attributes"][1].detach()) == pytest.approx(float(want_attr), abs=1e-5)
    assert values.raw["attributes"][[0, 2]].abs().sum() == 0
    assert torch.allclose(values.weighted["attributes"], 3.0 * values.raw["attributes"])
    assert values.raw["identity"][:2].abs().sum() == 0 and values.raw["identity"][2] > 0
    assert math.isnan(values.angle_deg[0]) and 0 < values.angle_deg[2] < 180
    assert values.race_probs.shape == (3, 5) and values.attribute_probs.shape == (3, 40)

    # Each element's gradient comes from its own targets only: none for no target.
    total = torch.stack(list(values.weighted.values())).sum(0)
    total.sum().backward()
    grads = images.grad.flatten(1).abs().sum(1)
    assert grads[0] > 0 and grads[1] > 0 and grads[2] > 0
    images.grad = None
    evaluate_objectives(
        extractor,
        images,
        build_targets(
            extractor, [None, "White", None], [{}, {}, {}], [None, None, None], torch.device("cpu")
        ),
        weights,
        template_landmarks(3),
    ).weighted["race"].sum().backward()
    grads = images.grad.flatten(1).abs().sum(1)
    assert grads[0] == 0 and grads[2] == 0 and grads[1] > 0
