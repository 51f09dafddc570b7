"""A face extractor training run's settings, and which of them a resumed run may change."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from torch import Tensor

from worker.engine.objectives import ObjectiveWeights
from worker.engine.search import SearchConfig

CHECKPOINT_NAME = "checkpoint.pt"
EXPORT_NAME = "extractor.pt"
LOG_NAME = "log.jsonl"
DEFAULT_WEIGHTS = Path("../shared/weights/mobilefacenet_casia_068.ckpt")
DATA_ROOT = Path("../shared/data")
Item = tuple[Tensor, Tensor]


class ExtractorConfig(BaseModel):
    """Everything a run needs; saved in every checkpoint."""

    out: str = "runs/extractor"
    architecture: Literal["mobilefacenet", "iresnet"] = "mobilefacenet"
    weights: str | None = Field(
        str(DEFAULT_WEIGHTS),
        description="pretrained backbone: a "
        "MobileFaceNet .ckpt or an arcface_torch IResNet state_dict; "
        "None: random init (smoke)",
    )
    init_export: str | None = Field(
        None,
        description="start from this F export (backbone, heads, θ_t) instead of --weights: "
        "only the ArcFace centres are fitted (on frozen features) before training",
    )
    data_root: str | None = Field(str(DATA_ROOT), description="None: synthetic data (smoke)")
    use_lfw: bool = False
    max_images: int | None = Field(None, description="cap per data set and split (quick runs)")
    steps: int = Field(20_000, ge=0, description="joint steps; 0: fit the heads only")
    head_epochs: int = Field(
        30,
        ge=0,
        description="epochs of the head fit on frozen features before joint training; 0: skip it",
    )
    batch: int = 64
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 5e-4
    arc_scale: float = 64.0
    arc_margin: float = 0.5
    easy_margin: bool = False
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    max_minutes: float | None = None
    checkpoint_minutes: float = 10.0
    export_fp16: bool = False
    eval_limit: int = 2_000
    # The generator's faces are blurrier than photos, and an F that reads blur as another
    # person or race steers the search to sharpen, which it cannot, instead of to the person.
    blur_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of each joint-training batch seen through a lower resolution first",
    )
    blur_sides: tuple[int, int] = Field(
        (20, 64),
        description="the lower resolution: the crop's longer edge in pixels, drawn uniformly",
    )
    # the lookalike stage (PAPER.md §3 item 2), after the joint steps; 0 meta-epochs: off
    meta_epochs: int = Field(
        0, ge=0, description="generate lookalikes → train → regenerate cycles (paper: 5)"
    )
    lookalike_pairs: int = Field(
        24, ge=1, description="people (two photos each, so two searches) per meta-epoch"
    )
    siamese_steps: int = Field(50, ge=0, description="joint steps with L_siamese per meta-epoch")
    siamese_batch: int = Field(
        16,
        ge=1,
        description="lookalikes (each with its photo and the photo's mirror image) per step",
    )
    siamese_weight: float = Field(1.0, ge=0, description="weight of L_siamese in L_F")
    generator: str | None = Field(
        None,
        description="the search's generator: manifest name or file; None: the manifest's default",
    )
    search_steps: int = Field(50, ge=1, description="steps per lookalike search (PULSE: 100)")
    search_restarts: int = Field(
        SearchConfig.model_fields["restarts"].default,
        ge=1,
        description="restarts per lookalike search",
    )
    lookalike_thumbnail: int = Field(
        16, ge=2, description="thumbnail side the photos are downscaled to"
    )
    lookalike_batch: int = Field(8, ge=1, description="thumbnails per search batch")
    # Algorithm 1's first round steers with θ = 0: before any Siamese training F's own θ_t
    # would stop a search as soon as F calls the face the person, and the lookalikes would
    # be only as convincing as F is gullible; θ = 0 never counts the target reached, so the
    # first searches pull as close to the person as the thumbnail allows.
    first_search_threshold_deg: float = Field(
        0.0,
        ge=0,
        lt=180,
        description="θ of the identity objective in meta-epoch 1's searches (later ones: "
        "F's fitted θ_t)",
    )
    search_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="the lookalike searches' number format: auto is the device's fastest "
        "(bf16 with channels-last where a CPU has bf16 units), as likeness upscale runs",
    )
    lfw_pairs: int = Field(
        2000,
        ge=0,
        description="LFW held-out pairs measured before and after each meta-epoch "
        "(bench/lfw_verification.py's measure; needs lfw/ in the data root); 0: off",
    )
    temperature_deg: float = Field(
        ObjectiveWeights.model_fields["temperature_deg"].default,
        gt=0,
        description="τ of the similarity score, in the search's "
        "identity objective and in L_siamese",
    )
    # synthetic sizes (smoke)
    synthetic_count: int = 64
    synthetic_classes: int = 8

    @classmethod
    def smoke(cls, **overrides: Any) -> ExtractorConfig:
        base: dict[str, Any] = dict(
            weights=None,
            data_root=None,
            steps=4,
            head_epochs=2,
            batch=8,
            eval_limit=32,
            checkpoint_minutes=1e9,
        )
        return cls(**(base | overrides))


# Fields that may change when resuming; the rest must match the checkpoint.
RUN_FIELDS = (
    "out",
    "steps",
    "device",
    "workers",
    "max_minutes",
    "checkpoint_minutes",
    "export_fp16",
    "eval_limit",
    "meta_epochs",
    "lookalike_pairs",
    "siamese_steps",
    "siamese_batch",
    "siamese_weight",
    "generator",
    "search_steps",
    "search_restarts",
    "lookalike_thumbnail",
    "lookalike_batch",
    "temperature_deg",
    "search_precision",
)
