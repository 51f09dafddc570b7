"""Judges: learn from labelled crops, round-trip through their file, frame faces like F."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from likeness.labels import CELEBA_ATTRIBUTES
from worker.training.judges import (
    INPUT_SIZE,
    JudgeData,
    aligned_crops,
    load_judge,
    predict,
    save_judge,
    train_judge,
)

SIDE = 16  # the judges are convolutional: small inputs and widths keep the tests quick
SMALL = (8, 8, 16, 16)


def tinted(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose colour says the class: learnable, but not by a constant guess."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    x = torch.rand(n, 3, SIDE, SIDE, generator=g) * 0.5
    x[torch.arange(n), y % 3] += 0.2 + 0.15 * (y // 3).float().view(-1, 1, 1)
    return (x.clamp(0, 1) * 255).byte(), y


def test_race_judge_learns_and_reports_per_class() -> None:
    tx, ty = tinted(300, 5, 0)
    vx, vy = tinted(100, 5, 1)
    net, metrics = train_judge(
        "race", JudgeData(tx, ty, vx, vy), epochs=6, batch=32, log=lambda _: None, widths=SMALL
    )
    assert metrics["top1"] >= 0.6, metrics  # chance is 0.2
    assert set(metrics["per_class"]) <= set(net.labels) and metrics["epochs"] == 6
    assert metrics["mean_per_class"] == pytest.approx(
        sum(metrics["per_class"].values()) / len(metrics["per_class"])
    )


def test_race_classes_weigh_by_inverse_frequency() -> None:
    from worker.training.judges import class_weights

    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    w = class_weights(y, 4)  # class 3 unseen: weighted as if seen once, never infinite
    torch.testing.assert_close(w, torch.tensor([10 / 24, 10 / 12, 10 / 4, 10 / 4]))
    # every class then carries the same total weight
    totals = torch.zeros(3).index_add_(0, y, w[y])
    torch.testing.assert_close(totals, torch.full((3,), 2.5))


def test_attribute_judge_reports_map_and_accuracy() -> None:
    tx, ty = tinted(120, 2, 2)
    labels = torch.zeros(120, 40, dtype=torch.long)
    labels[:, 31] = ty  # 'Smiling'
    data = JudgeData(tx, labels, tx[:40], labels[:40])
    _, metrics = train_judge(
        "attributes", data, epochs=1, batch=32, log=lambda _: None, widths=SMALL
    )
    assert 0 <= metrics["attribute_map"] <= 1 and len(metrics["accuracy"]) == 40


def rare_attribute(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tinted images with 'Narrow_Eyes' true on 10% of them (a red tint says which)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, SIDE, SIDE, generator=g) * 0.5
    y = torch.zeros(n, 40, dtype=torch.long)
    y[: n // 10, 23] = 1
    x[: n // 10, 0] += 0.25
    return (x.clamp(0, 1) * 255).byte(), y


def test_attributes_are_decided_against_their_prior() -> None:
    from worker.training.judges import (
        JudgeNet,
        attribute_decisions,
        balanced_accuracy,
        prior_log_odds,
    )

    y = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 0]])
    torch.testing.assert_close(prior_log_odds(y)[:2], torch.log(torch.tensor([1 / 3, 1.0])))
    assert bool(prior_log_odds(y)[2].isfinite())  # never present: large, finite
    net = JudgeNet(["a", "b", "c"], SMALL)
    logits = torch.tensor(
        [[-1.0, 0.5, 0.0], [-3.0, -0.5, 0.0], [-2.5, 1.0, 0.0], [-1.5, -0.2, 0.0]]
    )
    # at 0, 'a' is absent everywhere: chance on a balanced set whatever the logits rank
    assert balanced_accuracy(net, logits, y) == {"a": 0.5, "b": 0.5}  # 'c': one value only
    net.prior_logit = torch.tensor([-2.0, 0.0, 0.0])
    said = attribute_decisions(net, logits)
    assert said[:, :2].tolist() == [[True, True], [False, False], [False, True], [True, False]]
    # 'a': its positive said yes (1/1), its negatives no on 2 of 3; 'b': 1/2 and 1/2
    assert balanced_accuracy(net, logits, y) == pytest.approx({"a": (1 + 2 / 3) / 2, "b": 0.5})


def test_calibrating_a_judge_file_keeps_its_weights(tmp_path: Path) -> None:
    from worker.training.judges import JudgeNet, calibrate_judge, prior_log_odds

    tx, ty = rare_attribute(64, 6)
    net = JudgeNet(CELEBA_ATTRIBUTES, SMALL)  # a file from before the priors: decides at 0
    save_judge(net.eval(), "attributes", tmp_path / "j.pt", {"attribute_map": 0.5, "epochs": 3})
    assert torch.equal(load_judge(tmp_path / "j.pt").prior_logit, torch.zeros(40))
    metrics = calibrate_judge(tmp_path / "j.pt", ty, tx, ty)
    back = load_judge(tmp_path / "j.pt")
    torch.testing.assert_close(back.prior_logit, prior_log_odds(ty))
    for name, tensor in load_judge(tmp_path / "j.pt").state_dict().items():
        torch.testing.assert_close(tensor, net.state_dict()[name].half().to(tensor.dtype))
    assert metrics["epochs"] == 3 and set(metrics["balanced_accuracy"]) == {"Narrow_Eyes"}


@pytest.mark.parametrize("stem_stride", [2, 1])
def test_save_load_round_trip(tmp_path: Path, stem_stride: int) -> None:
    tx, ty = tinted(64, 5, 3)
    net, metrics = train_judge(
        "race",
        JudgeData(tx, ty, tx, ty),
        epochs=1,
        batch=32,
        log=lambda _: None,
        widths=SMALL,
        stem_stride=stem_stride,
    )
    save_judge(net, "race", tmp_path / "j.pt", metrics)
    back = load_judge(tmp_path / "j.pt")
    assert back.labels == net.labels and back.stem_stride == net.stem_stride == stem_stride
    # fp16 storage: logits agree to half precision
    torch.testing.assert_close(predict(back, tx), predict(net, tx), atol=0.05, rtol=0.01)
    with pytest.raises(ValueError):
        torch.save({"format": "other"}, tmp_path / "bad.pt")
        load_judge(tmp_path / "bad.pt")


def test_crops_are_64px_on_the_arcface_template() -> None:
    images = torch.rand(2, 3, 128, 128)
    crops = aligned_crops(images, None)
    assert crops.shape == (2, 3, INPUT_SIZE, INPUT_SIZE)
    assert 0 <= float(crops.min()) <= float(crops.max()) <= 1


def test_files_from_before_the_stem_stride_load_as_stride_one(tmp_path: Path) -> None:
    from worker.training.judges import JudgeNet

    net = JudgeNet(["a", "b"], SMALL, stem_stride=1)
    torch.save(
        {
            "format": "likeness-judge-v1",
            "task": "race",
            "labels": ["a", "b"],
            "widths": list(SMALL),
            "state_dict": net.state_dict(),
            "metrics": {},
        },
        tmp_path / "old.pt",
    )
    back = load_judge(tmp_path / "old.pt")
    x = torch.rand(2, 3, 64, 64)
    assert back.stem_stride == 1
    torch.testing.assert_close(back(x), net.eval()(x))


def test_cli_trains_into_another_manifest_with_the_stem_stride_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import sys

    from typer.testing import CliRunner

    from cli.main import app
    from tests.evaluation.synthetic import write_data_root

    write_data_root(tmp_path / "data", people=2, utk_per_race=4)
    into = tmp_path / "w"  # a folder of its own: the bundled judges stay as they are
    args = ["train-judges", "--data-root", str(tmp_path / "data"), "--task", "race"]
    args += ["--epochs", "1", "--stem-stride", "1", "--into", str(into)]
    args += ["--cache", str(tmp_path / "cache"), "--threads", "1"]
    monkeypatch.setattr(sys, "argv", ["likeness", *args])  # recorded as typed
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (entry,) = json.loads((into / "manifest.json").read_text())["models"]
    assert entry["name"] == "judge-race" and entry["config"]["stem_stride"] == 1
    assert entry["provenance"]["command"] == "likeness " + " ".join(args)
    assert load_judge(into / entry["file"]).stem_stride == 1
    result = CliRunner().invoke(app, [*args[:-4], "--stem-stride", "3"])
    assert result.exit_code == 2


def test_cli_calibrates_the_registered_attribute_judge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import sys

    from typer.testing import CliRunner

    from cli.main import app
    from likeness.manifest import WeightsEntry, register, sha256_file
    from tests.evaluation.synthetic import write_data_root

    write_data_root(tmp_path / "data", people=4, utk_per_race=1)
    into = tmp_path / "w"
    args = ["train-judges", "--data-root", str(tmp_path / "data"), "--task", "attributes"]
    args += ["--into", str(into), "--cache", str(tmp_path / "cache"), "--threads", "1"]
    missing = CliRunner().invoke(app, [*args, "--calibrate-only"])
    assert missing.exit_code != 0 and "train it first" in missing.output
    for option in (["--epochs", "3"], ["--epochs", "8"], ["--balanced"], ["--stem-stride", "2"]):
        # an option equal to its default is still a request to train
        training_option = CliRunner().invoke(app, [*args, "--calibrate-only", *option])
        assert training_option.exit_code != 0 and "trains nothing" in training_option.output
    result = CliRunner().invoke(app, [*args, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    (trained,) = json.loads((into / "manifest.json").read_text())["models"]
    net = load_judge(into / trained["file"])
    assert bool(net.prior_logit.ne(0).any())  # training sets them
    net.prior_logit = torch.zeros(40)  # as a judge from before the priors: decides at 0
    save_judge(net, "attributes", into / trained["file"], trained["metrics"])
    trained["sha256"] = sha256_file(into / trained["file"])
    register(WeightsEntry(**trained), into / "manifest.json")
    before = load_judge(into / trained["file"]).state_dict()
    monkeypatch.setattr(sys, "argv", ["likeness", *args, "--calibrate-only"])
    result = CliRunner().invoke(app, [*args, "--calibrate-only"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads((into / "manifest.json").read_text())["models"]
    calibrated = load_judge(into / entry["file"])
    assert entry["sha256"] == sha256_file(into / entry["file"]) != trained["sha256"]
    assert "--calibrate-only" in entry["provenance"]["decision"]
    assert entry["provenance"]["data"] == trained["provenance"]["data"]
    assert "balanced_accuracy" in entry["metrics"]
    assert bool(calibrated.prior_logit.ne(0).any())
    for name, tensor in calibrated.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    race = CliRunner().invoke(app, [*args[:4], "race", *args[5:], "--calibrate-only"])
    assert race.exit_code != 0 and "attribute judge" in race.output
