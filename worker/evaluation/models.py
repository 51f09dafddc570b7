"""The networks an evaluation runs and scores with, each with its file's sha256.

The generator and F come through worker/pipeline.py, as a job's do; F0 is the
pretrained MobileFaceNet without heads; the judges are the independent race
and attribute classifiers of worker/training/judges.py (the search never sees
them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from likeness.errors import LikenessError
from likeness.labels import UTKFACE_RACES
from likeness.manifest import resolve_weights, sha256_file, verified_sha256
from worker.engine.checkpoints import LoadedGenerator
from worker.engine.face.extractor import FaceExtractor
from worker.engine.face.race_reader import RaceReader
from worker.engine.objectives import DEFAULT_THRESHOLD_DEG
from worker.evaluation.config import TABLE3_ATTRIBUTES, THUMBNAIL, EvalConfig
from worker.pipeline import (
    freeze_extractor,
    load_extractor,
    load_race_reader,
    load_search_model,
)
from worker.training.judges import JudgeNet, load_judge


@dataclass
class Weights:
    """Where a network came from, for the report."""

    role: str  # generator, F, F0, race judge, attribute judge, race reader
    name: str  # manifest name, or the file
    path: str
    sha256: str


@dataclass
class Models:
    generator: LoadedGenerator
    f: FaceExtractor
    f_threshold: float  # θ_t of F (from its export)
    f0: FaceExtractor
    f0_threshold: float  # θ_t of F0: its LFW threshold through our alignment
    race_judge: JudgeNet
    attribute_judge: JudgeNet
    weights: list[Weights]
    device: torch.device
    # keeps the thumbnail's race in the bench's "kept" searches; evaluate's tables never
    # use it, so it stays out of ``weights`` (the networks a report lists)
    race_reader: RaceReader | None = None
    race_reader_weights: Weights | None = None

    def extractor(self, which: str) -> tuple[FaceExtractor, float, str]:
        """F or F0 with its θ_t and sha256 (which: "f" or "f0")."""
        role = {"f": "F", "f0": "F0"}[which]
        sha = next(w.sha256 for w in self.weights if w.role == role)
        if which == "f":
            return self.f, self.f_threshold, sha
        return self.f0, self.f0_threshold, sha

    def kept_race_reader(self) -> tuple[RaceReader, str]:
        """The race reader and its sha256, for the searches that keep the thumbnail's race."""
        if self.race_reader is None or self.race_reader_weights is None:
            raise LikenessError(
                "weights_not_found",
                "no race reader in the weights manifest: train one (likeness train-race-reader)",
                status=404,
            )
        return self.race_reader, self.race_reader_weights.sha256

    @property
    def resolution(self) -> int:
        return self.generator.generator.config.resolution


def _frozen(module: torch.nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


def load_generator_for(config: EvalConfig, device: torch.device) -> tuple[LoadedGenerator, str]:
    try:
        generator, name = load_search_model(config.weights, device)
    except LikenessError as e:
        if e.code == "no_default_weights":
            raise LikenessError(
                "no_default_weights",
                "no generator is bundled in weights/manifest.json: ship "
                "one (likeness weights ship-generator) or pass --weights PATH",
            ) from None
        raise
    res = generator.generator.config.resolution
    if res % THUMBNAIL or res < 2 * THUMBNAIL:
        raise LikenessError(
            "bad_weights",
            f"the generator draws {res} px faces: evaluation "
            f"needs a multiple of {THUMBNAIL} px, at least {2 * THUMBNAIL}",
        )
    return generator, name


def load_f(config: EvalConfig, device: torch.device) -> tuple[FaceExtractor, float, Weights]:
    try:
        path, _ = resolve_weights(config.extractor, "extractor")
        f, threshold, name = load_extractor(config.extractor, device)
        freeze_extractor(f)  # F is only read and searched through here
    except LikenessError as e:
        if e.code == "no_default_weights":
            raise LikenessError(
                "no_default_weights",
                "no extractor F is bundled in weights/manifest.json: "
                "train and ship one (likeness train-extractor --ship) or pass --extractor PATH",
            ) from None
        raise
    if f.race_head is None or f.attribute_head is None:
        raise LikenessError("bad_weights", f"{path}: F needs its race and attribute heads")
    absent = [a for a in TABLE3_ATTRIBUTES if a not in f.attribute_head.labels]
    absent += [r for r in UTKFACE_RACES if r not in f.race_head.labels]
    if absent:
        raise LikenessError(
            "bad_weights",
            f"{path}: F's heads lack {', '.join(absent)}, which Tables 2 and 3 target",
        )
    return f, threshold, Weights("F", name, str(path), sha256_file(path))


def load_f0(path: Path, device: torch.device) -> tuple[FaceExtractor, Weights]:
    if not path.is_file():
        raise LikenessError(
            "weights_not_found",
            f"no F0 checkpoint at {path}: pass --f0 PATH to a MobileFaceNet "
            "checkpoint (../shared/weights/mobilefacenet_casia_068.ckpt)",
            status=404,
        )
    try:
        f0 = FaceExtractor.mobilefacenet(path)
    except Exception as e:  # a wrong or damaged file fails in torch or in load_state_dict
        raise LikenessError(
            "bad_checkpoint", f"{path} is not a MobileFaceNet checkpoint: {e}"
        ) from None
    _frozen(f0)
    return f0.to(device), Weights("F0", path.name, str(path), sha256_file(path))


def load_judge_for(
    spec: str, task: str, option: str, device: torch.device
) -> tuple[JudgeNet, Weights]:
    """A judge by manifest name or file; missing judges say how to get them."""
    try:
        path, entry = resolve_weights(spec, "judge")
    except LikenessError:
        raise LikenessError(
            "judge_not_found",
            f"no {task} judge '{spec}' (neither a file nor in "
            f"weights/manifest.json): train the judges (likeness train-judges) or pass "
            f"{option} PATH",
            status=404,
        ) from None
    sha = verified_sha256(path, entry)
    try:
        judge = load_judge(path)
    except Exception as e:
        raise LikenessError("bad_checkpoint", f"{path} is not a judge: {e}") from None
    # Table 2 reads the race judge's outputs by UTKFace's race indices.
    if task == "race" and judge.labels != UTKFACE_RACES:
        raise LikenessError(
            "bad_weights",
            f"{path}: a race judge must output "
            f"{', '.join(UTKFACE_RACES)}, got {', '.join(judge.labels)}",
        )
    absent = [a for a in TABLE3_ATTRIBUTES if a not in judge.labels]
    if task == "attributes" and absent:
        raise LikenessError("bad_weights", f"{path}: the {task} judge lacks {', '.join(absent)}")
    _frozen(judge)
    name = entry.name if entry is not None else str(path)
    role = "race judge" if task == "race" else "attribute judge"
    return judge.to(device), Weights(role, name, str(path), sha)


def load_models(config: EvalConfig, device: torch.device) -> Models:
    """Everything, checked before any search runs: a missing judge fails in seconds."""
    race_judge, race_w = load_judge_for(config.race_judge, "race", "--race-judge", device)
    attr_judge, attr_w = load_judge_for(
        config.attribute_judge, "attributes", "--attribute-judge", device
    )
    f0, f0_w = load_f0(config.f0, device)
    f, f_threshold, f_w = load_f(config, device)
    generator, g_name = load_generator_for(config, device)
    g_w = Weights("generator", g_name, str(generator.path), generator.sha256)
    reader = load_race_reader(device)
    reader_w = None
    if reader is not None:
        path, entry = resolve_weights(None, "race-reader")
        name = entry.name if entry is not None else str(path)
        reader_w = Weights("race reader", name, str(path), sha256_file(path))
    return Models(
        generator=generator,
        f=f,
        f_threshold=f_threshold,
        f0=f0,
        f0_threshold=DEFAULT_THRESHOLD_DEG,
        race_judge=race_judge,
        attribute_judge=attr_judge,
        weights=[g_w, f_w, f0_w, race_w, attr_w],
        device=device,
        race_reader=reader,
        race_reader_weights=reader_w,
    )
