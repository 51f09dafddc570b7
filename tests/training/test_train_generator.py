"""train-generator: the loop on synthetic images, exact resume, D layout,
DiffAugment, the zip data set (on a zip the test writes itself), learning
from the measured pixels of masked images only, the race term and the
reconstructions of a checkpoint."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import signal
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from likeness.errors import LikenessError
from worker.engine.checkpoints import load_generator
from worker.engine.generator import Generator, GeneratorConfig
from worker.training.generator.config import TrainConfig
from worker.training.generator.diffaugment import diff_augment, parse_policy
from worker.training.generator.discriminator import Discriminator
from worker.training.generator.loop import train
from worker.training.generator.state import read_checkpoint
from worker.training.images_zip import ImagesZip, StepSampler


def tiny(out: Path, steps: int, **overrides: object) -> TrainConfig:
    """A 16-px run of ``steps`` steps at batch 4, regularisers due every other step."""
    base: dict[str, object] = dict(
        resolution=16,
        channel_max=16,
        channel_base=128,
        style_dim=16,
        n_mlp=2,
        batch=4,
        total_kimg=steps * 4 / 1000,
        r1_every=2,
        latent_avg_samples=256,
        out=out,
        synthetic_count=32,
        device="cpu",
    )
    return TrainConfig.smoke(**(base | overrides))


def run(config: TrainConfig, resume: Path | None = None) -> dict[int, dict[str, float]]:
    losses: dict[int, dict[str, float]] = {}
    train(
        config,
        resume=resume,
        progress=False,
        on_step=lambda step, metrics: losses.__setitem__(step, metrics),
    )
    return losses


def test_smoke_training_writes_checkpoint_generator_grid_and_log(tmp_path: Path) -> None:
    config = tiny(tmp_path, steps=5, resolution=32, channel_base=512)
    losses = run(config)
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert all(math.isfinite(v) for m in losses.values() for v in m.values())
    assert "r1" in losses[1] and "r1" not in losses[2]  # lazy R1 on steps 0, 2, 4
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 5 and set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    loaded = load_generator(tmp_path / "g_ema.pt")
    assert loaded.generator.config == config.generator_config()
    assert loaded.latent_avg is not None and loaded.latent_avg.shape == (16,)
    assert loaded.mapping_fit is not None
    grid = Image.open(tmp_path / "samples_kimg0000.png")
    assert grid.size == (8 * 32, 4 * 32)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["reason"] == "done" and log[-1]["step"] == 5
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_gives_identical_next_step_losses(tmp_path: Path) -> None:
    # path length on too, so its running mean must survive the checkpoint
    extra = dict(pl_weight=2.0, pl_every=2)
    full = run(tiny(tmp_path / "full", steps=6, **extra))
    first = run(tiny(tmp_path / "split", steps=3, **extra))
    rest = run(
        tiny(tmp_path / "split", steps=6, **extra), resume=tmp_path / "split" / "checkpoint.pt"
    )
    assert sorted(rest) == [4, 5, 6]
    assert {**first, **rest} == full  # bit-exact, regularised steps included
    a = read_checkpoint(tmp_path / "full" / "checkpoint.pt")["G_ema"]
    b = read_checkpoint(tmp_path / "split" / "checkpoint.pt")["G_ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_committed_parts_is_exact_and_checks_them(tmp_path: Path) -> None:
    from cli.train_generator import resolve_resume
    from worker.training.parts import index_path, split_into_parts

    full = run(tiny(tmp_path / "full", steps=4))
    run(tiny(tmp_path / "split", steps=2))
    committed = tmp_path / "committed" / "checkpoint.pt"
    parts = split_into_parts(tmp_path / "split" / "checkpoint.pt", committed, part_bytes=50_000)
    assert len(parts) > 1 and all(p.stat().st_size <= 50_000 for p in parts)
    assert not committed.exists() and index_path(committed).is_file()
    rest = run(tiny(tmp_path / "resumed", steps=4), resume=committed)
    assert rest == {k: v for k, v in full.items() if k > 2}
    # the index names the same checkpoint, to the loader and to --resume
    by_index = read_checkpoint(index_path(committed))["G_ema"]
    saved = read_checkpoint(tmp_path / "split" / "checkpoint.pt")["G_ema"]
    assert all(torch.equal(by_index[k], saved[k]) for k in saved)
    assert resolve_resume(str(index_path(committed)), tmp_path) == index_path(committed)
    with pytest.raises(LikenessError, match="no such checkpoint: nowhere.pt.parts.json"):
        resolve_resume("nowhere.pt.parts.json", tmp_path)

    # A fresh split replaces every old part; a damaged part is named, not loaded.
    split_into_parts(tmp_path / "split" / "checkpoint.pt", committed, part_bytes=10**9)
    left = sorted(p.name for p in committed.parent.glob("*.part[0-9]*"))
    assert left == ["checkpoint.pt.part000"]
    damaged = committed.with_name("checkpoint.pt.part000")
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"x")
    with pytest.raises(LikenessError, match="part000 does not match"):
        read_checkpoint(committed)


def test_warm_start_from_a_shipped_generator(tmp_path: Path) -> None:
    from worker.training.generator.state import build_state

    run(tiny(tmp_path / "first", steps=2, objective="vae"))
    shipped = tmp_path / "first" / "g_ema.pt"
    expected = load_generator(shipped).generator.state_dict()
    state = build_state(
        tiny(tmp_path / "second", steps=1, objective="vae", init_generator=shipped),
        torch.device("cpu"),
    )
    for module in (state.G, state.G_ema):
        got = module.state_dict()
        assert all(torch.equal(got[k], expected[k].float()) for k in expected)
    assert state.step == 0 and state.E is not None  # only G carries over
    losses = run(tiny(tmp_path / "second", steps=1, objective="vae", init_generator=shipped))
    assert all(math.isfinite(v) for v in losses[1].values())
    with pytest.raises(LikenessError, match="style_dim"):
        build_state(
            tiny(tmp_path / "third", steps=1, style_dim=32, init_generator=shipped),
            torch.device("cpu"),
        )


def test_signal_and_time_limit_stop_with_a_checkpoint(tmp_path: Path) -> None:
    def interrupt(step: int, metrics: dict[str, float]) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    result = train(tiny(tmp_path / "sig", steps=50), progress=False, on_step=interrupt)
    assert (result.reason, result.step) == ("signal", 2)
    assert read_checkpoint(result.checkpoint)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored

    result = train(tiny(tmp_path / "time", steps=50, max_minutes=1e-6), progress=False)
    assert (result.reason, result.step) == ("max_minutes", 1)


def test_cli_smoke_and_resume_guard(tmp_path: Path) -> None:
    import typer

    from cli.train_generator import train_generator

    app = typer.Typer()
    app.command()(train_generator)
    out = tmp_path / "cli"
    args = [
        "--smoke",
        "--out",
        str(out),
        "--kimg",
        "0.008",
        "--resolution",
        "16",
        "--channel-base",
        "128",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "g_ema.pt").is_file()
    # resuming may extend the run but not change the model or the optimiser
    result = CliRunner().invoke(app, [*args, "--resume", "auto", "--batch", "8"])
    assert result.exit_code == 2 and "cannot change batch" in result.output
    result = CliRunner().invoke(app, [*args[:4], "0.016", "--resume", "auto"])
    assert result.exit_code == 0, result.output
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 4
    # the race term: F defaults to the manifest's; an unknown F, or an F without a race
    # weight, is one line and no run
    race = [*args[:2], str(tmp_path / "race"), *args[3:], "--objective", "vae"]
    race[race.index("16")] = "32"
    race[race.index("128")] = "512"
    result = CliRunner().invoke(app, [*race, "--race-weight", "1", "--race-extractor", "no-f"])
    assert result.exit_code == 2 and "no-f" in result.output
    result = CliRunner().invoke(app, [*race, "--race-extractor", "extractor"])
    assert result.exit_code == 2 and "--race-weight above 0" in result.output
    assert not (tmp_path / "race").exists()
    result = CliRunner().invoke(app, [*race, "--race-weight", "1"])
    assert result.exit_code == 0, result.output
    saved = read_checkpoint(tmp_path / "race" / "checkpoint.pt")["train_config"]
    assert Path(saved["race_extractor"]).resolve() == bundled_extractor().resolve()
    # a run started with its own F keeps it when a resume changes the weight
    own = tmp_path / "own_f.pt"
    own.write_bytes(bundled_extractor().read_bytes())
    race[race.index(str(tmp_path / "race"))] = str(tmp_path / "own")
    result = CliRunner().invoke(app, [*race, "--race-weight", "1", "--race-extractor", str(own)])
    assert result.exit_code == 0, result.output
    race[race.index("0.008")] = "0.016"
    result = CliRunner().invoke(app, [*race, "--resume", "auto", "--race-weight", "0.5"])
    assert result.exit_code == 0, result.output
    saved = read_checkpoint(tmp_path / "own" / "checkpoint.pt")["train_config"]
    assert (saved["race_weight"], Path(saved["race_extractor"])) == (0.5, own)


# ---------------------------------------------------------------- discriminator

PORT_BLOCK_KEYS = [
    "conv1.0.weight",
    "conv1.1.bias",
    "conv2.0.kernel",
    "conv2.1.weight",
    "conv2.2.bias",
    "skip.0.kernel",
    "skip.1.weight",
]


def test_discriminator_layout_and_strict_round_trip() -> None:
    config = GeneratorConfig.slim(16, channel_max=32, channel_base=256, style_dim=16, n_mlp=2)
    torch.manual_seed(0)
    d = Discriminator(config)
    expected = {
        "convs.0.0.weight",
        "convs.0.1.bias",
        "final_conv.0.weight",
        "final_conv.1.bias",
        "final_linear.0.weight",
        "final_linear.0.bias",
        "final_linear.1.weight",
        "final_linear.1.bias",
    }
    expected |= {f"convs.{i}.{k}" for i in (1, 2) for k in PORT_BLOCK_KEYS}
    assert set(d.state_dict()) == expected
    assert d.state_dict()["convs.0.0.weight"].shape == (config.width(16), 3, 1, 1)
    assert d.state_dict()["final_conv.0.weight"].shape[1] == config.width(4) + 1

    torch.manual_seed(1)
    other = Discriminator(config)
    other.load_state_dict(d.state_dict(), strict=True)
    x = torch.randn(6, 3, 16, 16)  # 6: the stddev group falls back to 3
    with torch.no_grad():
        assert d(x).shape == (6, 1)
        assert torch.equal(d(x), other(x))


# ---------------------------------------------------------------- DiffAugment


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_diffaugment_keeps_shape_and_is_differentiable(policy: str) -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    y = diff_augment(x * 2 - 1, policy)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_diffaugment_policy_parsing() -> None:
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(diff_augment(x, "none"), x)
    assert parse_policy(" color , cutout ") == ["color", "cutout"]
    with pytest.raises(ValueError, match="unknown augmentation"):
        parse_policy("color,rotate")


# ---------------------------------------------------------------- data


def write_zip(
    path: Path, colours: list[tuple[int, int, int]], size: int = 64, masked: bool = False
) -> list[str]:
    """Flat images with a black left half; ``masked``: the right quarter is invented
    (alpha 0), as prepare-generator-data marks a framed chip's margin."""
    names = [f"{i:05d}.webp" for i in range(len(colours))]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, colour in zip(names, colours, strict=True):
            image = Image.new("RGBA" if masked else "RGB", (size, size), colour)
            image.paste((0, 0, 0), (0, 0, size // 2, size))  # left half black: shows a flip
            if masked:
                image.putalpha(Image.new("L", (size, size), 255))
                image.paste((9, 9, 9, 0), (size * 3 // 4, 0, size, size))
            buf = io.BytesIO()
            image.save(buf, format="WEBP", lossless=True, exact=True)
            zf.writestr(name, buf.getvalue())
        zf.writestr("labels.csv", "file,identity\n")
    return names


def test_images_zip_reads_resizes_mirrors_and_filters(tmp_path: Path) -> None:
    path = tmp_path / "images.zip"
    names = write_zip(path, [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)])
    ds = ImagesZip(path, 32)
    assert len(ds) == 4 and ds.names == names  # labels.csv is not an image
    x, mask = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(mask, torch.ones(1, 32, 32))  # no alpha: every pixel measured
    assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[:, :, -1], torch.tensor([1.0, -1.0, -1.0])[:, None], atol=0.02)
    assert torch.allclose(x[:, :, 0], torch.tensor(-1.0), atol=0.02)

    mirrored = ImagesZip(path, 32, mirror=True)
    assert len(mirrored) == 8 and torch.equal(mirrored[4 + 1][0], mirrored[1][0].flip(-1))

    split = ImagesZip(path, 32, members=[names[2], names[0]])
    assert len(split) == 2 and torch.equal(split[1][0], x)
    with pytest.raises(LikenessError, match="not in images.zip"):
        ImagesZip(path, 32, members=["nobody.webp"])

    # the open handle never travels to another process
    assert pickle.loads(pickle.dumps(ds))._zip is None
    loader = DataLoader(ds, batch_size=2, num_workers=1)
    assert torch.equal(next(iter(loader))[0][0], x)


def test_images_zip_reads_the_alpha_channel_as_the_mask(tmp_path: Path) -> None:
    path = tmp_path / "images.zip"
    write_zip(path, [(255, 0, 0), (0, 255, 0)], masked=True)
    ds = ImagesZip(path, 32, mirror=True)
    x, mask = ds[0]
    assert mask.shape == (1, 32, 32)
    assert torch.equal(mask[..., :22], torch.ones(1, 32, 22))  # bicubic: a soft edge
    assert torch.equal(mask[..., 26:], torch.zeros(1, 32, 6))
    # the colours under alpha 0 are read as stored, not premultiplied
    assert torch.allclose(x[..., -1], torch.tensor(9 / 127.5 - 1), atol=1e-6)
    flipped, flipped_mask = ds[2]
    assert torch.equal(flipped, x.flip(-1)) and torch.equal(flipped_mask, mask.flip(-1))


def test_step_sampler_resumes_the_same_stream() -> None:
    def take(sampler: StepSampler, n: int) -> list[int]:
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    full = take(StepSampler(5, seed=3), 17)
    assert sorted(full[:5]) == list(range(5)) and full[:5] != full[5:10]
    assert take(StepSampler(5, seed=3, start=7), 10) == full[7:]


# ---------------------------------------------------------------- the vae objectives


def random_mobilefacenet(path: Path) -> Path:
    """A MobileFaceNet checkpoint in the ../shared file's format, random weights."""
    from worker.engine.face.mobilefacenet import MobileFaceNet

    torch.save({"epoch": 0, "net_state_dict": MobileFaceNet().state_dict()}, path)
    return path


@pytest.mark.parametrize("objective", ["vae", "vae-gan"])
def test_vae_objectives_train_finite_and_resume_exactly(tmp_path: Path, objective: str) -> None:
    face = random_mobilefacenet(tmp_path / "mfn.ckpt")
    extra = dict(objective=objective, face_weights=face)
    full = run(tiny(tmp_path / "full", steps=4, **extra))
    assert all(math.isfinite(v) for m in full.values() for v in m.values())
    assert {"rec_l1", "rec_lowres", "rec_identity", "kl", "loss_VAE"} <= set(full[1])
    assert ("loss_D" in full[1]) == (objective == "vae-gan")
    first = run(tiny(tmp_path / "split", steps=2, **extra))
    rest = run(
        tiny(tmp_path / "split", steps=4, **extra), resume=tmp_path / "split" / "checkpoint.pt"
    )
    assert {**first, **rest} == full  # the encoder and its optimiser are in the checkpoint
    ckpt = read_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert "E" in ckpt and "opt_E" in ckpt
    assert load_generator(tmp_path / "full" / "g_ema.pt").mapping_fit is not None


def test_fd_at_every_checkpoint_is_logged_and_leaves_training_alone(tmp_path: Path) -> None:
    face = random_mobilefacenet(tmp_path / "mfn.ckpt")
    extra = dict(face_weights=face, checkpoint_minutes=1e-6)  # a checkpoint after every step
    plain = run(tiny(tmp_path / "plain", steps=3, **extra))
    measured = run(tiny(tmp_path / "fd", steps=3, fd_samples=6, **extra))
    assert measured == plain  # measuring draws nothing from the run's RNG
    log = [json.loads(line) for line in (tmp_path / "fd" / "log.jsonl").read_text().splitlines()]
    assert len(log) >= 3 and all(math.isfinite(e["fd"]) and e["fd_samples"] == 6 for e in log)
    plain_log = (tmp_path / "plain" / "log.jsonl").read_text().splitlines()
    assert not any("fd" in json.loads(line) for line in plain_log)
    with pytest.raises(LikenessError, match="needs --face-weights"):
        run(tiny(tmp_path / "no-face", steps=1, fd_samples=6))


def test_vae_reconstruction_improves_on_a_fixed_batch(tmp_path: Path) -> None:
    # the autoencoder must actually learn: repeated steps on the same 4 images
    from worker.training.generator.state import build_state
    from worker.training.generator.steps import train_step

    config = tiny(tmp_path, steps=40, objective="vae", synthetic_count=4, mirror=False, lr=0.005)
    torch.manual_seed(0)
    state = build_state(config, torch.device("cpu"))
    from worker.training.images_zip import SyntheticImages

    real = torch.stack([SyntheticImages(16, 4)[i][0] for i in range(4)])
    mask = torch.ones(4, 1, 16, 16)
    l1 = [train_step(state, real, mask)["rec_l1"] for _ in range(40)]
    assert sum(l1[-5:]) / 5 < 0.6 * sum(l1[:5]) / 5


def test_encoder_is_the_discriminator_trunk_without_batch_statistics() -> None:
    from worker.training.generator.vae import build_encoder, encode, kl_divergence

    config = GeneratorConfig.slim(16, channel_max=16, channel_base=128, style_dim=8, n_mlp=2)
    encoder = build_encoder(config)
    x = torch.randn(4, 3, 16, 16)
    mu, logvar = encode(encoder, x)
    assert mu.shape == logvar.shape == (4, 8)
    # each code depends on its own image only (no minibatch-stddev channel)
    mu_one, _ = encode(encoder, x[:1])
    assert torch.allclose(mu_one, mu[:1], atol=1e-5)
    assert torch.allclose(kl_divergence(torch.zeros(2, 8), torch.zeros(2, 8)), torch.zeros(2))
    assert bool((kl_divergence(mu, logvar) > 0).all())


def test_mapping_set_to_a_gaussian_samples_it() -> None:
    from worker.engine.mapping_fit import undo_activation
    from worker.training.generator.vae import CodeMoments, set_mapping_to_gaussian

    config = GeneratorConfig.slim(16, channel_max=16, channel_base=128, style_dim=8, n_mlp=3)
    G = Generator(config)
    rng = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=rng, dtype=torch.float64) * 0.5
    mean = torch.randn(8, generator=rng, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(8, dtype=torch.float64)
    # the moments of codes drawn from that Gaussian recover it
    codes = CodeMoments(8, decay=0.99)
    x = torch.distributions.MultivariateNormal(mean, cov).sample((4000,))
    for chunk in x.split(16):
        w = torch.nn.functional.leaky_relu(chunk, 0.2) * 2**0.5
        codes.update(w.float())
    got_mean, got_cov = codes.gaussian()
    assert torch.allclose(got_mean, mean, atol=0.3) and torch.allclose(got_cov, cov, atol=0.3)

    set_mapping_to_gaussian(G, mean, cov)
    with torch.no_grad():
        y = undo_activation(G.mapping(torch.randn(50_000, 8, generator=rng))).double()
    assert torch.allclose(y.mean(0), mean, atol=0.02)
    assert torch.allclose(torch.cov(y.T), cov, atol=0.08)  # sampling error ~0.02


def test_vae_export_uses_the_encoded_faces_prior(tmp_path: Path) -> None:
    from worker.engine.mapping_fit import undo_activation
    from worker.training.generator.export import exported_generator
    from worker.training.generator.state import build_state, load_checkpoint

    run(tiny(tmp_path, steps=3, objective="vae"))
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["codes"]["weight"] > 0
    state = build_state(TrainConfig(**ckpt["train_config"]), torch.device("cpu"))
    load_checkpoint(state, ckpt)
    mean, _ = state.codes.gaussian()
    G = exported_generator(state)
    with torch.no_grad():
        x = undo_activation(G.mapping(torch.randn(20_000, 16))).double()
    assert torch.allclose(x.mean(0), mean, atol=0.05)
    # the shipped file carries that mapping, and the search's fit matches it
    shipped = load_generator(tmp_path / "g_ema.pt")
    assert torch.equal(shipped.generator.style[1].weight, G.style[1].weight)
    assert shipped.mapping_fit is not None
    # (the fit at export uses latent_avg_samples=256 draws: standard error ~0.1)
    assert torch.allclose(shipped.mapping_fit.mean.double(), mean, atol=0.4)


def test_perceptual_distance_is_zero_on_itself_grows_with_blur_and_has_gradients() -> None:
    import torch.nn.functional as F

    from worker.engine.face.extractor import FaceExtractor
    from worker.engine.face.mobilefacenet import MobileFaceNet
    from worker.training.generator.perceptual import perceptual_distance

    torch.manual_seed(0)
    face = FaceExtractor.with_backbone(MobileFaceNet()).eval().requires_grad_(False)
    real = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(perceptual_distance(face, real, real), torch.zeros(2), atol=1e-6)
    fake = F.avg_pool2d(real, 5, 1, 2).requires_grad_(True)
    d = perceptual_distance(face, fake, real)
    assert d.shape == (2,) and bool((d > 0.01).all())
    d.sum().backward()
    assert fake.grad is not None and float(fake.grad.abs().sum()) > 0


def bundled_extractor() -> Path:
    from likeness.manifest import resolve_weights

    return resolve_weights(None, "extractor")[0]


def test_race_divergence_is_zero_on_the_photo_and_its_gradient_brings_f_back_to_it() -> None:
    from worker.engine.face.export import load_export
    from worker.training.generator.vae import race_divergence, race_logits

    f = load_export(bundled_extractor()).eval().requires_grad_(False)
    torch.manual_seed(0)
    real = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(race_divergence(f, real, real), torch.zeros(2), atol=1e-6)
    fake = torch.nn.functional.avg_pool2d(real.flip(0), 5, 1, 2).requires_grad_(True)
    real.requires_grad_(True)
    before = race_divergence(f, fake, real)
    assert before.shape == (2,) and bool((before > 0).all())
    before.sum().backward()
    assert fake.grad is not None
    assert real.grad is None  # the photo's reading is the target, not something to move
    # a small step against the gradient moves F's reading of the fake toward the photo's
    with torch.no_grad():
        stepped = fake - 0.05 * fake.grad.sign()
        assert float(race_divergence(f, stepped, real).sum()) < float(before.sum())
        assert race_logits(f, real.detach()).shape == (2, len(f.race_head.labels))


def test_a_vae_run_with_the_race_term_logs_it_and_refuses_it_without_f(tmp_path: Path) -> None:
    from pydantic import ValidationError

    config = tiny(
        tmp_path,
        steps=2,
        objective="vae",
        resolution=32,
        channel_base=512,
        race_weight=0.5,
        race_extractor=bundled_extractor(),
    )
    losses = run(config)
    assert all(math.isfinite(losses[s]["rec_race"]) for s in (1, 2))
    # the term is in the loss at its weight: the same first step at twice the weight
    doubled = run(config.model_copy(update={"out": tmp_path / "x2", "race_weight": 1.0}))
    first = losses[1]
    assert doubled[1]["rec_race"] == pytest.approx(first["rec_race"])
    assert doubled[1]["loss_VAE"] - first["loss_VAE"] == pytest.approx(
        0.5 * first["rec_race"], rel=1e-4
    )
    # and it trains G: a detached term would shift the loss alike but leave G as it was
    g = read_checkpoint(tmp_path / "checkpoint.pt")["G"]
    g2 = read_checkpoint(tmp_path / "x2" / "checkpoint.pt")["G"]
    assert any(not torch.equal(g[k], g2[k]) for k in g)
    assert "rec_race" not in run(tiny(tmp_path / "off", steps=1, objective="vae"))[1]
    with pytest.raises(ValidationError, match="race_weight needs race_extractor"):
        tiny(tmp_path, steps=1, objective="vae", race_weight=0.5)
    with pytest.raises(ValidationError, match="race_weight needs race_extractor"):
        tiny(tmp_path, steps=1, race_weight=0.5, race_extractor=bundled_extractor())


def test_a_vae_checkpoint_reconstructs_faces_and_a_gan_one_says_it_cannot(
    tmp_path: Path,
) -> None:
    from worker.training.generator.state import load_autoencoder
    from worker.training.generator.vae import encode, reconstruct

    run(tiny(tmp_path / "vae", steps=3, objective="vae"))
    E, G, kimg = load_autoencoder(tmp_path / "vae" / "checkpoint.pt", torch.device("cpu"))
    assert kimg == pytest.approx(0.012)
    faces = torch.rand(5, 3, 16, 16)
    rebuilt = reconstruct(E, G, faces, batch=2)
    assert rebuilt.shape == faces.shape and 0 <= float(rebuilt.min()) <= float(rebuilt.max()) <= 1
    with torch.no_grad():  # the mean code through G_ema with its stored noise, batched or not
        w = G.mapping(encode(E, faces * 2 - 1)[0]).unsqueeze(1).expand(-1, G.n_latent, -1)
        whole = ((G.synthesis(w, noise=G.stored_noise()) + 1) / 2).clamp(0, 1)
    assert torch.allclose(rebuilt, whole, atol=1e-5)
    run(tiny(tmp_path / "gan", steps=1))
    with pytest.raises(LikenessError, match="has no encoder"):
        load_autoencoder(tmp_path / "gan" / "checkpoint.pt", torch.device("cpu"))


def test_adversarial_updates_wait_for_adv_start_then_ramp_in(tmp_path: Path) -> None:
    from worker.training.generator.state import build_state

    face = random_mobilefacenet(tmp_path / "mfn.ckpt")
    # batch 4: steps 1-2 start at 0 and 0.004 kimg (before the start), step 3 at 0.008
    config = tiny(
        tmp_path / "run",
        steps=5,
        objective="vae-gan",
        face_weights=face,
        perceptual_weight=1.0,
        adv_start_kimg=0.008,
        adv_ramp_kimg=0.008,
    )
    losses = run(config)
    assert all("loss_D" not in losses[s] and "rec_adv" not in losses[s] for s in (1, 2))
    assert all("loss_D" in losses[s] for s in (3, 4, 5))
    assert "rec_adv" not in losses[3] and "rec_adv" in losses[4]  # weight 0, then ramped
    assert "rec_perceptual" in losses[1] and math.isfinite(losses[1]["rec_perceptual"])
    state = build_state(config, torch.device("cpu"))
    weights = []
    for step in (0, 2, 3, 4, 6):
        state.step = step
        weights.append(state.adv_weight_now)
    assert weights == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    state.config = config.model_copy(update={"objective": "vae"})
    assert state.adv_weight_now == 0.0


def test_training_time_is_kept_by_device_type_across_resumes(tmp_path: Path) -> None:
    config = tiny(tmp_path, steps=2)
    run(config)
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    assert set(ckpt["device_seconds"]) == {"cpu"}
    assert ckpt["device_seconds"]["cpu"] == pytest.approx(ckpt["train_seconds"])
    # a checkpoint from before the split, written by a run pinned to a GPU
    ckpt.pop("device_seconds")
    ckpt["train_config"]["device"] = "cuda:0"
    torch.save(ckpt, tmp_path / "old.pt")
    run(tiny(tmp_path, steps=3), resume=tmp_path / "old.pt")
    after = read_checkpoint(tmp_path / "checkpoint.pt")
    assert after["device_seconds"]["cuda"] == pytest.approx(ckpt["train_seconds"])
    assert after["device_seconds"]["cpu"] > 0
    assert sum(after["device_seconds"].values()) == pytest.approx(after["train_seconds"])


def test_a_perceptual_weight_without_a_face_network_is_refused(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="perceptual_weight needs face_weights"):
        tiny(tmp_path, steps=1, objective="vae-gan", perceptual_weight=1.0)
    face = random_mobilefacenet(tmp_path / "mfn.ckpt")
    with pytest.raises(ValidationError, match="a vae objective"):
        tiny(tmp_path, steps=1, objective="gan", perceptual_weight=1.0, face_weights=face)
    with pytest.raises(ValidationError, match="for the vae-gan objective"):
        tiny(tmp_path, steps=1, objective="gan", adv_start_kimg=1.0)
    with pytest.raises(ValidationError, match="prior_members needs data"):
        tiny(tmp_path, steps=1, objective="vae", prior_members=tmp_path / "list.txt")
    # a resume is checked too: a gan run cannot take a perceptual weight on the way
    run(tiny(tmp_path / "gan", steps=1))
    with pytest.raises(ValidationError, match="a vae objective"):
        run(
            tiny(tmp_path / "gan", steps=2, perceptual_weight=1.0, face_weights=face),
            resume=tmp_path / "gan" / "checkpoint.pt",
        )


def test_vae_export_fits_the_prior_to_the_listed_members(tmp_path: Path) -> None:
    from worker.engine.mapping_fit import undo_activation
    from worker.training.generator.export import exported_generator
    from worker.training.generator.state import build_state, load_checkpoint
    from worker.training.generator.vae import encoded_codes

    data = tmp_path / "faces.zip"
    with zipfile.ZipFile(data, "w") as zf:
        for i in range(8):
            buf = io.BytesIO()
            level = 20 + 5 * i if i < 4 else 200 + 5 * i
            Image.new("RGB", (16, 16), (level, level // 2, 255 - level)).save(buf, "PNG")
            zf.writestr(f"{'dark' if i < 4 else 'light'}/{i}.png", buf.getvalue())
    (tmp_path / "dark.txt").write_text("".join(f"dark/{i}.png\n" for i in range(4)))
    run(tiny(tmp_path / "run", steps=3, objective="vae", data=data))
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    config = TrainConfig(**ckpt["train_config"]).model_copy(
        update={"prior_members": tmp_path / "dark.txt"}
    )
    state = build_state(config, torch.device("cpu"))
    load_checkpoint(state, ckpt)
    dark = torch.stack([ImagesZip(data, 16)[i][0] for i in range(4)])
    expected = encoded_codes(state.E, state.G, [dark], seed=config.seed).double().mean(0)
    G = exported_generator(state)
    with torch.no_grad():
        x = undo_activation(G.mapping(torch.randn(20_000, 16))).double()
    assert torch.allclose(x.mean(0), expected, atol=0.05)
    running, _ = state.codes.gaussian()
    assert not torch.allclose(running, expected, atol=0.05)  # the listed faces, not the batches
    # fitting the prior at every checkpoint draws nothing from the run's random streams
    listed = dict(objective="vae", data=data, checkpoint_minutes=1e-6)
    plain = run(tiny(tmp_path / "plain", steps=3, **listed))
    fitted = run(tiny(tmp_path / "fitted", steps=3, prior_members=tmp_path / "dark.txt", **listed))
    assert fitted == plain


def test_d_lr_ratio_sets_d_lr_and_a_resume_may_change_it(tmp_path: Path) -> None:
    def d_lr(path: Path) -> float:
        return read_checkpoint(path)["opt_D"]["param_groups"][0]["lr"]

    ckpt_path = tmp_path / "checkpoint.pt"
    run(tiny(tmp_path, steps=2))
    base = d_lr(ckpt_path)
    assert base == pytest.approx(0.002 * 2 / 3)  # lr × the lazy R1 ratio (r1_every 2)
    # a checkpoint from before the option resumes at ratio 1
    ckpt = read_checkpoint(ckpt_path)
    ckpt["train_config"].pop("d_lr_ratio")
    torch.save(ckpt, tmp_path / "old.pt")
    run(tiny(tmp_path, steps=3), resume=tmp_path / "old.pt")
    assert d_lr(ckpt_path) == pytest.approx(base)
    run(tiny(tmp_path, steps=4, d_lr_ratio=4.0), resume=ckpt_path)
    saved = read_checkpoint(ckpt_path)
    assert d_lr(ckpt_path) == pytest.approx(4 * base)
    assert saved["train_config"]["d_lr_ratio"] == 4.0
    assert saved["opt_G"]["param_groups"][0]["lr"] == pytest.approx(0.002)


def test_a_resume_may_turn_augmentation_off(tmp_path: Path) -> None:
    from worker.training.generator.config import merge_resume_config
    from worker.training.generator.state import build_state

    ckpt_path = tmp_path / "checkpoint.pt"
    run(tiny(tmp_path, steps=2, augment="color,translation"))
    run(tiny(tmp_path, steps=3, augment="none"), resume=ckpt_path)
    assert read_checkpoint(ckpt_path)["train_config"]["augment"] == "none"
    config = merge_resume_config(
        TrainConfig(**read_checkpoint(ckpt_path)["train_config"]), {"augment": "cutout"}
    )
    assert build_state(config, torch.device("cpu")).augment == ["cutout"]


# ---------------------------------------------------------------- measured pixels only


def half_mask(batch: int = 2, size: int = 16) -> Tensor:
    """Masks whose right half was not measured."""
    mask = torch.ones(batch, 1, size, size)
    mask[..., size // 2 :] = 0
    return mask


def test_reconstruction_terms_see_the_measured_pixels_only() -> None:
    from worker.engine.downscale import downscale
    from worker.engine.face.export import load_export
    from worker.engine.face.extractor import FaceExtractor
    from worker.engine.face.mobilefacenet import MobileFaceNet
    from worker.training.generator.vae import reconstruction_terms

    torch.manual_seed(0)
    face = FaceExtractor.with_backbone(MobileFaceNet()).eval().requires_grad_(False)
    real, fake = torch.rand(2, 2, 3, 64, 64) * 2 - 1
    ones = torch.ones(2, 1, 64, 64)
    # all measured: the terms as they were before masks
    terms = reconstruction_terms(fake, real, ones, face, perceptual=True)
    assert torch.allclose(terms["l1"], (fake - real).abs().mean())
    old_lowres = sum(
        (downscale((fake + 1) / 2, s) - downscale((real + 1) / 2, s)).pow(2).mean()
        for s in (16, 32)
    )
    assert torch.allclose(terms["lowres"], old_lowres)
    # right half not measured: the fake there changes no term and gets no gradient
    mask = half_mask(2, 64)
    fake = fake.requires_grad_(True)
    f = load_export(bundled_extractor()).eval().requires_grad_(False)
    terms = reconstruction_terms(fake, real, mask, face, perceptual=True, race=f)
    other = fake.detach() + (1 - mask) * torch.randn_like(fake)
    changed = reconstruction_terms(other, real, mask, face, perceptual=True, race=f)
    for name in ("l1", "lowres", "identity", "perceptual", "race"):
        assert torch.equal(terms[name], changed[name]), name
        (grad,) = torch.autograd.grad(terms[name], fake, retain_graph=True)
        assert torch.equal(grad[..., 32:], torch.zeros_like(grad[..., 32:])), name
        assert grad[..., :32].abs().sum() > 0, name
    # a mean over the measured pixels: the left half's L1, not half of it
    left = (fake.detach() - real)[..., :32].abs().mean()
    assert torch.allclose(terms["l1"], left)


def test_measurement_is_the_identity_for_all_valid_masks_and_blind_where_invalid() -> None:
    from worker.training.generator.measurement import measure

    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(measure(images, torch.ones(2, 1, 16, 16)), images)
    mask = half_mask()
    measured = measure(images, mask)
    assert torch.equal(measured[..., :8], images[..., :8])  # measured pixels stay
    # The unmeasured half is a function of the measured half alone: new pixels there
    # change nothing (bit for bit); new pixels in the measured half change it (the fill).
    assert torch.equal(measure(images + (1 - mask) * torch.randn_like(images), mask), measured)
    moved = measure(images + mask * 0.5, mask)
    assert not torch.allclose(moved[..., 8:], measured[..., 8:])
    # a plain background: no colour beyond the measured pixels' range
    assert measured[..., 8:].min() >= images[..., :8].min() - 1e-6
    assert measured[..., 8:].max() <= images[..., :8].max() + 1e-6
    # gradients: from the unmeasured half to the measured pixels only
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(measure(x, mask)[..., 8:].sum(), x)
    assert torch.equal(grad[..., 8:], torch.zeros_like(grad[..., 8:]))
    assert grad[..., :8].abs().sum() > 0


def test_vae_gan_on_masked_images_trains_finite_and_resumes_exactly(tmp_path: Path) -> None:
    data = tmp_path / "faces.zip"
    write_zip(data, [(40 * i, 255 - 30 * i, 128) for i in range(8)], size=32, masked=True)
    face = random_mobilefacenet(tmp_path / "mfn.ckpt")
    extra = dict(objective="vae-gan", face_weights=face, perceptual_weight=1.0, data=data)
    full = run(tiny(tmp_path / "full", steps=4, **extra))
    assert all(math.isfinite(v) for m in full.values() for v in m.values())
    assert {"loss_D", "rec_adv", "rec_perceptual", "r1"} <= set(full[1])
    first = run(tiny(tmp_path / "split", steps=2, **extra))
    rest = run(
        tiny(tmp_path / "split", steps=4, **extra), resume=tmp_path / "split" / "checkpoint.pt"
    )
    assert {**first, **rest} == full


# ---------------------------------------------------------------- D on reconstructions


def test_adaptive_adv_weight_is_the_ratio_of_gradient_norms_at_the_last_layer() -> None:
    from worker.training.generator.steps import adaptive_adv_weight

    w = torch.randn(3, 5, requires_grad=True)
    other = torch.randn(3, 5, requires_grad=True)
    reconstruction = (3 * w).sum() + other.pow(2).sum()  # only w's gradient counts
    adversarial = (w * torch.full_like(w, 0.5)).sum()
    assert adaptive_adv_weight(reconstruction, adversarial, w).item() == pytest.approx(6.0, 1e-3)
    # an adversarial term with no gradient at the layer: the weight is capped
    flat = (w * 0).sum()
    assert adaptive_adv_weight(reconstruction, flat, w).item() == pytest.approx(1e4)


def test_d_on_reconstructions_judges_the_autoencoders_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.training.generator import steps

    face = random_mobilefacenet(tmp_path / "mfn.ckpt")
    extra = dict(objective="vae-gan", face_weights=face, d_fakes="reconstructions")
    shown: list[Tensor | None] = []
    made: list[Tensor] = []
    d_step, vae_step = steps.d_step, steps.vae_step

    def spy_d(state, real, mask, fake=None):  # type: ignore[no-untyped-def]
        shown.append(fake)
        return d_step(state, real, mask, fake)

    def spy_vae(state, real, mask):  # type: ignore[no-untyped-def]
        out = vae_step(state, real, mask)
        made.append(out[1])
        return out

    monkeypatch.setattr(steps, "d_step", spy_d)
    monkeypatch.setattr(steps, "vae_step", spy_vae)
    full = run(tiny(tmp_path / "full", steps=4, **extra))
    assert len(shown) == len(made) == 4
    assert all(s is m for s, m in zip(shown, made, strict=True))  # no random samples
    assert all("loss_G" not in m and m["adv_balance"] > 0 for m in full.values())
    assert all(math.isfinite(v) for m in full.values() for v in m.values())
    # it resumes exactly (it draws no samples, so its random streams differ from samples')
    first = run(tiny(tmp_path / "split", steps=2, **extra))
    rest = run(
        tiny(tmp_path / "split", steps=4, **extra), resume=tmp_path / "split" / "checkpoint.pt"
    )
    assert {**first, **rest} == full
    # and a samples run may switch to it on a resume
    run(tiny(tmp_path / "switch", steps=2, objective="vae-gan", face_weights=face))
    rest = run(
        tiny(tmp_path / "switch", steps=4, **extra), resume=tmp_path / "switch" / "checkpoint.pt"
    )
    assert set(rest) == {3, 4} and "adv_balance" in rest[3] and "loss_G" not in rest[3]
    saved = read_checkpoint(tmp_path / "switch" / "checkpoint.pt")["train_config"]
    assert saved["d_fakes"] == "reconstructions"


def test_d_fakes_is_for_the_vae_gan_objective(tmp_path: Path) -> None:
    from pydantic import ValidationError

    for objective in ("gan", "vae"):
        with pytest.raises(ValidationError, match="d_fakes is for the vae-gan"):
            tiny(tmp_path, steps=1, objective=objective, d_fakes="reconstructions")
    # path lengths are regularised in G's adversarial step on samples, which these lack
    with pytest.raises(ValidationError, match="pl_weight needs"):
        tiny(tmp_path, steps=1, objective="vae-gan", d_fakes="reconstructions", pl_weight=2.0)
    with pytest.raises(ValidationError, match="pl_weight needs"):
        tiny(tmp_path, steps=1, objective="vae", pl_weight=2.0)
    tiny(tmp_path, steps=1, objective="vae-gan", pl_weight=2.0)
