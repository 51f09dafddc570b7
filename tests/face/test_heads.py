import csv
from pathlib import Path

import pytest
import torch

from worker.engine.face.alignment import SPHEREFACE_112x96
from worker.engine.face.extractor import FaceExtractor
from worker.engine.face.heads import (
    CELEBA_ATTRIBUTES,
    FAIRFACE_RACES,
    UTKFACE_RACES,
    AttributeHead,
    RaceHead,
)
from worker.engine.face.mobilefacenet import MobileFaceNet

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


def test_race_head_defaults_to_utkface_five() -> None:
    head = RaceHead(in_dim=32)
    assert head.labels == ("White", "Black", "Asian", "Indian", "Others")
    assert head(torch.randn(3, 32)).shape == (3, 5)
    assert head.index("Indian") == 3
    with pytest.raises(KeyError):
        head.index("Latino_Hispanic")


@pytest.mark.parametrize(
    "cls,labels",
    [(RaceHead, UTKFACE_RACES), (RaceHead, FAIRFACE_RACES), (AttributeHead, CELEBA_ATTRIBUTES)],
    ids=["utkface", "fairface", "celeba"],
)
def test_head_save_load_round_trip(tmp_path: Path, cls: type, labels: tuple) -> None:
    torch.manual_seed(0)
    head = cls(in_dim=64, labels=labels, hidden=48).eval()
    x = torch.randn(4, 64)
    path = tmp_path / "head.pt"
    head.save(path)

    loaded = cls.load(path).eval()

    assert loaded.labels == tuple(labels)
    assert (loaded.in_dim, loaded.hidden) == (64, 48)
    assert torch.equal(loaded(x), head(x))
    assert loaded(x).shape == (4, len(labels))


def test_head_refuses_wrong_kind_and_bad_labels(tmp_path: Path) -> None:
    RaceHead(in_dim=8).save(tmp_path / "race.pt")
    with pytest.raises(ValueError, match="race"):
        AttributeHead.load(tmp_path / "race.pt")
    with pytest.raises(ValueError):
        RaceHead(in_dim=8, labels=["White", "White"])


def test_heads_run_on_a_single_image_in_training_mode() -> None:
    # The search may evaluate one candidate at a time; no batch statistics allowed.
    head = AttributeHead(in_dim=16).train()
    assert head(torch.randn(1, 16)).shape == (1, 40)


def test_attribute_names_in_celeba_order() -> None:
    assert len(CELEBA_ATTRIBUTES) == 40 == len(set(CELEBA_ATTRIBUTES))
    assert CELEBA_ATTRIBUTES[0] == "5_o_Clock_Shadow" and CELEBA_ATTRIBUTES[-1] == "Young"
    head = AttributeHead(in_dim=8)
    assert head.index("Male") == 20 and head.index("Smiling") == 31


@pytest.mark.data
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")
def test_attribute_names_match_celebahq_columns() -> None:
    with open(SHARED / "data" / "celebahq" / "labels.csv", newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header[-40:]) == CELEBA_ATTRIBUTES


def test_extractor_forward_gives_embedding_and_head_logits() -> None:
    model = FaceExtractor(
        MobileFaceNet(),
        SPHEREFACE_112x96,
        0.5,
        0.5,
        race_head=RaceHead(in_dim=128, labels=FAIRFACE_RACES),
        attribute_head=AttributeHead(in_dim=128),
    ).eval()
    landmarks = SPHEREFACE_112x96.tensor()[None].repeat(2, 1, 1)
    out = model(torch.rand(2, 3, 112, 96), landmarks)
    assert out.embedding.shape == (2, 128)
    assert torch.allclose(out.embedding.norm(dim=1), torch.ones(2))
    assert out.race_logits.shape == (2, 7) and out.attribute_logits.shape == (2, 40)
    assert out.detected.tolist() == [True, True]
    assert model.embed(torch.rand(2, 3, 112, 96), landmarks, flip=True).shape == (2, 256)
