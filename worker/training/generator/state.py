"""What a training step changes (G, D, G_ema, optimisers, counters), and its checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from likeness.errors import LikenessError
from worker.engine.checkpoints import atomic_torch_save, load_generator
from worker.engine.face.export import load_export
from worker.engine.face.extractor import FaceExtractor
from worker.engine.generator import Generator, GeneratorConfig
from worker.training.common import read_checkpoint_file, rng_state, set_rng_state
from worker.training.generator.config import TrainConfig
from worker.training.generator.diffaugment import parse_policy
from worker.training.generator.discriminator import Discriminator
from worker.training.generator.vae import (
    CodeMoments,
    build_encoder,
    load_face_model,
)


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
    race_extractor: FaceExtractor | None = None  # frozen F, for the race term; not checkpointed
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

    def adam(params: Iterator[nn.Parameter], ratio: float, scale: float = 1.0) -> torch.optim.Adam:
        return torch.optim.Adam(params, lr=config.lr * ratio * scale, betas=(0.0, 0.99**ratio))

    fp16 = amp_dtype(config, device) == torch.float16
    state = TrainState(
        config=config,
        device=device,
        G=G,
        D=D,
        G_ema=G_ema,
        opt_G=adam(G.parameters(), g_ratio),
        opt_D=adam(D.parameters(), d_ratio, config.d_lr_ratio),
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
        if config.race_weight > 0 and config.race_extractor is not None:
            state.race_extractor = load_export(config.race_extractor).to(device).eval()
            state.race_extractor.requires_grad_(False)
    return state


def warm_start_weights(path: Path, gconf: GeneratorConfig) -> dict[str, Tensor]:
    """A shipped generator's parameters in float32, if its config is this run's. The
    encoder, D and the optimisers still start fresh: only G's knowledge survives."""
    loaded = load_generator(path)
    theirs = loaded.generator.config.model_dump(mode="json")
    ours = gconf.model_dump(mode="json")
    if theirs != ours:
        differ = sorted(k for k in ours if theirs.get(k) != ours[k])
        raise LikenessError(
            "init_mismatch",
            f"{path} is a generator with another config "
            f"({', '.join(differ)} differ): give this run's shape options",
        )
    return {k: v.float() for k, v in loaded.generator.state_dict().items()}


def save_checkpoint(state: TrainState, path: Path) -> None:
    ckpt = {
        "G": state.G.state_dict(),
        "D": state.D.state_dict(),
        "G_ema": state.G_ema.state_dict(),
        "opt_G": state.opt_G.state_dict(),
        "opt_D": state.opt_D.state_dict(),
        "step": state.step,
        "kimg": state.kimg,
        "mean_path_length": state.mean_path_length,
        "train_seconds": state.train_seconds,
        "device_seconds": state.device_seconds,
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
    return read_checkpoint_file(path, "train-generator", ("train_config",))


def load_autoencoder(path: Path, device: torch.device) -> tuple[Discriminator, Generator, float]:
    """A vae run's encoder and G_ema (eval mode) and its kimg, from a checkpoint file or
    its committed parts: what the decoder renders of a face whose code is given."""
    ckpt = read_checkpoint(path)
    config = TrainConfig(**ckpt["train_config"])
    if "E" not in ckpt:
        raise LikenessError("no_encoder", f"{path} is a {config.objective} run: it has no encoder")
    gconf = config.generator_config()
    E, G = build_encoder(gconf), Generator(gconf)
    E.load_state_dict(ckpt["E"])
    G.load_state_dict(ckpt["G_ema"])
    kimg = int(ckpt["step"]) * config.batch / 1000
    return E.to(device).eval(), G.to(device).eval(), kimg


def load_checkpoint(state: TrainState, ckpt: dict[str, Any]) -> None:
    """Restore everything ``save_checkpoint`` wrote into a freshly built state."""
    state.G.load_state_dict(ckpt["G"])
    state.D.load_state_dict(ckpt["D"])
    state.G_ema.load_state_dict(ckpt["G_ema"])
    state.opt_G.load_state_dict(ckpt["opt_G"])
    d_lr = state.opt_D.param_groups[0]["lr"]
    state.opt_D.load_state_dict(ckpt["opt_D"])
    for group in state.opt_D.param_groups:  # a resume may change d_lr_ratio; the rest is saved
        group["lr"] = d_lr
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
    state.device_seconds = {
        k: float(v)
        for k, v in ckpt.get(
            "device_seconds", {pinned if pinned != "auto" else "unrecorded": state.train_seconds}
        ).items()
    }
    set_rng_state(ckpt["rng"])
