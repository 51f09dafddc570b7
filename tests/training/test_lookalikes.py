"""Fast checks of the lookalike stage of train-extractor (PAPER.md §3 item 2): lookalike
generation and its cache, the Siamese loss, meta-epochs end to end (accumulated
lookalikes, θ = 0 first), exact resume, the committed parts, the start from an export and
the frozen copy of F the searches use."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from likeness.errors import LikenessError
from likeness.manifest import sha256_file
from worker.engine.checkpoints import load_generator, save_generator
from worker.engine.face.alignment import SPHEREFACE_112x96
from worker.engine.face.export import export, load_export
from worker.engine.generator import Generator, GeneratorConfig
from worker.engine.mapping_fit import fit_mapping
from worker.engine.objectives import ObjectiveWeights
from worker.engine.search import SearchConfig
from worker.training import lookalikes as looks
from worker.training.extractor.config import ExtractorConfig
from worker.training.extractor.loop import train
from worker.training.extractor.model import build_model
from worker.training.extractor.verdict import siamese_curve, stage_verdict
from worker.training.extractor_data import SyntheticFaces
from worker.training.parts import PART_BYTES, join_parts


def _tiny_generator(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    g = Generator(
        GeneratorConfig.slim(32, channel_max=16, channel_base=256, style_dim=16, n_mlp=2)
    ).eval()
    save_generator(path, g, mapping_fit=fit_mapping(g, samples=2000, batch=1000))
    return path


@pytest.fixture(scope="module")
def generator_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_generator(tmp_path_factory.mktemp("generator") / "g.pt", 0)


def _extractor() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ExtractorConfig.smoke(), classes=4).extractor.eval()


def test_siamese_terms_low_for_an_orthogonal_lookalike_and_a_parallel_mirror() -> None:
    photo, other = torch.eye(8)[:1], torch.eye(8)[1:2]
    low = looks.siamese_terms(other, photo, photo, threshold_deg=70.0, temperature_deg=5.0)
    high = looks.siamese_terms(photo, photo, other, threshold_deg=70.0, temperature_deg=5.0)
    assert float(low) < 0.05 and float(high) > 10.0
    # L(P, I, 0) and L(I, flip I, 1) are each the identity objective's BCE on the sigmoid score
    theta = torch.tensor(90.0)
    away = F.binary_cross_entropy(torch.sigmoid((70.0 - theta) / 5.0), torch.tensor(0.0))
    assert float(low) == pytest.approx(float(away), abs=1e-5)


def test_siamese_loss_gradient_reaches_the_backbone() -> None:
    ext = _extractor()
    torch.manual_seed(1)
    loss = looks.siamese_loss(
        ext,
        torch.rand(3, 3, 32, 32),
        torch.rand(3, 3, 64, 64),
        threshold_deg=5.0,
        temperature_deg=5.0,
    )
    loss.backward()
    grads = [p.grad for p in ext.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_choose_pairs_takes_two_photos_of_one_person_fixed_per_meta_epoch() -> None:
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])  # person 2 has one photo: never chosen
    pairs = looks.choose_pairs(ids, 10, seed=0, meta_epoch=0)
    assert pairs.shape == (3, 2)
    assert all(ids[a] == ids[b] and a != b for a, b in pairs.tolist())
    assert 2 not in ids[pairs.flatten()].tolist()
    assert torch.equal(pairs, looks.choose_pairs(ids, 10, seed=0, meta_epoch=0))
    assert len(looks.choose_pairs(ids, 2, seed=0, meta_epoch=0)) == 2
    with pytest.raises(LikenessError):
        looks.choose_pairs(torch.tensor([0, 1, 2]), 4, seed=0, meta_epoch=0)


def test_lookalikes_have_the_right_shapes_are_saved_per_batch_and_cached(
    generator_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ext, model = _extractor(), load_generator(generator_path)
    photos = SyntheticFaces("identity", 12, 4, SPHEREFACE_112x96, seed=0)
    pairs = looks.choose_pairs(photos.targets, 3, seed=0, meta_epoch=0)
    settings = looks.LookalikeSettings(
        SearchConfig(steps=2, restarts=2),
        ObjectiveWeights(threshold_deg=60.0),
        thumbnail=16,
        batch=4,
    )
    key = {
        "meta_epoch": 0,
        "threshold_deg": 60.0,
        "search": settings.search.model_dump(mode="json"),
        "generator": model.sha256,
    }
    searches: list[int] = []
    real_search = looks.run_search

    def counted(*args: object, **kwargs: object) -> object:
        result = real_search(*args, **kwargs)  # type: ignore[arg-type]
        searches.append(len(args[2]))  # type: ignore[arg-type]  # searches completed
        return result

    monkeypatch.setattr(looks, "run_search", counted)

    def make(path: Path, stop_after: int | None = None) -> looks.Lookalikes:
        return looks.generate_lookalikes(
            ext,
            model,
            photos,
            pairs,
            settings,
            path,
            key,
            seed=0,
            should_stop=lambda: stop_after is not None and len(searches) >= stop_after,
        )

    whole = make(tmp_path / "whole.pt")
    assert searches == [4, 2], "6 thumbnails in batches of 4"
    assert whole.complete and whole.images.shape == (6, 3, 32, 32)
    assert whole.images.dtype == torch.uint8
    assert torch.equal(whole.photo, pairs.flatten())  # rows: P (from I), P' (from I') …
    assert torch.equal(whole.reference, pairs.flip(1).flatten())  # … steered toward I', I
    assert torch.isfinite(whole.angle_deg).all() and torch.isfinite(whole.mse).all()
    assert not ext.training and all(p.requires_grad for p in ext.parameters())

    searches.clear()
    again = make(tmp_path / "whole.pt")
    assert searches == [] and torch.equal(again.images, whole.images)

    part = make(tmp_path / "part.pt", stop_after=1)
    assert part.done == 4 and not part.complete
    assert looks.read_lookalikes(tmp_path / "part.pt", key).done == 4  # type: ignore[union-attr]
    searches.clear()
    rest = make(tmp_path / "part.pt")
    assert searches == [2], "only the rows not saved are searched"
    assert torch.equal(rest.images, whole.images) and torch.equal(rest.mse, whole.mse)

    with pytest.raises(LikenessError, match="threshold_deg") as e:
        looks.read_lookalikes(tmp_path / "whole.pt", key | {"threshold_deg": 61.0})
    assert e.value.code == "lookalikes_mismatch"


def test_lookalikes_are_the_faces_the_search_chose(
    generator_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ext, model = _extractor(), load_generator(generator_path)
    photos = SyntheticFaces("identity", 12, 4, SPHEREFACE_112x96, seed=0)
    pairs = looks.choose_pairs(photos.targets, 3, seed=0, meta_epoch=0)
    search = SearchConfig(steps=3, restarts=2)
    settings = looks.LookalikeSettings(search, ObjectiveWeights(threshold_deg=0.0), 16, 4)
    key = {"meta_epoch": 0, "search": search.model_dump(mode="json"), "generator": model.sha256}
    results: list[object] = []
    real_search = looks.run_search

    def kept(*args: object, **kwargs: object) -> object:
        results.append(real_search(*args, **kwargs))  # type: ignore[arg-type]
        return results[-1]

    monkeypatch.setattr(looks, "run_search", kept)
    path = tmp_path / "m.pt"
    made = looks.generate_lookalikes(ext, model, photos, pairs, settings, path, key, seed=0)
    searched = looks.to_uint8(torch.cat([r.images for r in results]))  # type: ignore[attr-defined]
    assert torch.equal(made.images, searched)
    # A file from before the search latents were dropped still reads (they are ignored).
    old = made.to_dict() | {"w_plus": torch.zeros(6, 4, 16), "seed": torch.zeros(6)}
    torch.save(old, path)
    assert torch.equal(looks.read_lookalikes(path, key).images, searched)  # type: ignore[union-attr]


def test_the_searches_get_a_frozen_copy_and_f_is_untouched() -> None:
    ext = _extractor().train()
    before = {k: v.clone() for k, v in ext.state_dict().items()}
    frozen = looks.frozen_copy(ext, channels_last=True)
    assert frozen is not ext and ext.training
    assert all(torch.equal(v, before[k]) for k, v in ext.state_dict().items())
    assert ext.state_dict().keys() == before.keys()  # F's batch norms still there
    bn = torch.nn.modules.batchnorm._BatchNorm
    assert any(isinstance(m, bn) for m in ext.modules())
    assert not any(isinstance(m, bn) for m in frozen.modules()), "folded in the copy"
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in ext.parameters())
    crops = torch.rand(2, 3, 112, 96)
    ext.eval()
    with torch.no_grad():
        assert torch.allclose(frozen.embed_crops(crops), ext.embed_crops(crops), atol=1e-4)


def test_threshold_zero_is_a_valid_objective() -> None:
    assert ObjectiveWeights(threshold_deg=0.0).threshold_deg == 0.0
    with pytest.raises(ValueError):
        ObjectiveWeights(threshold_deg=-1.0)
    # θ = 0 never counts the reference reached: the pull stays strong at a small angle
    near, far = torch.tensor([[1.0, 0.1]]), torch.tensor([[1.0, 0.0]])
    from worker.engine.objectives import similarity_loss

    at_zero = float(similarity_loss(near, far, 1.0, 0.0, 5.0))
    at_theta = float(similarity_loss(near, far, 1.0, 70.0, 5.0))
    assert at_zero > 0.5 > 1e-3 > at_theta


def test_siamese_curve_and_the_ship_verdict() -> None:
    curve = siamese_curve([float(i) for i in range(20)], points=4)
    assert curve["means"] == [2.0, 7.0, 12.0, 17.0] and curve["steps"] == 20

    def entry(k: int, lfw: float | None, race: float, attr: float) -> dict:
        return {
            "meta_epoch": k,
            "metrics": {"race_top1": race, "attribute_map": attr},
            "lfw": None if lfw is None else {"accuracy": lfw},
        }

    start = entry(0, 0.9765, 0.763, 0.560)
    assert stage_verdict([start, entry(2, 0.9720, 0.755, 0.551)], 2) == (True, [])
    ok, why = stage_verdict([start, entry(2, 0.9710, 0.763, 0.560)], 2)
    assert not ok and why[0].startswith("lfw fell 0.55")
    ok, why = stage_verdict([start, entry(2, 0.9765, 0.752, 0.560)], 2)
    assert not ok and why[0].startswith("race fell 1.10")
    ok, why = stage_verdict([start, entry(2, 0.99, 0.763, 0.548)], 2)
    assert not ok and why[0].startswith("attr fell 1.20")
    assert not stage_verdict([start, entry(1, 0.98, 0.8, 0.6)], 2)[0], "not finished"
    assert not stage_verdict([entry(0, None, 0.7, 0.5), entry(2, None, 0.7, 0.5)], 2)[0]


def _config(out: Path, generator: Path, meta_epochs: int) -> ExtractorConfig:
    return ExtractorConfig.smoke(
        out=str(out),
        steps=1,
        batch=2,
        synthetic_count=8,
        synthetic_classes=2,
        eval_limit=8,
        device="cpu",
        meta_epochs=meta_epochs,
        lookalike_pairs=2,
        siamese_steps=2,
        siamese_batch=2,
        search_steps=2,
        search_restarts=1,
        lookalike_batch=4,
        generator=str(generator),
        first_search_threshold_deg=0.0,
    )


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(
    generator_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[float], object]:
    out = tmp_path_factory.mktemp("full")
    losses: list[float] = []
    trained_on: list[list[int]] = []  # per meta-epoch: the sizes of the sets drawn from
    real = looks.accumulated

    def spy(pairs: list[looks.LookalikePairs]) -> object:
        trained_on.append([len(p) for p in pairs])
        return real(pairs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(looks, "accumulated", spy)
        result = train(
            _config(out, generator_path, 2),
            progress=False,
            on_step=lambda s, m: losses.append(m["loss"]),
        )
    result.trained_on = trained_on  # type: ignore[attr-defined]
    return out, losses, result


def test_two_meta_epochs_write_lookalikes_metrics_and_an_export(full_run: tuple) -> None:
    out, losses, result = full_run
    assert result.reason == "done" and result.step == 1 + 2 * 2 and len(losses) == 5
    assert sorted(p.name for p in (out / "lookalikes").iterdir()) == ["meta_0.pt", "meta_1.pt"]
    saved = torch.load(out / "lookalikes" / "meta_1.pt", weights_only=True)
    assert saved["images"].dtype == torch.uint8 and saved["images"].shape == (4, 3, 32, 32)
    entries = [e for e in _log(out) if e["reason"] == "meta_epoch"]
    assert [e["meta_epoch"] for e in entries] == [0, 1, 2]  # before the stage, then each
    assert "lookalikes" not in entries[0]
    for e in entries[1:]:
        stats = e["lookalikes"]
        assert stats["angle"]["pairs"] == 4 and 0 <= stats["angle"]["mean"] <= 180
        assert stats["angle_at_generation"]["pairs"] == 4
        assert "loss_siamese" in e and e["metrics"]["threshold_deg"] is not None
    # meta-epoch 0 searched with θ = 0 (Algorithm 1's first round), meta-epoch 1 with the
    # θ_t re-fitted after meta-epoch 0
    assert entries[1]["lookalikes"]["threshold_at_generation_deg"] == 0.0
    theta_1 = entries[1]["metrics"]["threshold_deg"]
    assert theta_1 > 0
    assert entries[2]["lookalikes"]["threshold_at_generation_deg"] == theta_1
    # the Siamese steps of meta-epoch 1 drew from the lookalikes of both meta-epochs
    assert result.trained_on == [[4], [4, 4]]
    assert entries[2]["siamese_curve"]["steps"] == 2
    # the checkpoint holds nothing of the lookalikes
    assert "lookalikes" not in torch.load(out / "checkpoint.pt", weights_only=True)
    exported = torch.load(result.export, weights_only=True)
    assert [e["meta_epoch"] for e in exported["metrics"]["siamese"]] == [0, 1, 2]
    assert load_export(result.export).threshold_deg == entries[2]["metrics"]["threshold_deg"]
    assert result.meta_history == exported["metrics"]["siamese"]


def test_stage_from_a_finished_run_resumed_mid_meta_epoch_is_exact(
    full_run: tuple, generator_path: Path, tmp_path: Path
) -> None:
    full_out, full_losses, full_result = full_run
    # A plain run first; the stage is then started on its own by a resume.
    plain = train(_config(tmp_path, generator_path, 0), progress=False, evaluate_at_end=False)
    assert plain.step == 1 and not (tmp_path / "lookalikes").exists()
    losses: list[float] = []

    def record(step: int, metrics: dict[str, float]) -> None:
        losses.append(metrics["loss"])
        # Steps 2-3 are meta-epoch 0's, 4-5 meta-epoch 1's: stop after meta-epoch 0's
        # training (before its measurement), then inside meta-epoch 1.
        if step in (3, 4):
            os.kill(os.getpid(), signal.SIGTERM)

    def leg(checkpoint: Path, evaluate: bool = False) -> object:
        return train(
            _config(tmp_path, generator_path, 2),
            resume=checkpoint,
            progress=False,
            evaluate_at_end=evaluate,
            on_step=record,
        )

    stopped = leg(plain.checkpoint)
    saved = torch.load(stopped.checkpoint, weights_only=True)
    assert stopped.reason == "signal" and (saved["meta_epoch"], saved["meta_step"]) == (0, 2)
    made_0 = (tmp_path / "lookalikes" / "meta_0.pt").stat().st_mtime_ns
    stopped = leg(stopped.checkpoint)
    saved = torch.load(stopped.checkpoint, weights_only=True)
    assert stopped.reason == "signal" and (saved["meta_epoch"], saved["meta_step"]) == (1, 1)
    made_1 = (tmp_path / "lookalikes" / "meta_1.pt").stat().st_mtime_ns
    # A checkpoint from before the lookalikes' latents left it resumes alike (key ignored).
    old = torch.load(stopped.checkpoint, weights_only=True) | {"lookalikes": {"0": {"done": 4}}}
    torch.save(old, stopped.checkpoint)
    resumed = leg(stopped.checkpoint, evaluate=True)
    # the run folder's lookalike files were read back, nothing searched again
    assert (tmp_path / "lookalikes" / "meta_0.pt").stat().st_mtime_ns == made_0
    assert (tmp_path / "lookalikes" / "meta_1.pt").stat().st_mtime_ns == made_1
    assert resumed.reason == "done" and resumed.step == full_result.step
    assert losses == full_losses[1:], "the same steps as the uninterrupted run"
    assert resumed.meta_history == full_result.meta_history
    assert resumed.metrics == full_result.metrics
    for k in (0, 1):
        a = torch.load(full_out / "lookalikes" / f"meta_{k}.pt", weights_only=True)
        b = torch.load(tmp_path / "lookalikes" / f"meta_{k}.pt", weights_only=True)
        assert torch.equal(a["images"], b["images"])
    assert [e["meta_epoch"] for e in _log(tmp_path) if e["reason"] == "meta_epoch"] == [0, 1, 2]


def test_committed_parts_carry_no_lookalikes_and_a_new_machine_trains_on(
    full_run: tuple, generator_path: Path, tmp_path: Path
) -> None:
    full_result = full_run[2]
    first, parts = tmp_path / "first", tmp_path / "committed"

    def stop_in_meta_epoch_1(step: int, metrics: dict[str, float]) -> None:
        if step == 4:  # its first Siamese step
            os.kill(os.getpid(), signal.SIGTERM)

    def leg(out: Path, resume: Path | None = None) -> object:
        return train(
            _config(out, generator_path, 2),
            resume=resume,
            progress=False,
            evaluate_at_end=False,
            on_step=stop_in_meta_epoch_1 if resume is None else None,
            save_parts=parts,
        )

    stopped = leg(first)
    assert stopped.reason == "signal" and stopped.step == 4
    files = sorted(p.name for p in parts.iterdir())
    assert files == ["checkpoint.pt.part000", "checkpoint.pt.parts.json"]
    assert all(p.stat().st_size <= PART_BYTES for p in parts.iterdir())
    # The parts are the run checkpoint itself, which holds no lookalike pixels or latents.
    joined = join_parts(parts / "checkpoint.pt")
    assert joined == (first / "checkpoint.pt").read_bytes()
    committed = torch.load(io.BytesIO(joined), weights_only=True)
    assert set(committed) == {
        *("model", "opt", "pos_weight", "step", "heads_fitted", "meta_epoch", "meta_step"),
        *("threshold_deg", "meta_history", "meta_losses", "classes", "train_seconds", "rng"),
        *("init_sha256", "train_config"),
    }
    assert (committed["meta_epoch"], committed["step"]) == (1, 4)
    shutil.rmtree(first)  # the machine is gone: only the committed parts survive

    second = tmp_path / "second"
    resumed = leg(second, resume=parts)
    assert resumed.reason == "done" and resumed.step == full_result.step
    assert [h["meta_epoch"] for h in resumed.meta_history] == [0, 1, 2]
    # The second meta-epoch's lookalikes were searched again; the first's are gone, so
    # its Siamese steps drew from the second's alone.
    assert not (second / "lookalikes" / "meta_0.pt").exists()
    assert torch.load(second / "lookalikes" / "meta_1.pt", weights_only=True)["done"] > 0


def test_the_stage_starts_from_an_export(generator_path: Path, tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = build_model(ExtractorConfig.smoke(), classes=2).extractor.eval()
    source.threshold_deg = 41.0
    export(source, tmp_path / "f.pt", {}, False, {})
    config = _config(tmp_path / "run", generator_path, 0).model_copy(
        update={"init_export": str(tmp_path / "f.pt"), "steps": 0}
    )
    result = train(config, progress=False, evaluate_at_end=False)
    ckpt = torch.load(result.checkpoint, weights_only=True)
    model = ckpt["model"]
    for name, tensor in source.state_dict().items():  # backbone and heads as exported
        assert torch.equal(model[f"extractor.{name}"], tensor), name
    fresh = build_model(config, classes=2).state_dict()  # the centres were fitted
    assert not torch.equal(model["arcface.weight"], fresh["arcface.weight"])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["head_fit"]["faces"] == {"identity": 8}  # centres only
    # The start is named by its content: a ship may overwrite the file at that path later.
    started_from = sha256_file(tmp_path / "f.pt")
    assert ckpt["init_sha256"] == started_from
    exported = torch.load(result.export, weights_only=True)
    assert exported["train"]["init_sha256"] == started_from
    with pytest.raises(LikenessError, match="cannot read"):
        bad = config.model_copy(update={"init_export": str(tmp_path / "run" / "log.jsonl")})
        train(bad.model_copy(update={"out": str(tmp_path / "bad")}), progress=False)


def test_the_stage_fails_at_once_without_a_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_default(spec: str | None, kind: str, manifest_path: Path | None = None) -> None:
        raise LikenessError("no_default_weights", f"no {kind} weights are bundled")

    monkeypatch.setattr("worker.pipeline.resolve_weights", no_default)
    config = _config(tmp_path, tmp_path, 1).model_copy(update={"generator": None})
    with pytest.raises(LikenessError, match="--generator") as e:
        train(config, progress=False)
    assert e.value.code == "no_default_weights"
    assert not (tmp_path / "checkpoint.pt").exists(), "before any training"


def test_cli_passes_the_stage_options(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    r = CliRunner().invoke(
        app,
        [
            "train-extractor",
            "--smoke",
            "--out",
            str(tmp_path),
            "--meta-epochs",
            "2",
            "--lookalike-pairs",
            "3",
            "--search-steps",
            "7",
            "--generator",
            str(tmp_path / "no.pt"),
        ],
    )
    assert r.exit_code == 2 and "no.pt" in r.output
    assert "meta-epochs 2, each 3 pairs (7-step searches" in r.output


SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.data
def test_celebahq_photos_reach_f_as_their_training_crops(tmp_path: Path) -> None:
    from worker.training.extractor_data import identity_faces

    faces = identity_faces(
        [SHARED_DATA / "celebahq"], "train", SPHEREFACE_112x96, tmp_path, limit=6
    )[0]
    photos = looks.read_photos(faces, torch.arange(3))
    assert photos.shape == (3, 3, 128, 128)
    crops = looks.framed_crops(_extractor(), photos)
    assert torch.equal(crops, torch.stack([faces[i][0] for i in range(3)]))


def test_cli_saves_parts_and_resumes_from_them(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    first = ["train-extractor", "--smoke", "--out", str(tmp_path / "a"), "--lfw-pairs", "0"]
    r = runner.invoke(app, [*first, "--save-parts", str(tmp_path / "parts")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "parts" / "checkpoint.pt.parts.json").is_file()
    again = ["train-extractor", "--smoke", "--out", str(tmp_path / "b"), "--steps", "5"]
    r = runner.invoke(app, [*again, "--resume", str(tmp_path / "parts")])
    assert r.exit_code == 0, r.output
    assert f"resuming from {tmp_path / 'parts'}" in r.output.replace("\n", "")
    assert "stopped (done) at step 5" in r.output
    r = runner.invoke(app, [*again, "--resume", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no such checkpoint" in r.output
