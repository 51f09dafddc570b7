"""Configuration for every likeness process, from ``LIKENESS_*`` environment variables.

Each field has a documented default so a fresh clone runs with no configuration;
``get_settings()`` caches one instance per process. Tests build ``Settings(...)``
directly instead of touching the environment.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_WEIGHTS_DIR = REPO_ROOT / "weights"


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/likeness``, or ``~/.local/share/likeness`` per the XDG spec."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "likeness"


class Settings(BaseSettings):
    """All knobs of the app, the job store and the worker's job handling."""

    model_config = SettingsConfigDict(env_prefix="LIKENESS_", extra="ignore")

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Directory for local state (the SQLite job store by default). "
        "Default: $XDG_DATA_HOME/likeness, else ~/.local/share/likeness.",
    )
    store: str = Field(
        default="",
        description="Job store URL: sqlite:///<path> (three slashes then the path, so an "
        "absolute path gives four) or redis://host:port/db. Empty means "
        "sqlite:///<data_dir>/jobs.sqlite3.",
    )
    redis_key_prefix: str = Field(
        default="likeness:",
        description="Prefix of every Redis key the store writes, so several deployments "
        "(or test runs) can share one Redis database.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys accepted as 'Authorization: Bearer <key>'. "
        "Empty (the default) disables authentication; every caller is then 'anonymous'.",
    )
    weights_dir: Path = Field(
        default=BUNDLED_WEIGHTS_DIR,
        description="Directory holding manifest.json and the weights it lists; every process "
        "reads it: the API for race and attribute label names, the worker and the CLI for "
        "the generator, face extractor and race reader to load.",
    )
    max_upload_bytes: int = Field(
        default=10 * 1024 * 1024,
        gt=0,
        description="Largest accepted size of one uploaded file, in bytes (default 10 MiB).",
    )
    max_pixels: int = Field(
        default=4096 * 4096,
        gt=0,
        description="Largest accepted width*height of an uploaded image, checked from the "
        "header before any pixel is decoded (default 4096*4096).",
    )
    thumbnail_max_pixels: int | None = Field(
        default=None,
        gt=0,
        description="Largest accepted width*height of a thumbnail, checked from the header. "
        "Empty (the default): (8 x the side of the manifest's default generator)^2, e.g. "
        "1024*1024 for the bundled 128-px generator: no generator scale needs more. "
        "max_pixels still bounds reference photos, which the face check shrinks first.",
    )
    thumbnail_max_side: int = Field(
        default=64,
        ge=1,
        description="Upscale mode auto: an image whose longer side is at most this many "
        "pixels is a face thumbnail, a larger one a photo whose faces are detected.",
    )
    photo_max_pixels: int = Field(
        default=4096 * 4096,
        gt=0,
        description="Largest accepted width*height of a photo (upscale mode photo), checked "
        "from the header before any pixel is decoded (default 4096*4096).",
    )
    photo_detect_max_side: int = Field(
        default=2048,
        ge=64,
        description="Photos are shrunk to at most this many pixels on their longer side "
        "before faces are detected in them (the detector finds faces of 20 pixels and up "
        "at that size); the faces are then cut from the full photo.",
    )
    photo_max_faces: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Most faces one photo request upscales; a photo with more faces chosen "
        "is refused (422 too_many_faces) and the request can pick some.",
    )
    photo_min_face_prob: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="Face probability the detector must reach for a face of a photo to be "
        "upscaled; less certain detections are listed, not upscaled.",
    )
    photo_max_face_fraction: float = Field(
        default=0.5,
        gt=0.0,
        description="faces=all and faces=largest leave out a face whose frame spans more than "
        "this fraction of the generator's side (0.5: a face the generator cannot enlarge at "
        "least 2x): upscaling it would not add detail, so it keeps the enlarged photo's "
        "pixels. Choosing it by index upscales it all the same.",
    )
    photo_output_max_side: int = Field(
        default=4096,
        ge=64,
        description="Longest side of a photo mode result: the photo is enlarged by the "
        "integer factor at which its smallest chosen face keeps its upscaled resolution, "
        "but no further than this.",
    )
    reference_check_max_side: int = Field(
        default=1024,
        ge=64,
        description="The API decodes a reference photo at most this many pixels on its longer "
        "side (JPEGs are decoded at reduced scale) before looking for a face in it.",
    )
    reference_checks_max: int = Field(
        default=2,
        ge=1,
        description="Most reference photos the API checks for a face at once, per process; "
        "a submission beyond that answers 429 with Retry-After.",
    )
    store_timeout_seconds: float = Field(
        default=2.0,
        gt=0,
        description="The API's limit on one job store read (and on connecting to Redis); "
        "past it, or when the store refuses, the API answers 503 store_unavailable.",
    )
    reference_face_check: bool = Field(
        default=True,
        description="The API refuses a reference photo (422 no_face) unless its ONNX face "
        "detector finds a face in it.",
    )
    reference_min_face_prob: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="Face probability the detector must reach for a reference photo to count "
        "as having a face.",
    )
    lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How long a claimed job stays with its worker without a heartbeat "
        "before another worker may claim it again.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="How many times a job may be claimed; when the lease of the last "
        "attempt runs out the job fails with code worker_lost.",
    )
    result_ttl_seconds: int = Field(
        default=7 * 24 * 3600,
        gt=0,
        description="Redis only: how long a finished job, its inputs and its result are "
        "kept (default 7 days). The SQLite store keeps them until deleted.",
    )
    worker_heartbeat_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="/readyz answers 503 unless some worker heartbeated within this window.",
    )
    # The API's own caps, inside the request model's bounds (likeness/request.py), which
    # are all the command line has: a shared service keeps each job's cost in check.
    steps_min: int = Field(default=1, ge=1, description="Smallest 'steps' the API accepts.")
    steps_max: int = Field(
        default=1000,
        ge=1,
        description="Largest 'steps' the API accepts (at most the request model's 10000).",
    )
    steps_default: int = Field(
        default=100,
        ge=1,
        description="Optimisation steps of the latent search when the request gives none "
        "(API and command line).",
    )
    restarts_min: int = Field(default=1, ge=1, description="Smallest 'restarts' the API accepts.")
    restarts_max: int = Field(
        default=32,
        ge=1,
        description="Largest 'restarts' the API accepts (at most the request model's 64).",
    )
    restarts_default: int = Field(
        default=4,
        ge=1,
        description="Independent random restarts of the search per "
        "thumbnail when the request gives none.",
    )

    generator: str | None = Field(
        default=None,
        description="Worker: the generator to load, a name in weights/manifest.json or a "
        "checkpoint path. Empty (the default): the manifest's default generator.",
    )
    extractor: str | None = Field(
        default=None,
        description="Worker: the face extractor F with race and attribute heads that applies "
        "race, attribute and reference targets; a manifest name or a file. Empty (the "
        "default): the manifest's default extractor, if one is bundled.",
    )
    device: str = Field(
        default="auto",
        description="Worker: torch device, auto (CUDA when available, else CPU), cpu, cuda "
        "or cuda:N.",
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Worker: most compatible jobs claimed together and run as one batched "
        "search (each job adds restarts rows to the batch). Unset: the size measured "
        "fastest per image for the worker's device and precision (docs/benchmarks.md).",
    )
    worker_poll_seconds: float = Field(
        default=1.0,
        gt=0,
        description="Worker: how long an idle worker waits before asking the store for jobs again.",
    )
    worker_heartbeat_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Worker: how often a running batch renews its leases (never less often "
        "than a third of lease_seconds).",
    )
    progress_interval_seconds: float = Field(
        default=0.5,
        ge=0,
        description="Worker: least time between two progress updates of a job in the store "
        "(0.5: at most two a second). Each update reads the search's progress back from the "
        "device, the search loop's only wait for the GPU, so this also bounds how often the "
        "GPU's queue drains.",
    )
    search_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="Worker: number format of the generator in the search: fp32, bf16 "
        "(bfloat16 autocast; the losses, latents and optimiser stay float32), or auto: bf16 "
        "where the device has bf16 units (a GPU that supports it, a CPU with AVX512-BF16 or "
        "AMX), fp32 elsewhere. A seed's image depends on it.",
    )
    search_channels_last: bool | None = Field(
        default=None,
        description="Worker: channels-last (NHWC) activations in the generator. Unset: on "
        "where it was measured faster (bf16 on a CPU with bf16 units), off elsewhere.",
    )
    search_compile: Literal["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"] = (
        Field(
            default="off",
            description="Worker: torch.compile the generator's synthesis with this mode "
            "(reduce-overhead adds CUDA graphs on a GPU). The first search of each batch "
            "shape compiles first: minutes on a GPU, over ten on a CPU, where it was not "
            "measured faster.",
        )
    )

    @field_validator("generator", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        # LIKENESS_GENERATOR= (set but empty) means the default, as an unset variable does.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # The environment carries one comma-separated string; code may pass a list.
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.steps_min <= self.steps_default <= self.steps_max:
            raise ValueError("need steps_min <= steps_default <= steps_max")
        if not self.restarts_min <= self.restarts_default <= self.restarts_max:
            raise ValueError("need restarts_min <= restarts_default <= restarts_max")
        if not self.store:
            self.store = f"sqlite:///{self.data_dir / 'jobs.sqlite3'}"
        return self

    @property
    def manifest_path(self) -> Path:
        return self.weights_dir / "manifest.json"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
