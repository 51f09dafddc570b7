"""A generator training run's settings, and which of them a resumed run may change."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from likeness.errors import LikenessError
from worker.engine.generator import GeneratorConfig

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
        "gan",
        description="gan: StyleGAN2's adversarial training (needs a GPU's millions of "
        "images); vae: G as the decoder of a variational autoencoder, which makes faces after "
        "a few epochs (the CPU path); vae-gan: the autoencoder plus the adversarial terms",
    )
    kl_weight: float = Field(5e-5, ge=0, description="vae: weight of the KL term (nats/image)")
    lowres_weight: float = Field(10.0, ge=0, description="vae: weight of the 16/32-px MSE")
    identity_weight: float = Field(
        0.1, ge=0, description="vae: weight of 1 - cos of MobileFaceNet embeddings"
    )
    face_weights: Path | None = Field(
        None,
        description="MobileFaceNet checkpoint: the vae objectives' identity term (None: "
        "no term) and the FD at checkpoints",
    )
    fd_samples: int = Field(
        0,
        ge=0,
        description="at every checkpoint, the FD between the MobileFaceNet embeddings "
        "of this many samples of G_ema and as many held-out photos (val + test people of the "
        "labels.csv beside the zip), in the log: progress across checkpoints; 0: off",
    )
    perceptual_weight: float = Field(
        0.0,
        ge=0,
        description="vae: weight of the distance of MobileFaceNet's feature maps "
        "(worker/training/perceptual.py; needs face_weights); 0: off",
    )
    race_weight: float = Field(
        0.0,
        ge=0,
        description="vae: weight of the divergence between F's race readings of the photo "
        "and of its reconstruction (needs race_extractor); 0: off",
    )
    race_extractor: Path | None = Field(
        None, description="F export with a race head, for race_weight (e.g. weights/extractor.pt)"
    )
    adv_weight: float = Field(
        1.0,
        ge=0,
        description="weight of G's adversarial loss (with d_fakes=reconstructions: times "
        "the gradient balance)",
    )
    adv_start_kimg: float = Field(
        0.0,
        ge=0,
        description="vae-gan: no adversarial updates before this many kimg, so "
        "that reconstructions are good before D judges them",
    )
    adv_ramp_kimg: float = Field(
        0.0,
        ge=0,
        description="then raise G's adversarial weight linearly from 0 to "
        "adv_weight over this many kimg",
    )
    batch: int = Field(8, ge=1)
    lr: float = Field(0.002, gt=0, description="Adam lr before the lazy-reg correction")
    d_lr_ratio: float = Field(
        1.0,
        gt=0,
        description="D's lr as a multiple of lr (two time-scale updates): with "
        "d_fakes=samples G moves every step by both its autoencoder and its adversarial "
        "update, and a D that cannot keep up sits at chance and sharpens nothing",
    )
    d_fakes: Literal["samples", "reconstructions"] = Field(
        "samples",
        description="vae-gan: what D is shown as fake. samples: G's random samples, and G "
        "takes its own adversarial step on them; reconstructions: the autoencoder's "
        "reconstructions of the batch (VQGAN and SD-VAE's way), G's adversarial term only "
        "in the autoencoder's update, weighted against the reconstruction terms by their "
        "gradients at G's last layer, so that D's verdict sharpens what the search returns",
    )
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
        None,
        description="vae objectives: fit the exported prior to the encoded faces of "
        "these members of the data zip (a split file), not to the running moments of the "
        "training batches: a prior that is, say, race-balanced where the training data is not; "
        "costs one encoder pass over them at every checkpoint",
    )
    init_generator: Path | None = Field(
        None,
        description="start G and G_ema from this generator checkpoint (same config): "
        "a warm start, e.g. from weights/generator.pt when a run is gone",
    )
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
        if self.race_weight > 0 and (self.race_extractor is None or self.objective == "gan"):
            raise ValueError("race_weight needs race_extractor and a vae objective")
        if (self.adv_start_kimg > 0 or self.adv_ramp_kimg > 0) and self.objective != "vae-gan":
            raise ValueError("adv_start_kimg and adv_ramp_kimg are for the vae-gan objective")
        if self.d_fakes != "samples" and self.objective != "vae-gan":
            raise ValueError("d_fakes is for the vae-gan objective")
        if self.pl_weight > 0 and (self.objective == "vae" or self.d_fakes != "samples"):
            # path lengths are regularised in G's own adversarial step on samples
            raise ValueError(
                "pl_weight needs G's adversarial step on samples (objective gan or vae-gan, "
                "d_fakes samples)"
            )
        if self.prior_members is not None and (self.objective == "gan" or self.data is None):
            raise ValueError("prior_members needs data and a vae objective")
        return self

    def generator_config(self) -> GeneratorConfig:
        return GeneratorConfig.slim(
            self.resolution,
            channel_max=self.channel_max,
            channel_base=self.channel_base,
            style_dim=self.style_dim,
            n_mlp=self.n_mlp,
        )

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
            resolution=32,
            channel_max=32,
            channel_base=512,
            style_dim=32,
            n_mlp=2,
            batch=4,
            total_kimg=0.16,
            checkpoint_minutes=0.25,
            r1_every=4,
            latent_avg_samples=2000,
            out=Path("runs/smoke"),
        )
        return cls(**(base | overrides))


# Fields a resumed run may change; every other field must match the checkpoint.
# The vae objectives' loss weights are among them: raising the KL weight
# after a warm-up at a low one is the usual way to train a VAE (the checkpoint
# records the weights in force when it was written). So are D's augmentation
# (DiffAugment keeps D from memorising a small set, but it can also hold a D
# that is losing to G at chance, and the way to find out is to turn it off)
# and what D is shown as fake; neither changes a shape.
RUN_FIELDS = frozenset(
    {
        "data",
        "members",
        "out",
        "total_kimg",
        "max_minutes",
        "checkpoint_minutes",
        "device",
        "workers",
        "synthetic_count",
        "face_weights",
        "kl_weight",
        "lowres_weight",
        "identity_weight",
        "adv_weight",
        "fd_samples",
        "perceptual_weight",
        "race_weight",
        "race_extractor",
        "adv_start_kimg",
        "adv_ramp_kimg",
        "prior_members",
        "d_lr_ratio",
        "augment",
        "d_fakes",
    }
)


def merge_resume_config(saved: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """The checkpoint's config with run-control overrides; refuses shape/optimiser changes."""
    for name, value in overrides.items():
        if name not in RUN_FIELDS and value != getattr(saved, name):
            raise LikenessError(
                "resume_mismatch",
                f"cannot change {name} when resuming "
                f"(the checkpoint has {getattr(saved, name)!r}, asked for {value!r})",
            )
    # validated again: a run-control change can make a setting do nothing
    return TrainConfig.model_validate(
        saved.model_dump() | {k: v for k, v in overrides.items() if k in RUN_FIELDS}
    )
