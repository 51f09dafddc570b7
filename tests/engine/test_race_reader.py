"""The race reader and the kept race: a thumbnail's reading becomes a soft race target
that steers the search but never rejects a candidate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from likeness.errors import LikenessError
from likeness.labels import UTKFACE_RACES
from likeness.manifest import WeightsEntry, register, sha256_file
from worker.engine.downscale import downscale
from worker.engine.face.extractor import FaceExtractor, FaceOutput
from worker.engine.face.race_reader import RaceReader, load_reader, race_targets, save_reader
from worker.engine.objectives import (
    ObjectiveWeights,
    build_targets,
    objective_loss,
    objective_values,
    with_read_races,
)
from worker.pipeline import build_objective, load_race_reader


def test_the_reader_gives_probabilities_for_any_thumbnail_size_and_round_trips(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    reader = RaceReader(UTKFACE_RACES, width=8).eval()
    reader.mean.fill_(0.4)
    for side in (12, 16, 32):
        p = reader.read(torch.rand(3, 3, side, side))
        assert p.shape == (3, 5) and torch.allclose(p.sum(1), torch.ones(3))
    big = torch.rand(2, 3, 32, 32)
    assert torch.allclose(reader.read(big), reader.read(downscale(big, 16)), atol=1e-5), (
        "a 32-px thumbnail is read as the search's 16-px downscale of it"
    )
    x = torch.rand(2, 3, 16, 16)
    save_reader(reader, tmp_path / "r.pt", {"top1": 0.5})
    again = load_reader(tmp_path / "r.pt")
    assert again.labels == UTKFACE_RACES and torch.equal(again.mean, reader.mean)
    assert torch.allclose(again.read(x), reader.read(x))
    torch.save({"format": "something else"}, tmp_path / "bad.pt")
    with pytest.raises(LikenessError, match="not a race reader"):
        load_reader(tmp_path / "bad.pt")


def test_a_reading_is_mapped_onto_fs_labels_by_name() -> None:
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    out = race_targets(probs, ("A", "B", "C", "D"), ("D", "B", "Z"))
    # Z is unknown to the reader; A and C are unknown to F: the rest renormalised
    assert out[0].tolist() == pytest.approx([0.4 / 0.6, 0.2 / 0.6, 0.0])
    with pytest.raises(LikenessError, match="share none"):
        race_targets(probs, ("A", "B", "C", "D"), ("X", "Y"))


def _output(race_logits: torch.Tensor) -> FaceOutput:
    n = race_logits.shape[0]
    embedding = F.normalize(torch.ones(n, 4), dim=1)
    return FaceOutput(embedding, embedding, torch.ones(n, dtype=torch.bool), race_logits, None)


def test_a_kept_race_steers_but_never_rejects_and_a_named_race_is_untouched(
    extractor: FaceExtractor,
) -> None:
    t = build_targets(
        extractor, ["Black", None, None], [{}, {}, {}], [None] * 3, torch.device("cpu")
    )
    read = torch.tensor([[1.0, 0, 0, 0, 0], [0.1, 0.6, 0.1, 0.1, 0.1], [0.2] * 5])
    kept = with_read_races(t, read, torch.tensor([True, True, False]))
    assert kept.has_race.tolist() == [True, True, False]
    assert kept.race_kept.tolist() == [False, True, False]
    assert kept.race[0].tolist() == [0, 1, 0, 0, 0], "a named race is not replaced"
    assert torch.allclose(kept.race[1], read[1])

    logits = torch.randn(3, 5, requires_grad=True)
    values = objective_values(_output(logits), kept, ObjectiveWeights(race=2.0, kept_race=0.5))
    ce = F.cross_entropy(logits[:1], torch.tensor([1]))
    assert float(values.raw["race"][0].detach()) == pytest.approx(float(ce), rel=1e-5), (
        "a named race's loss is the cross-entropy, as before"
    )
    assert float(values.weighted["race"][0]) == pytest.approx(2.0 * float(ce), rel=1e-5)
    kl = (read[1] * (read[1].log() - logits[1].log_softmax(0))).sum()
    assert float(values.weighted["race"][1]) == pytest.approx(0.5 * float(kl), rel=1e-5), (
        "a kept race has its own weight"
    )
    assert float(values.raw["race"][1]) == 0.0, "a kept race is no reason to reject"
    assert float(values.weighted["race"][2]) == 0.0, "not kept, not named: no race term"
    values.weighted["race"].sum().backward()
    assert logits.grad is not None and logits.grad[1].abs().sum() > 0

    one = build_targets(extractor, [None], [{}], [None], torch.device("cpu"))
    one = with_read_races(one, read[1:2], torch.tensor([True]))
    exact = objective_values(_output(read[1:2].log()), one, ObjectiveWeights())
    assert float(exact.weighted["race"][0]) == pytest.approx(0.0, abs=1e-6), (
        "F reading just the kept distribution costs nothing"
    )


def test_the_objective_reads_only_the_thumbnails_that_keep_their_race(
    extractor: FaceExtractor,
) -> None:
    torch.manual_seed(0)
    reader = RaceReader(UTKFACE_RACES, width=8).eval()
    objective = build_objective(
        extractor,
        ObjectiveWeights(),
        [None, None, "Asian"],
        [{}, {}, {}],
        [None] * 3,
        keep_races=[True, False, True],
        race_reader=reader,
    )
    assert objective.targets.has_race.tolist() == [False, False, True], (
        "nothing is read before the thumbnails are seen"
    )
    thumbs = torch.rand(3, 3, 16, 16)
    read = objective.reading(thumbs).targets
    assert read.race_kept.tolist() == [True, False, False]
    assert torch.allclose(read.race[0], reader.read(thumbs[:1])[0], atol=1e-6)
    assert read.race[2].tolist() == [0, 0, 1, 0, 0]
    plain = build_objective(extractor, ObjectiveWeights(), [None], [{}], [None])
    assert plain.reading(thumbs[:1]) is plain, "without a reader nothing is kept"


def test_only_a_named_race_is_a_constraint(extractor: FaceExtractor) -> None:
    images = torch.rand(2, 3, 64, 64)
    read = torch.full((2, 5), 0.2)

    def constraints(races: list[str | None]) -> dict[str, torch.Tensor]:
        t = build_targets(extractor, races, [{}, {}], [None, None], torch.device("cpu"))
        t = with_read_races(t, read, torch.tensor([True, True]))
        loss = objective_loss(extractor, t, ObjectiveWeights(), restarts=1)
        return loss(images).constraints

    assert "race" not in constraints([None, None]), "kept races only: nothing to reject"
    mixed = constraints(["Black", None])["race"]
    assert float(mixed[0]) > 0 and float(mixed[1]) == 0.0


def test_a_weights_folder_without_a_reader_keeps_no_race_and_a_bad_file_is_refused(
    tmp_path: Path,
) -> None:
    assert load_race_reader(torch.device("cpu"), tmp_path / "manifest.json") is None
    save_reader(RaceReader(UTKFACE_RACES, width=4), tmp_path / "race_reader.pt", {})
    entry = WeightsEntry(
        name="race-reader",
        kind="race-reader",
        file="race_reader.pt",
        sha256=sha256_file(tmp_path / "race_reader.pt"),
        default=True,
    )
    register(entry, tmp_path / "manifest.json")
    reader = load_race_reader(torch.device("cpu"), tmp_path / "manifest.json")
    assert reader is not None and not reader.training
    assert not any(p.requires_grad for p in reader.parameters())
    (tmp_path / "race_reader.pt").write_bytes(b"damaged")
    with pytest.raises(LikenessError, match="does not match its manifest"):
        load_race_reader(torch.device("cpu"), tmp_path / "manifest.json")
    (tmp_path / "race_reader.pt").unlink()
    with pytest.raises(LikenessError, match="listed in the weights manifest but missing"):
        load_race_reader(torch.device("cpu"), tmp_path / "manifest.json")
