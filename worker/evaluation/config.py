"""The options of ``likeness evaluate`` and their defaults (torch-free).

The defaults follow the paper's protocol as far as this CPU allows: 128 held-out
people and 128 UTKFace images. With the bundled 128-px generator a plain
100-step, 4-restart search costs about 16 s per thumbnail in batches of 8, a
steered one about 35 s (F's forward and backward pass over the candidates at
every step). CelebA-HQ runs about 128 plain, ~190 identity and ~450 attribute
searches (one per person and attribute of each balanced set), UTKFace 256;
the figures add 16 race and at most 20 attribute searches: about 7 hours on 2
cores, minutes on a GPU. Every output is cached, so a run
resumes where it stopped and a larger N reuses the smaller run's searches.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from pydantic import BaseModel, Field

DEFAULT_F0 = Path("../shared/weights/mobilefacenet_casia_068.ckpt")
RACE_JUDGE = "judge-race"
ATTRIBUTE_JUDGE = "judge-attributes"
# PAPER.md §4 Table 3's attributes, in CelebA's order.
TABLE3_ATTRIBUTES: tuple[str, ...] = (
    "Arched_Eyebrows",
    "Male",
    "Narrow_Eyes",
    "Smiling",
    "Wearing_Lipstick",
)
THUMBNAIL = 16  # the paper's smallest thumbnail: the most ambiguous, the hardest case

# evaluate's steering options and the ObjectiveWeights fields they set.
STEERING_OPTIONS = {
    "identity_weight": "identity",
    "race_weight": "race",
    "attr_weight": "attributes",
    "views": "views",
}

# --quick: a few images and steps, for CI and a smoke check on ../shared.
QUICK = {
    "celeba": 4,
    "utkface": 5,
    "steps": 5,
    "restarts": 2,
    "batch": 8,
    "swap_people": 2,
    "pair_people": 1,
}


class EvalConfig(BaseModel):
    """Everything that decides what ``evaluate`` computes and where it writes."""

    data_root: Path = Field(Path("../shared/data"), description="holds celebahq/ and utkface/")
    out: Path = Field(Path("runs/evaluate"), description="README.md, results.json, PNGs")
    cache: Path = Field(Path("runs/evaluate/cache"), description="search results per batch")
    celeba: int = Field(128, ge=2, description="held-out CelebA-HQ people (Tables 1 and 3)")
    utkface: int = Field(128, ge=1, description="held-out UTKFace images (Table 2)")
    steps: int = Field(100, ge=1, le=10_000, description="optimiser steps per search")
    restarts: int = Field(4, ge=1, le=64, description="random restarts per thumbnail")
    batch: int = Field(8, ge=1, description="thumbnails per batched search")
    seed: int = Field(0, description="base of the per-thumbnail seeds")
    weights: str | None = Field(None, description="generator: manifest name or file")
    extractor: str | None = Field(None, description="F with heads: manifest name or file")
    f0: Path = Field(DEFAULT_F0, description="F0: a MobileFaceNet checkpoint")
    race_judge: str = Field(RACE_JUDGE, description="race judge: manifest name or file")
    attribute_judge: str = Field(ATTRIBUTE_JUDGE, description="attribute judge: name or file")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch")
    # The steered searches' settings; None keeps ObjectiveWeights' default.
    identity_weight: float | None = Field(None, ge=0, description="weight of L_s")
    race_weight: float | None = Field(None, ge=0, description="weight of L_r")
    attr_weight: float | None = Field(None, ge=0, description="weight of L_a")
    views: int | None = Field(
        None,
        ge=1,
        le=16,
        description="views F sees of each candidate "
        "in the steered searches (default: ObjectiveWeights')",
    )
    # The figures' own searches: few, so they cost little beside the tables' (0: no figure).
    swap_people: int = Field(
        4, ge=0, description="UTKFace thumbnails asked for every race (race_swaps.png)"
    )
    pair_people: int = Field(
        2,
        ge=0,
        description="CelebA-HQ thumbnails asked for each attribute on and off "
        "(attribute_pairs.png)",
    )
    quick: bool = Field(False, description="tiny sizes (QUICK) for CI and smoke checks")

    @classmethod
    def with_quick(cls, quick: bool, **options: object) -> EvalConfig:
        """Options left unset (None) take the --quick sizes or the defaults."""
        given = {k: v for k, v in options.items() if v is not None}
        if quick:
            given = {**QUICK, **given}
        return cls(quick=quick, **given)  # type: ignore[arg-type]

    def command(self) -> str:
        """The command line that reproduces this evaluation, every option spelled out."""
        parts = [
            "likeness",
            "evaluate",
            "--data-root",
            str(self.data_root),
            "--out",
            str(self.out),
            "--cache",
            str(self.cache),
            "--celeba",
            str(self.celeba),
            "--utkface",
            str(self.utkface),
            "--steps",
            str(self.steps),
            "--restarts",
            str(self.restarts),
            "--batch",
            str(self.batch),
            "--swap-people",
            str(self.swap_people),
            "--pair-people",
            str(self.pair_people),
            "--seed",
            str(self.seed),
            "--f0",
            str(self.f0),
            "--race-judge",
            self.race_judge,
            "--attribute-judge",
            self.attribute_judge,
            "--device",
            self.device,
        ]
        if self.weights is not None:
            parts += ["--weights", self.weights]
        if self.extractor is not None:
            parts += ["--extractor", self.extractor]
        if self.threads is not None:
            parts += ["--threads", str(self.threads)]
        for option, value in self.objective_options().items():
            parts += [f"--{option.replace('_', '-')}", str(value)]
        return shlex.join(parts)

    def objective_options(self) -> dict[str, float | int]:
        """The steering settings given (by option name), the rest left to the defaults."""
        given = {k: getattr(self, k) for k in STEERING_OPTIONS}
        return {k: v for k, v in given.items() if v is not None}
