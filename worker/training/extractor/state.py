"""What a training step changes, and its checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from worker.engine.checkpoints import atomic_torch_save
from worker.training.common import read_checkpoint_file, rng_state
from worker.training.extractor.config import CHECKPOINT_NAME, ExtractorConfig
from worker.training.extractor.data import Data, dataset_targets
from worker.training.extractor.losses import attribute_pos_weight
from worker.training.extractor.model import ExtractorModel, build_model, build_optimizer


@dataclass
class TrainState:
    config: ExtractorConfig
    model: ExtractorModel
    opt: torch.optim.Optimizer
    pos_weight: Tensor
    device: torch.device
    step: int = 0
    train_seconds: float = 0.0
    heads_fitted: bool = False
    meta_epoch: int = 0  # lookalike meta-epochs completed
    meta_step: int = 0  # Siamese steps taken in the current meta-epoch
    threshold_deg: float | None = None  # θ_t of the last measurement: L_siamese's and the search's
    meta_history: list[dict[str, Any]] = field(default_factory=list)  # one entry per measurement
    meta_losses: list[float] = field(default_factory=list)  # L_siamese per step, this meta-epoch
    # The init export's hash when the run started: the path may hold another file by the
    # time this run is shipped (a ship overwrites the F it started from).
    init_sha256: str | None = None


def new_state(config: ExtractorConfig, data: Data, device: torch.device) -> TrainState:
    """A run's start: the model (pretrained backbone, fresh heads), its optimizer and the
    attribute weights of its training set."""
    model = build_model(config, data.classes).to(device)
    pos_weight = attribute_pos_weight(dataset_targets(data.attributes)).to(device)
    return TrainState(
        config,
        model,
        build_optimizer(config, model),
        pos_weight,
        device,
        heads_fitted=config.head_epochs == 0,
    )


def save_checkpoint(state: TrainState, path: Path) -> None:
    """The run's checkpoint. It holds nothing of the lookalikes (they stay in the run
    folder's lookalike files), so it is fit to commit as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(
        {
            "model": state.model.state_dict(),
            "opt": state.opt.state_dict(),
            "pos_weight": state.pos_weight.cpu(),
            "step": state.step,
            "heads_fitted": state.heads_fitted,
            "meta_epoch": state.meta_epoch,
            "meta_step": state.meta_step,
            "threshold_deg": state.threshold_deg,
            "meta_history": state.meta_history,
            "meta_losses": state.meta_losses,
            "init_sha256": state.init_sha256,
            "classes": state.model.arcface.weight.shape[0],
            "train_seconds": state.train_seconds,
            "rng": rng_state(),
            "train_config": state.config.model_dump(mode="json"),
        },
        path,
    )


def checkpoint_source(path: Path) -> Path:
    """A run folder (its checkpoint.pt), a checkpoint file, or a path with committed parts."""
    return path / CHECKPOINT_NAME if path.is_dir() else path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file, a folder holding one, or the committed parts of one
    (worker/training/parts.py), joined."""
    return read_checkpoint_file(
        checkpoint_source(path), "train-extractor", ("train_config", "pos_weight")
    )
