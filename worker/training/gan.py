"""StyleGAN2 training as plain functions: losses, one training step, checkpoints
and the loop that ties them to a data set, a clock and a progress bar.

One step of the ``gan`` objective = a D update (non-saturating logistic loss on
DiffAugment-ed reals and fakes, plus lazy R1 every ``r1_every`` steps) then a G
update (plus lazy path-length regularisation when enabled) then the EMA of G.
The ``vae`` objective (worker/training/vae.py) replaces the adversarial updates
with an encoder + G reconstruction update; ``vae-gan`` does all three. Every random draw
comes from the global torch RNG or from generators seeded by (seed, step), so a
checkpoint that stores the RNG states and the step resumes bit-for-bit.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field, model_validator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from likeness.errors import LikenessError
from worker.engine.checkpoints import atomic_torch_save, load_generator, save_generator
from worker.engine.face.extractor import FaceExtractor
from worker.engine.generator import Generator, GeneratorConfig
from worker.engine.mapping_fit import fit_mapping
from worker.training.diffaugment import diff_augment, parse_policy
from worker.training.discriminator import Discriminator
from worker.training.gan_losses import (
    d_logistic_loss,
    g_nonsaturating_loss,
    path_lengths,
    r1_penalty,
)
from worker.training.images_zip import (
    ImagesZip,
    StepSampler,
    SyntheticImages,
    read_member_list,
)
from worker.training.parts import has_parts, join_parts
from worker.training.vae import (
    CodeMoments,
    build_encoder,
    encoded_codes,
    load_face_model,
    set_mapping_to_gaussian,
    vae_step,
)

CHECKPOINT_NAME = "checkpoint.pt"
GENERATOR_NAME = "g_ema.pt"
LOG_NAME = "log.jsonl"
GRID_COLUMNS, GRID_ROWS = 8, 4

Objective = Literal["gan", "vae", "vae-gan"]


class TrainConfig(BaseModel):
    """Everything a run needs; saved in every checkpoint."""

    # generator (and discriminator) shape: GeneratorConfig.slim(...)
    resolution: int = Field(128, description="image side in pixels")
    channel_max: int = Field(128, description="widest feature map")
    channel_base: int = Field(2048, description="width at res r is min(channel_max, base / r)")
    style_dim: int = Field(256, description="width of z and w")
    n_mlp: int = Field(4, description="depth of the mapping network")
    # optimisation
    objective: Objective = Field(
        "gan", description="gan: StyleGAN2's adversarial training (needs a GPU's millions of "
        "images); vae: G as the decoder of a variational autoencoder, which makes faces after "
        "a few epochs (the CPU path); vae-gan: the autoencoder plus the adversarial terms")
    kl_weight: float = Field(5e-5, ge=0, description="vae: weight of the KL term (nats/image)")
    lowres_weight: float = Field(10.0, ge=0, description="vae: weight of the 16/32-px MSE")
    identity_weight: float = Field(
        0.1, ge=0, description="vae: weight of 1 - cos of MobileFaceNet embeddings")
    face_weights: Path | None = Field(
        None, description="MobileFaceNet checkpoint: the vae objectives' identity term (None: "
        "no term) and the FD at checkpoints")
    fd_samples: int = Field(
        0, ge=0, description="at every checkpoint, the FD between the MobileFaceNet embeddings "
        "of this many samples of G_ema and as many held-out photos (val + test people of the "
        "labels.csv beside the zip), in the log: progress across checkpoints; 0: off")
    perceptual_weight: float = Field(
        0.0, ge=0, description="vae: weight of the distance of MobileFaceNet's feature maps "
        "(worker/training/perceptual.py; needs face_weights); 0: off")
    adv_weight: float = Field(1.0, ge=0, description="weight of G's adversarial loss")
    adv_start_kimg: float = Field(
        0.0, ge=0, description="vae-gan: no adversarial updates before this many kimg, so "
        "that reconstructions are good before D judges them")
    adv_ramp_kimg: float = Field(
        0.0, ge=0, description="then raise G's adversarial weight linearly from 0 to "
        "adv_weight over this many kimg")
    batch: int = Field(8, ge=1)
    lr: float = Field(0.002, gt=0, description="Adam lr before the lazy-reg correction")
    r1_gamma: float = Field(0.5, ge=0, description="R1 weight; ~0.0002·res²/batch suits small data")
    r1_every: int = Field(16, ge=1, description="D steps between R1 penalties (lazy R1)")
    pl_weight: float = Field(0.0, ge=0, description="path-length weight; 0 turns it off (port: 2)")
    pl_every: int = Field(4, ge=1)
    pl_batch_shrink: int = Field(2, ge=1)
    pl_decay: float = Field(0.01, gt=0, le=1)
    mixing: float = Field(0.9, ge=0, le=1, description="style-mixing probability")
    ema_kimg: float | None = Field(None, gt=0, description="EMA half-life; None: batch·10/32")
    ema_rampup: float | None = Field(0.05, description="cap half-life at rampup × images seen")
    augment: str = Field("color,translation,cutout", description="DiffAugment policy or 'none'")
    mirror: bool = Field(True, description="add horizontally flipped copies of the data")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="CUDA only")
    seed: int = 0
    # data and run control
    data: Path | None = Field(None, description="zip of images; None: synthetic (smoke only)")
    members: Path | None = Field(None, description="split file: member names, one per line")
    prior_members: Path | None = Field(
        None, description="vae objectives: fit the exported prior to the encoded faces of "
        "these members of the data zip (a split file), not to the running moments of the "
        "training batches: a prior that is, say, race-balanced where the training data is not; "
        "costs one encoder pass over them at every checkpoint")
    init_generator: Path | None = Field(
        None, description="start G and G_ema from this generator checkpoint (same config): "
                          "a warm start, e.g. from weights/generator.pt when a run is gone")
    synthetic_count: int = Field(256, ge=1)
    out: Path = Path("runs/generator")
    total_kimg: float = Field(1000.0, gt=0)
    max_minutes: float | None = Field(None, gt=0, description="stop (and save) after this long")
    checkpoint_minutes: float = Field(10.0, gt=0)
    device: str = "auto"
    workers: int | None = Field(None, ge=0, description="DataLoader workers; None: 0 CPU, 4 CUDA")
    grid_seed: int = 0
    latent_avg_samples: int = Field(10_000, ge=1)

    @model_validator(mode="after")
    def _no_setting_that_does_nothing(self) -> TrainConfig:
        # a setting that silently does nothing would cost hours of training
        if self.perceptual_weight > 0 and (self.face_weights is None or self.objective == "gan"):
            raise ValueError("perceptual_weight needs face_weights and a vae objective")
        if (self.adv_start_kimg > 0 or self.adv_ramp_kimg > 0) and self.objective != "vae-gan":
            raise ValueError("adv_start_kimg and adv_ramp_kimg are for the vae-gan objective")
        if self.prior_members is not None and (self.objective == "gan" or self.data is None):
            raise ValueError("prior_members needs data and a vae objective")
        return self

    def generator_config(self) -> GeneratorConfig:
        return GeneratorConfig.slim(self.resolution, channel_max=self.channel_max,
                                    channel_base=self.channel_base, style_dim=self.style_dim,
                                    n_mlp=self.n_mlp)

    @property
    def ema_half_life_kimg(self) -> float:
        # StyleGAN2-ADA's heuristic: 10 kimg at batch 32, scaled with the batch
        return self.ema_kimg if self.ema_kimg is not None else self.batch * 10 / 32

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(self.total_kimg * 1000 / self.batch - 1e-9))

    @classmethod
    def smoke(cls, **overrides: Any) -> TrainConfig:
        """A tiny run that finishes on CPU in well under a minute."""
        base: dict[str, Any] = dict(
            resolution=32, channel_max=32, channel_base=512, style_dim=32, n_mlp=2, batch=4,
            total_kimg=0.16, checkpoint_minutes=0.25, r1_every=4, latent_avg_samples=2000,
            out=Path("runs/smoke"))
        return cls(**(base | overrides))


# Fields a resumed run may change; every other field must match the checkpoint.
# The vae objectives' loss weights are among them: raising the KL weight
# after a warm-up at a low one is the usual way to train a VAE (the checkpoint
# records the weights in force when it was written).
RUN_FIELDS = frozenset({"data", "members", "out", "total_kimg", "max_minutes",
                        "checkpoint_minutes", "device", "workers", "synthetic_count",
                        "face_weights", "kl_weight", "lowres_weight", "identity_weight",
                        "adv_weight", "fd_samples", "perceptual_weight", "adv_start_kimg",
                        "adv_ramp_kimg", "prior_members"})


def merge_resume_config(saved: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """The checkpoint's config with run-control overrides; refuses shape/optimiser changes."""
    for name, value in overrides.items():
        if name not in RUN_FIELDS and value != getattr(saved, name):
            raise LikenessError(
                "resume_mismatch", f"cannot change {name} when resuming "
                f"(the checkpoint has {getattr(saved, name)!r}, asked for {value!r})")
    # validated again: a run-control change can make a setting do nothing
    return TrainConfig.model_validate(
        saved.model_dump() | {k: v for k, v in overrides.items() if k in RUN_FIELDS})


# ---------------------------------------------------------------- state


@dataclass
class TrainState:
    config: TrainConfig
    device: torch.device
    G: Generator
    D: Discriminator
    G_ema: Generator
    opt_G: torch.optim.Adam
    opt_D: torch.optim.Adam
    scaler_G: torch.amp.GradScaler | None = None
    scaler_D: torch.amp.GradScaler | None = None
    E: Discriminator | None = None  # the vae objectives' encoder
    opt_E: torch.optim.Adam | None = None
    face: FaceExtractor | None = None  # frozen, for the identity term; not checkpointed
    codes: CodeMoments | None = None  # the encoded faces' w, for the exported prior
    step: int = 0
    mean_path_length: float = 0.0
    train_seconds: float = 0.0  # device time over all sessions (for the weights manifest)
    # the same time by device type ("cpu", "cuda"): a run may move between machines
    device_seconds: dict[str, float] = field(default_factory=dict)
    augment: list[str] = field(default_factory=list)

    @property
    def kimg(self) -> float:
        return self.step * self.config.batch / 1000

    @property
    def adversarial_now(self) -> bool:
        """Whether this step updates D and G adversarially (from ``adv_start_kimg`` on)."""
        return self.config.objective != "vae" and self.kimg >= self.config.adv_start_kimg

    @property
    def adv_weight_now(self) -> float:
        """G's adversarial weight at this step: 0 before ``adv_start_kimg``, then ramped."""
        c = self.config
        if not self.adversarial_now:
            return 0.0
        since = self.kimg - c.adv_start_kimg
        return c.adv_weight * (min(1.0, since / c.adv_ramp_kimg) if c.adv_ramp_kimg > 0 else 1.0)


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on CUDA: CPU autocast is slower than fp32 for these convs."""
    if device.type != "cuda" or config.amp == "off":
        return None
    if config.amp == "fp16":
        return torch.float16
    if config.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def build_state(config: TrainConfig, device: torch.device) -> TrainState:
    """Fresh G, D, EMA and optimisers; parameters drawn from the global RNG."""
    gconf = config.generator_config()
    G, D = Generator(gconf).to(device), Discriminator(gconf).to(device)
    if config.init_generator is not None:
        G.load_state_dict(warm_start_weights(config.init_generator, gconf))
    G_ema = Generator(gconf).to(device).eval().requires_grad_(False)
    G_ema.load_state_dict(G.state_dict())
    # lazy regularisation: scale lr and betas as if the penalty ran every step
    g_ratio = config.pl_every / (config.pl_every + 1) if config.pl_weight > 0 else 1.0
    d_ratio = config.r1_every / (config.r1_every + 1)

    def adam(params: Iterator[nn.Parameter], ratio: float) -> torch.optim.Adam:
        return torch.optim.Adam(params, lr=config.lr * ratio, betas=(0.0, 0.99**ratio))

    fp16 = amp_dtype(config, device) == torch.float16
    state = TrainState(
        config=config, device=device, G=G, D=D, G_ema=G_ema,
        opt_G=adam(G.parameters(), g_ratio), opt_D=adam(D.parameters(), d_ratio),
        scaler_G=torch.amp.GradScaler("cuda") if fp16 else None,
        scaler_D=torch.amp.GradScaler("cuda") if fp16 else None,
        augment=parse_policy(config.augment),
    )
    if config.objective != "gan":
        state.E = build_encoder(gconf).to(device)
        state.opt_E = adam(state.E.parameters(), 1.0)
        state.codes = CodeMoments(gconf.style_dim)
        if config.face_weights is not None:
            state.face = load_face_model(config.face_weights, device)
    return state


def warm_start_weights(path: Path, gconf: GeneratorConfig) -> dict[str, Tensor]:
    """A shipped generator's parameters in float32, if its config is this run's. The
    encoder, D and the optimisers still start fresh: only G's knowledge survives."""
    loaded = load_generator(path)
    theirs = loaded.generator.config.model_dump(mode="json")
    ours = gconf.model_dump(mode="json")
    if theirs != ours:
        differ = sorted(k for k in ours if theirs.get(k) != ours[k])
        raise LikenessError("init_mismatch", f"{path} is a generator with another config "
                            f"({', '.join(differ)} differ): give this run's shape options")
    return {k: v.float() for k, v in loaded.generator.state_dict().items()}


# ---------------------------------------------------------------- one step


def sample_w_plus(G: Generator, batch: int, mixing: float, device: torch.device) -> Tensor:
    """W+ for a batch; with probability ``mixing`` the layers after a random
    cut take a second w (style mixing, which decorrelates the layers' styles).
    Always draws the same random numbers, mixing or not."""
    n, dim = G.n_latent, G.config.style_dim
    w = G.mapping(torch.randn(2 * batch, dim, device=device)).view(2, batch, dim)
    mix = bool(torch.rand(()) < mixing)
    cut = int(torch.randint(1, n, ())) if n > 1 else n
    cut = cut if mix else n
    return torch.cat([w[0, :, None].expand(-1, cut, -1), w[1, :, None].expand(-1, n - cut, -1)], 1)


def _autocast(state: TrainState) -> contextlib.AbstractContextManager:
    dtype = amp_dtype(state.config, state.device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def _step(loss: Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def d_step(state: TrainState, real: Tensor) -> dict[str, float]:
    c, G, D = state.config, state.G, state.D
    G.requires_grad_(False)
    D.requires_grad_(True)
    with _autocast(state):
        with torch.no_grad():
            fake = G.synthesis(sample_w_plus(G, real.shape[0], c.mixing, state.device))
        fake_pred = D(diff_augment(fake, state.augment))
        real_pred = D(diff_augment(real, state.augment))
        loss = d_logistic_loss(real_pred.float(), fake_pred.float())
    _step(loss, state.opt_D, state.scaler_D)
    out = {"loss_D": loss.item(), "real_score": real_pred.float().mean().item(),
           "fake_score": fake_pred.float().mean().item()}
    if c.r1_gamma > 0 and state.step % c.r1_every == 0:
        # in fp32: the gradient penalty is where reduced precision hurts most
        real = real.detach().requires_grad_(True)
        real_pred = D(diff_augment(real, state.augment))
        r1 = r1_penalty(real_pred, real)
        state.opt_D.zero_grad(set_to_none=True)
        # `0 * pred` keeps the final layer's bias in the graph
        (c.r1_gamma / 2 * r1 * c.r1_every + 0 * real_pred[0, 0]).backward()
        state.opt_D.step()
        out["r1"] = r1.item()
    return out


def g_step(state: TrainState, batch: int) -> dict[str, float]:
    c, G, D = state.config, state.G, state.D
    G.requires_grad_(True)
    D.requires_grad_(False)
    with _autocast(state):
        fake = G.synthesis(sample_w_plus(G, batch, c.mixing, state.device))
        loss = state.adv_weight_now * g_nonsaturating_loss(
            D(diff_augment(fake, state.augment)).float())
    _step(loss, state.opt_G, state.scaler_G)
    out = {"loss_G": loss.item()}
    if c.pl_weight > 0 and state.step % c.pl_every == 0:
        w_plus = sample_w_plus(G, max(1, batch // c.pl_batch_shrink), c.mixing, state.device)
        fake = G.synthesis(w_plus)
        lengths = path_lengths(fake, w_plus)
        target = state.mean_path_length + c.pl_decay * (
            lengths.mean().item() - state.mean_path_length)
        penalty = (lengths - target).pow(2).mean()
        state.opt_G.zero_grad(set_to_none=True)
        (c.pl_weight * c.pl_every * penalty + 0 * fake[0, 0, 0, 0]).backward()
        state.opt_G.step()
        state.mean_path_length = target
        out["pl"] = penalty.item()
        out["path_length"] = target
    return out


@torch.no_grad()
def update_ema(state: TrainState) -> None:
    c = state.config
    half_life = c.ema_half_life_kimg * 1000
    if c.ema_rampup is not None:
        # early on, a long half-life would average in the random initialisation
        half_life = min(half_life, (state.step + 1) * c.batch * c.ema_rampup)
    beta = 0.5 ** (c.batch / max(half_life, 1e-8))
    for p_ema, p in zip(state.G_ema.parameters(), state.G.parameters(), strict=True):
        p_ema.lerp_(p, 1 - beta)
    for b_ema, b in zip(state.G_ema.buffers(), state.G.buffers(), strict=True):
        b_ema.copy_(b)


def train_step(state: TrainState, real: Tensor) -> dict[str, float]:
    """The objective's updates (D, the autoencoder, G), the EMA; advances ``state.step``."""
    objective = state.config.objective
    adversarial = state.adversarial_now
    metrics: dict[str, float] = {}
    if adversarial:
        metrics |= d_step(state, real)
    if objective != "gan":
        metrics |= vae_step(state, real)
    if adversarial:
        metrics |= g_step(state, real.shape[0])
    update_ema(state)
    state.step += 1
    bad = {k: v for k, v in metrics.items() if k.startswith("loss_") and not math.isfinite(v)}
    if bad:
        raise LikenessError("training_diverged", f"losses became non-finite at step {state.step}: "
                            + ", ".join(f"{k} {v}" for k, v in bad.items()))
    return metrics


# ---------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: TrainState, path: Path) -> None:
    ckpt = {
        "G": state.G.state_dict(), "D": state.D.state_dict(), "G_ema": state.G_ema.state_dict(),
        "opt_G": state.opt_G.state_dict(), "opt_D": state.opt_D.state_dict(),
        "step": state.step, "kimg": state.kimg, "mean_path_length": state.mean_path_length,
        "train_seconds": state.train_seconds, "device_seconds": state.device_seconds,
        "rng": rng_state(),
        "train_config": state.config.model_dump(mode="json"),
        "generator_config": state.G.config.model_dump(mode="json"),
    }
    if state.E is not None and state.opt_E is not None and state.codes is not None:
        ckpt["E"], ckpt["opt_E"] = state.E.state_dict(), state.opt_E.state_dict()
        ckpt["codes"] = state.codes.state_dict()
    for name in ("scaler_G", "scaler_D"):
        scaler = getattr(state, name)
        if scaler is not None:
            ckpt[name] = scaler.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(ckpt, path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file, or the committed parts of one (worker/training/parts.py)."""
    source: Path | io.BytesIO = path
    if not path.is_file() and has_parts(path):
        source = io.BytesIO(join_parts(path))
    try:
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LikenessError("checkpoint_not_found", f"no such checkpoint: {path}",
                            status=404) from None
    except Exception as e:  # torch raises many types for a bad file
        raise LikenessError("bad_checkpoint", f"cannot read {path}: {e}") from None
    if not isinstance(ckpt, dict) or "train_config" not in ckpt:
        raise LikenessError("bad_checkpoint", f"{path} is not a train-generator checkpoint")
    return ckpt


def load_checkpoint(state: TrainState, ckpt: dict[str, Any]) -> None:
    """Restore everything ``save_checkpoint`` wrote into a freshly built state."""
    state.G.load_state_dict(ckpt["G"])
    state.D.load_state_dict(ckpt["D"])
    state.G_ema.load_state_dict(ckpt["G_ema"])
    state.opt_G.load_state_dict(ckpt["opt_G"])
    state.opt_D.load_state_dict(ckpt["opt_D"])
    if state.E is not None and state.opt_E is not None and state.codes is not None:
        state.E.load_state_dict(ckpt["E"])
        state.opt_E.load_state_dict(ckpt["opt_E"])
        if "codes" in ckpt:  # checkpoints from before the moments were kept start afresh
            state.codes.load_state_dict(ckpt["codes"])
    for name in ("scaler_G", "scaler_D"):
        scaler = getattr(state, name)
        if scaler is not None and name in ckpt:
            scaler.load_state_dict(ckpt[name])
    state.step = int(ckpt["step"])
    state.mean_path_length = float(ckpt["mean_path_length"])
    state.train_seconds = float(ckpt.get("train_seconds", 0.0))
    # checkpoints from before the split: counted as the device the last session was pinned
    # to (a run that moved between devices before then is misattributed)
    pinned = str(ckpt["train_config"].get("device", "auto")).split(":")[0]
    state.device_seconds = {k: float(v) for k, v in ckpt.get(
        "device_seconds", {pinned if pinned != "auto" else "unrecorded": state.train_seconds}
    ).items()}
    set_rng_state(ckpt["rng"])


# ---------------------------------------------------------------- exports


@torch.no_grad()
def mean_w(G: Generator, samples: int, seed: int = 0, chunk: int = 10_000) -> Tensor:
    """Mean of mapping(z) over ``samples`` z; own RNG so training draws are untouched."""
    device = next(G.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    total, done = torch.zeros(G.config.style_dim, dtype=torch.float64, device=device), 0
    while done < samples:
        n = min(chunk, samples - done)
        total += G.mapping(torch.randn(n, G.config.style_dim, generator=rng).to(device)).sum(0)
        done += n
    return (total / done).float()


@torch.no_grad()
def sample_grid(G: Generator, seed: int, columns: int = GRID_COLUMNS,
                rows: int = GRID_ROWS) -> Image.Image:
    """A fixed-latent grid (no truncation, the stored noise): the same faces every time."""
    device = next(G.parameters()).device
    z = torch.randn(columns * rows, G.config.style_dim,
                    generator=torch.Generator().manual_seed(seed)).to(device)
    images = torch.cat([G(chunk, noise=G.stored_noise()) for chunk in z.split(8)])
    images = images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    r = G.config.resolution
    grid = images.view(rows, columns, 3, r, r).permute(0, 3, 1, 4, 2).reshape(rows * r,
                                                                             columns * r, 3)
    return Image.fromarray(grid.numpy())


def exported_generator(state: TrainState) -> Generator:
    """G_ema as it ships: for the vae objectives, with the mapping set to the
    Gaussian of the encoded faces (worker/training/vae.py explains why): of the
    ``prior_members`` when given, else of the training batches seen lately."""
    c = state.config
    codes = state.codes
    if state.E is not None and c.prior_members is not None and c.data is not None:
        faces = ImagesZip(c.data, c.resolution, members=read_member_list(c.prior_members))
        # its own generator: otherwise creating the iterator draws from the run's RNG
        loader = DataLoader(faces, batch_size=64, generator=torch.Generator().manual_seed(c.seed))
        codes = CodeMoments.exact(encoded_codes(state.E, state.G, loader, c.seed))
    if codes is None or codes.weight <= 0:
        return state.G_ema
    G = copy.deepcopy(state.G_ema)
    set_mapping_to_gaussian(G, *codes.gaussian())
    return G


def export(state: TrainState, out: Path, G: Generator | None = None) -> dict[str, str]:
    """``g_ema.pt`` in the engine's layout (with latent_avg and a mapping fit) and a grid PNG;
    ``G``: the exported generator, when the caller has it already."""
    c = state.config
    G = G if G is not None else exported_generator(state)
    latent_avg = mean_w(G, c.latent_avg_samples, seed=c.seed)
    fit = fit_mapping(G, samples=c.latent_avg_samples, batch=10_000, seed=c.seed)
    extra = {"train": {"kimg": state.kimg, "step": state.step,
                       "train_seconds": state.train_seconds,
                       "device_seconds": state.device_seconds,
                       "data": str(c.data or "synthetic")}}
    save_generator(out / GENERATOR_NAME, G, latent_avg=latent_avg, mapping_fit=fit, extra=extra)
    grid_path = out / f"samples_kimg{int(state.kimg):04d}.png"
    tmp = grid_path.with_name(grid_path.name + ".tmp")
    sample_grid(G, c.grid_seed).save(tmp, format="PNG")
    os.replace(tmp, grid_path)
    return {"generator": str(out / GENERATOR_NAME), "grid": str(grid_path)}


# ---------------------------------------------------------------- the loop


class StopSignal:
    """SIGTERM/SIGINT set a flag the loop checks after each step; a second
    SIGINT aborts at once (for a user who really means it)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@dataclass
class FDProbe:
    """What the FD at a checkpoint compares against: the embeddings of held-out photos,
    computed once per session."""

    face: FaceExtractor
    reference: Tensor  # (N, D)

    def __call__(self, G: Generator) -> float:
        from worker.training.generator_quality import sample_fd

        return sample_fd(G, self.face, self.reference, len(self.reference))


def fd_probe(config: TrainConfig, state: TrainState) -> FDProbe | None:
    """None unless ``fd_samples``; fails before training when it cannot be measured."""
    from worker.training.generator_quality import held_out_photos, photo_embeddings

    n = config.fd_samples
    if n == 0:
        return None
    if config.face_weights is None:
        raise LikenessError("no_face_weights", "--fd-samples needs --face-weights "
                            "(the MobileFaceNet whose embeddings FD compares)")
    face = state.face or load_face_model(config.face_weights, state.device)
    if config.data is None:  # smoke runs: other synthetic images stand in for photos
        synthetic = SyntheticImages(config.resolution, n, seed=config.seed + 1)
        photos = torch.stack([synthetic[i] for i in range(n)]).add(1).div(2)
    else:
        if not (config.data.parent / "labels.csv").is_file():
            raise LikenessError("no_labels", f"--fd-samples needs labels.csv beside "
                                f"{config.data} to find the held-out people")
        photos = held_out_photos(config.data.parent, n, one_per_person=False)
    return FDProbe(face, photo_embeddings(face, photos))


def make_dataset(config: TrainConfig) -> Dataset[Tensor]:
    if config.data is None:
        return SyntheticImages(config.resolution, config.synthetic_count, config.seed,
                               mirror=config.mirror)
    members = read_member_list(config.members) if config.members is not None else None
    return ImagesZip(config.data, config.resolution, members=members, mirror=config.mirror)


def batches(config: TrainConfig, dataset: Dataset[Tensor], start_step: int,
            device: torch.device) -> Iterator[Tensor]:
    workers = config.workers if config.workers is not None else (4 if device.type == "cuda" else 0)
    loader = DataLoader(
        dataset, batch_size=config.batch, drop_last=True, num_workers=workers,
        sampler=StepSampler(len(dataset), config.seed, start=start_step * config.batch),
        pin_memory=device.type == "cuda",
        # its own generator: otherwise creating the iterator draws from the global RNG
        generator=torch.Generator().manual_seed(config.seed),
    )
    for real in loader:
        yield real.to(device, non_blocking=True)


@dataclass
class TrainResult:
    step: int
    kimg: float
    reason: str  # "done", "max_minutes" or "signal"
    checkpoint: Path
    last: dict[str, float] = field(default_factory=dict)


class MetricMeans:
    """Running means of the step metrics between two log lines."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        means = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return means


PLAIN_LINE_SECONDS = 60.0

# What the progress line shows, when the objective produces it.
STATUS_METRICS = (("loss_G", "G", 3), ("loss_D", "D", 3), ("r1", "R1", 4),
                  ("rec_l1", "L1", 4), ("rec_lowres", "lowres", 5), ("rec_identity", "id", 3),
                  ("rec_perceptual", "perc", 3),
                  ("kl", "KL", 0))


def status_text(metrics: dict[str, float]) -> str:
    return " ".join(f"{label} {metrics[key]:.{digits}f}" for key, label, digits in STATUS_METRICS
                    if key in metrics)


def progress_bar(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("train"), BarColumn(), TextColumn("{task.fields[kimg]}"),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
        console=Console(stderr=True), disable=not enabled)


def train(config: TrainConfig, *, resume: Path | None = None, progress: bool = True,
          on_step: Callable[[int, dict[str, float]], None] | None = None,
          on_checkpoint: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train (or resume) until ``total_kimg``, ``max_minutes`` or a signal; always
    leaves a checkpoint, ``g_ema.pt``, a sample grid and a log line behind.

    When resuming, only the run-control fields (``RUN_FIELDS``) of ``config``
    are used; everything else comes from the checkpoint.
    """
    from worker.pipeline import pick_device

    device = pick_device(config.device)
    ckpt = read_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        config = merge_resume_config(TrainConfig(**ckpt["train_config"]),
                                     config.model_dump(include=set(RUN_FIELDS)))
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    state = build_state(config, device)
    if ckpt is not None:
        load_checkpoint(state, ckpt)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data = batches(config, make_dataset(config), state.step, device)
    with torch.random.fork_rng(devices=[]):  # building F0 draws its random init
        probe = fd_probe(config, state)

    started = last_save = time.monotonic()
    session_start_step = last_log_step = state.step
    means, metrics, reason = MetricMeans(), {}, "done"
    shown: dict[str, float] = {}  # latest value of each metric, lazy ones included

    def checkpoint(why: str) -> dict[str, Any]:
        nonlocal last_save, last_log_step
        now = time.monotonic()
        state.train_seconds += now - last_save
        kind = state.device.type
        state.device_seconds[kind] = state.device_seconds.get(kind, 0.0) + now - last_save
        save_checkpoint(state, out / CHECKPOINT_NAME)
        G = exported_generator(state)
        files = export(state, out, G)
        entry = {"step": state.step, "kimg": round(state.kimg, 3), "reason": why,
                 "img_per_s": (state.step - last_log_step) * config.batch / max(now - last_save,
                                                                                1e-9),
                 "train_seconds": round(state.train_seconds, 1), **means.pop(), **files}
        if probe is not None:
            with torch.random.fork_rng(devices=[]):  # the run's RNG is already saved
                entry |= {"fd": probe(G), "fd_samples": config.fd_samples}
        with open(out / LOG_NAME, "a") as f:
            f.write(json.dumps(entry) + "\n")
        last_save, last_log_step = time.monotonic(), state.step
        if on_checkpoint is not None:
            on_checkpoint(entry)
        return entry

    with StopSignal() as stop, progress_bar(progress) as bar:
        task = bar.add_task("train", total=config.total_steps, completed=state.step,
                            kimg="", status="")
        # Under nohup, docker or CI there is no live bar: print a plain line a minute.
        plain_lines = progress and not bar.console.is_terminal
        last_line = time.monotonic()
        while state.step < config.total_steps:
            metrics = train_step(state, next(data))
            means.add(metrics)
            shown |= metrics
            if on_step is not None:
                on_step(state.step, metrics)
            elapsed = time.monotonic() - started
            rate = (state.step - session_start_step) * config.batch / max(elapsed, 1e-9)
            kimg = f"{state.kimg:.2f}/{config.total_kimg:g} kimg"
            status = f"{status_text(shown)} {rate:.1f} img/s"
            bar.update(task, completed=state.step, kimg=kimg, status=status)
            if plain_lines and time.monotonic() - last_line >= PLAIN_LINE_SECONDS:
                bar.console.print(f"train {kimg} {status}", highlight=False)
                last_line = time.monotonic()
            if stop.received is not None:
                reason = "signal"
                break
            if config.max_minutes is not None and elapsed >= config.max_minutes * 60:
                reason = "max_minutes"
                break
            done = state.step >= config.total_steps
            if not done and time.monotonic() - last_save >= config.checkpoint_minutes * 60:
                checkpoint("periodic")
        checkpoint(reason)
    data.close()  # shuts the DataLoader's worker processes down now, not at GC
    return TrainResult(step=state.step, kimg=state.kimg, reason=reason,
                       checkpoint=out / CHECKPOINT_NAME, last=metrics)
