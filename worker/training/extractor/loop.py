"""The training loop: the phases, the lookalike stage, checkpoints, exports and the
progress bar."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from likeness.errors import LikenessError
from likeness.manifest import sha256_file
from likeness.splits import DEFAULT_SALT
from worker.engine.checkpoints import LoadedGenerator
from worker.engine.downscale import downscale_factor
from worker.engine.face.export import export, load_export
from worker.engine.objectives import DEFAULT_THRESHOLD_DEG, ObjectiveWeights
from worker.engine.search import config_key
from worker.engine.speed import fastest_layout, fastest_precision
from worker.pipeline import load_search_model, pick_device
from worker.training import lfw
from worker.training import lookalikes as looks
from worker.training.common import MetricMeans, StopSignal, rng_state, set_rng_state
from worker.training.extractor.config import (
    CHECKPOINT_NAME,
    EXPORT_NAME,
    LOG_NAME,
    RUN_FIELDS,
    ExtractorConfig,
    Item,
)
from worker.training.extractor.data import Data, dataset_targets, make_data, originals
from worker.training.extractor.measures import evaluate
from worker.training.extractor.state import TrainState, new_state, read_checkpoint, save_checkpoint
from worker.training.extractor.steps import fit_heads, frozen_features, stream, train_step
from worker.training.extractor.verdict import siamese_curve
from worker.training.parts import split_into_parts


def train_info(state: TrainState, data: Data) -> dict[str, Any]:
    """Where an export came from: kept in it, and the manifest's provenance when shipped."""
    c = state.config
    sets: dict[str, Any] = (
        {
            "identity": ["celebahq"] + (["lfw"] if c.use_lfw else []),
            "race": ["utkface"],
            "attributes": ["celebahq"],
        }
        if c.data_root is not None
        else {"synthetic": True}
    )
    return {
        "step": state.step,
        "train_seconds": state.train_seconds,
        "device": str(state.device),
        "data": c.data_root or "synthetic",
        "use_lfw": c.use_lfw,
        "init": c.init_export or c.weights,
        "init_sha256": state.init_sha256,
        "architecture": c.architecture,
        "head_epochs": c.head_epochs,
        "meta_epochs": state.meta_epoch,
        "datasets": sets,
        "faces": {
            "identity": len(originals(data.identity)),  # type: ignore[arg-type]
            "race": len(originals(data.race)),  # type: ignore[arg-type]
            "attributes": len(originals(data.attributes)),
        },  # type: ignore[arg-type]
        "split": f"train split of likeness/splits.py (salt {DEFAULT_SALT}, by identity); "
        "metrics on held-out test people",
        "config": c.model_dump(mode="json"),
    }


@dataclass
class TrainResult:
    step: int
    reason: str  # "done", "max_minutes" or "signal"
    checkpoint: Path
    export: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    meta_history: list[dict[str, Any]] = field(default_factory=list)  # the lookalike stage's


def progress_bar(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def resume_config(saved: ExtractorConfig, overrides: dict[str, Any]) -> ExtractorConfig:
    return saved.model_copy(update={k: v for k, v in overrides.items() if k in RUN_FIELDS})


def restore(state: TrainState, ckpt: dict[str, Any], data: Data) -> None:
    """``state`` as the checkpoint left it, global RNG included."""
    if int(ckpt["classes"]) != data.classes:
        raise LikenessError(
            "bad_checkpoint",
            "the data's identity classes changed since "
            f"the checkpoint ({ckpt['classes']} → {data.classes})",
        )
    state.model.load_state_dict(ckpt["model"])
    state.opt.load_state_dict(ckpt["opt"])
    state.pos_weight = ckpt["pos_weight"].to(state.device)
    state.step, state.train_seconds = int(ckpt["step"]), float(ckpt["train_seconds"])
    # Checkpoints from before the head fit existed were already training jointly.
    state.heads_fitted = bool(ckpt.get("heads_fitted", True))
    state.meta_epoch = int(ckpt.get("meta_epoch", 0))
    state.meta_step = int(ckpt.get("meta_step", 0))
    state.threshold_deg = ckpt.get("threshold_deg")
    state.meta_history = list(ckpt.get("meta_history", []))
    state.meta_losses = list(ckpt.get("meta_losses", []))
    state.init_sha256 = ckpt.get("init_sha256")
    # Older checkpoints also carry "lookalikes" (the lookalikes' latents): left unread.
    set_rng_state(ckpt["rng"])


def start_from_export(state: TrainState, path: Path) -> None:
    """F's backbone, heads and θ_t from an export; the ArcFace centres, which an export
    does not carry, are left to the head fit (centres only)."""
    try:
        exported = load_export(path)
    except LikenessError:
        raise
    except Exception as e:  # torch raises many types for a bad file
        raise LikenessError("bad_checkpoint", f"cannot read the F export {path}: {e}") from None
    arch = state.config.architecture
    if type(exported.backbone) is not type(state.model.extractor.backbone):
        raise LikenessError(
            "bad_checkpoint",
            f"{path} holds a {type(exported.backbone).__name__} backbone, not the "
            f"{arch} of this run (--architecture)",
        )
    ext = state.model.extractor
    ext.backbone.load_state_dict(exported.backbone.state_dict())
    ext.race_head.load_state_dict(exported.race_head.state_dict())
    ext.attribute_head.load_state_dict(exported.attribute_head.state_dict())
    state.threshold_deg = exported.threshold_deg
    state.init_sha256 = sha256_file(path)


def stage_generator(state: TrainState) -> LoadedGenerator | None:
    """The generator the lookalike searches run in, None when no meta-epoch is left;
    loaded at the start, so a missing one fails before hours of training."""
    c = state.config
    if state.meta_epoch >= c.meta_epochs:
        return None
    try:
        # Building the generator draws its random init: keep the run's RNG out of it, so a
        # run with the stage trains as one without it up to the stage.
        with torch.random.fork_rng(devices=[]):
            model, _ = load_search_model(c.generator, state.device)
    except LikenessError as e:
        if e.code != "no_default_weights":
            raise
        raise LikenessError(
            "no_default_weights",
            "the lookalike stage (meta-epochs) searches "
            "a generator and none is bundled in weights/: pass --generator "
            "PATH (a checkpoint with a mapping fit)",
        ) from None
    try:
        downscale_factor(model.generator.config.resolution, c.lookalike_thumbnail)
    except ValueError as e:
        raise LikenessError("bad_option", f"lookalike thumbnail: {e}") from None
    return model


class Session:
    """One call of ``train``: the phases in order, with the checkpoint, log line and
    export each leaves behind, the stop rules and the progress bar."""

    def __init__(
        self,
        state: TrainState,
        data: Data,
        generator: LoadedGenerator | None,
        stop: StopSignal,
        bar: Any,
        evaluate_at_end: bool,
        on_step: Callable[[int, dict[str, float]], None] | None,
        save_parts: Path | None = None,
    ) -> None:
        self.state, self.data, self.generator = state, data, generator
        self.save_parts = save_parts
        self.pair_sets: dict[int, looks.LookalikePairs] = {}  # per meta-epoch, for training
        self.warned_missing = False
        self.lfw: lfw.LfwPairs | None = None
        self.stop, self.bar = stop, bar
        self.config, self.out = state.config, Path(state.config.out)
        self.evaluate_at_end, self.on_step = evaluate_at_end, on_step
        # Separate seeds so the three streams do not walk in lock-step.
        self.streams = [
            stream(self.config, ds, state.step, self.config.seed * 3 + i, state.device)
            for i, ds in enumerate((data.identity, data.race, data.attributes))
        ]
        self.started = self.last_save = time.monotonic()
        self.means = MetricMeans()
        self.last: dict[str, float] = {}
        self.measured: tuple[int, dict[str, Any]] | None = None  # (step, evaluate's result)
        self.task = bar.add_task(
            "train-extractor", total=self.config.steps, completed=state.step, status=""
        )

    def close(self) -> None:
        for s in self.streams:
            s.close()  # type: ignore[attr-defined]

    def stopping(self) -> str:
        if self.stop.received is not None:
            return "signal"
        if (
            self.config.max_minutes is not None
            and time.monotonic() - self.started >= self.config.max_minutes * 60
        ):
            return "max_minutes"
        return "done"

    def checkpoint(
        self, why: str, final: bool = False, info: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        state, model = self.state, self.state.model
        state.train_seconds += time.monotonic() - self.last_save
        save_checkpoint(state, self.out / CHECKPOINT_NAME)
        if self.save_parts is not None:  # the state a commit carries to the next machine
            split_into_parts(self.out / CHECKPOINT_NAME, self.save_parts / CHECKPOINT_NAME)
        entry: dict[str, Any] = {
            "step": state.step,
            "reason": why,
            "train_seconds": round(state.train_seconds, 1),
            **self.means.pop(),
            **(info or {}),
        }
        if final:
            result = self.evaluation() if self.evaluate_at_end else {}
            model.extractor.threshold_deg = result.get("threshold_deg")
            if state.meta_history:  # the lookalike stage: before, and after each meta-epoch
                result = result | {"siamese": state.meta_history}
            export(
                model.extractor,
                self.out / EXPORT_NAME,
                result,
                self.config.export_fp16,
                {"train": train_info(state, self.data)},
            )
            entry["metrics"] = {
                k: v for k, v in result.items() if k not in ("attribute_ap", "siamese")
            }
        with open(self.out / LOG_NAME, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.last_save = time.monotonic()
        return entry

    def evaluation(self) -> dict[str, Any]:
        """``evaluate`` of F now (the last measurement's when F has not changed since),
        leaving the global RNG as it was, for a later resume's draws."""
        state = self.state
        if self.measured is not None and self.measured[0] == state.step:
            return self.measured[1]
        rng = rng_state()
        result = evaluate(state.model.extractor, self.data, self.config.eval_limit, state.device)
        set_rng_state(rng)
        self.measured = (state.step, result)
        return result

    def step(self, siamese: Item | None = None) -> str:
        """One joint step (with L_siamese given lookalikes); returns why to stop, or "done"."""
        state = self.state
        if time.monotonic() - self.last_save >= self.config.checkpoint_minutes * 60:
            self.checkpoint("periodic")
        batches = (next(self.streams[0]), next(self.streams[1]), next(self.streams[2]))
        self.last = metrics = train_step(state, batches, siamese)
        if "loss_siamese" in metrics:
            state.meta_losses.append(metrics["loss_siamese"])
        self.means.add(metrics)
        if self.on_step is not None:
            self.on_step(state.step, metrics)
        status = " ".join(
            f"{name} {metrics['loss_' + name]:.3f}"
            for name in ("arc", "race", "attr", "siamese")
            if "loss_" + name in metrics
        )
        self.bar.update(self.task, completed=state.step, status=status)
        return self.stopping()

    def run(self) -> tuple[str, dict[str, Any]]:
        """Head fit (once), joint steps, the lookalike stage; then the final checkpoint."""
        state, config = self.state, self.config
        if not state.heads_fitted:
            self.bar.update(
                self.task, status=f"head fit ({config.head_epochs} epochs on frozen features)"
            )
            centres_only = config.init_export is not None  # the export's heads are trained
            features = frozen_features(state, self.data, centres_only)
            fit = fit_heads(state, features, centres_only)
            state.heads_fitted = True
            self.checkpoint("heads", info={"head_fit": fit})
        reason = self.stopping()  # the head fit may have used up the session
        # Once the stage has begun, its steps count toward ``step``: no plain steps follow.
        while reason == "done" and state.step < config.steps and not state.meta_history:
            reason = self.step()
        if reason == "done" and state.meta_epoch < config.meta_epochs:
            reason = self.lookalike_stage()
        return reason, self.checkpoint(reason, final=True)

    # ------------------------------------------------------------ the lookalike stage

    def lookalike_stage(self) -> str:
        """Meta-epochs of generate → train → measure until ``meta_epochs`` or a stop."""
        state, config = self.state, self.config
        left = (config.meta_epochs - state.meta_epoch) * config.siamese_steps - state.meta_step
        self.bar.update(self.task, total=state.step + max(left, 0))
        if not state.meta_history:  # F before the stage; its θ_t steers the first searches
            self.measure(None)
        reason = self.stopping()
        while reason == "done" and state.meta_epoch < config.meta_epochs:
            made = self.lookalikes()
            if not made.complete:
                return self.stopping()
            pairs = self.pair_sets[state.meta_epoch] = looks.training_pairs(made, self.data.photos)
            seed = 1_000_003 * (state.meta_epoch + 1) + config.seed
            lookalike_stream = stream(
                config,
                looks.accumulated(self.accumulated_pairs()),
                state.meta_step,
                seed,
                state.device,
                config.siamese_batch,
            )
            while reason == "done" and state.meta_step < config.siamese_steps:
                reason = self.step(next(lookalike_stream))
            lookalike_stream.close()  # type: ignore[attr-defined]
            if reason != "done":  # a resume measures, if this meta-epoch's steps are all done
                break
            state.meta_epoch, state.meta_step = state.meta_epoch + 1, 0
            self.measure((made, pairs))
            reason = self.stopping()
        return reason

    def accumulated_pairs(self) -> list[looks.LookalikePairs]:
        """The lookalikes of every meta-epoch so far that the run folder holds, this one's
        last. Committed state carries no lookalikes (faces steered to reproduce data-set
        people), so on a new machine the earlier meta-epochs' are gone and the Siamese
        steps draw from those made since."""
        sets = [self.pairs_of(k) for k in range(self.state.meta_epoch)]
        missing = [k + 1 for k, s in enumerate(sets) if s is None]
        if missing and not self.warned_missing:
            self.warned_missing = True
            print(
                f"lookalikes of meta-epoch(s) {', '.join(map(str, missing))} are not in "
                f"{self.out / looks.LOOKALIKE_DIR} (a new machine): training on the rest",
                flush=True,
            )
        return [s for s in sets if s is not None] + [self.pair_sets[self.state.meta_epoch]]

    def pairs_of(self, k: int) -> looks.LookalikePairs | None:
        """Meta-epoch k's lookalikes with their photos, read back from the run folder once;
        None when the folder lacks them (or holds them unfinished)."""
        if k not in self.pair_sets:
            made = looks.read_lookalikes(looks.lookalike_path(self.out, k), None)
            if made is None or not made.complete:
                return None
            self.pair_sets[k] = looks.training_pairs(made, self.data.photos)
        return self.pair_sets[k]

    def search_config(self) -> Any:
        assert self.generator is not None
        config, device = self.config, self.state.device
        precision = fastest_precision(config.search_precision, device)
        return self.generator.search_config(
            steps=config.search_steps,
            restarts=config.search_restarts,
            precision=precision,
            channels_last=fastest_layout(None, device, precision),
        )

    def lookalikes(self) -> looks.Lookalikes:
        """This meta-epoch's lookalikes: read back, or searched for (partial on a stop)."""
        state, config = self.state, self.config
        assert self.generator is not None and state.threshold_deg is not None
        k = state.meta_epoch
        # Algorithm 1's first round: θ = 0 (config.py says why); then F's own θ_t.
        theta = config.first_search_threshold_deg if k == 0 else state.threshold_deg
        settings = looks.LookalikeSettings(
            search=self.search_config(),
            objective=ObjectiveWeights(threshold_deg=theta, temperature_deg=config.temperature_deg),
            thumbnail=config.lookalike_thumbnail,
            batch=config.lookalike_batch,
        )
        pairs = looks.choose_pairs(
            dataset_targets(self.data.photos), config.lookalike_pairs, config.seed, k
        )
        key = {
            "meta_epoch": k,
            "step": state.step - state.meta_step,
            "seed": config.seed,
            "pairs": pairs.tolist(),
            "generator": self.generator.sha256,
            "search": config_key(settings.search),
            # lookalike searches name no race and keep none
            "objective": settings.objective.model_dump(mode="json", exclude={"kept_race"}),
            "thumbnail": config.lookalike_thumbnail,
        }
        task = self.bar.add_task("lookalikes", total=2 * len(pairs), status="")

        def progress(done: int, s: Any) -> None:
            rows = min(config.lookalike_batch, 2 * len(pairs) - done)
            self.bar.update(
                task,
                completed=done + rows * s.step / s.steps,
                status=f"meta-epoch {k + 1}/{config.meta_epochs}: search step {s.step}/{s.steps}",
            )

        rng = rng_state()  # searched or read back, the training after it draws alike
        made = looks.generate_lookalikes(
            # F as it is now, copied and frozen: refreshed every meta-epoch (and resume)
            looks.frozen_copy(state.model.extractor, settings.search.channels_last),
            self.generator,
            self.data.photos,
            pairs,
            settings,
            looks.lookalike_path(self.out, k),
            key,
            config.seed,
            progress,
            lambda: self.stopping() != "done",
        )
        set_rng_state(rng)
        self.bar.update(task, completed=made.done, visible=False)
        return made

    def measure(self, made: tuple[looks.Lookalikes, looks.LookalikePairs] | None) -> None:
        """After ``meta_epoch`` meta-epochs (0: before the stage): F's held-out metrics, the
        re-fitted θ_t, the angles of the lookalikes just trained on; logged and checkpointed."""
        state = self.state
        result = self.evaluation()
        theta = result.get("threshold_deg")
        # θ_t needs same/different pairs of training people; synthetic sets always have them.
        state.threshold_deg = float(theta) if theta is not None else DEFAULT_THRESHOLD_DEG
        entry: dict[str, Any] = {
            "meta_epoch": state.meta_epoch,
            "step": state.step,
            "metrics": {k: v for k, v in result.items() if k != "attribute_ap"},
        }
        held = self.lfw_pairs()
        if held is not None:
            entry["lfw"] = lfw.verify(state.model.extractor, held)
        if made is not None:
            entry["lookalikes"] = looks.measure(
                state.model.extractor, made[1], made[0], state.threshold_deg
            )
            entry["siamese_curve"] = siamese_curve(state.meta_losses)
        state.meta_losses = []
        state.meta_history.append(entry)
        self.checkpoint("meta_epoch", info=entry)

    def lfw_pairs(self) -> lfw.LfwPairs | None:
        """LFW's held-out pairs, aligned once per run folder; None without LFW data."""
        c = self.config
        root = Path(c.data_root) / "lfw" if c.data_root is not None else None
        if root is None or c.lfw_pairs == 0 or not (root / "images.zip").is_file():
            return None
        if self.lfw is None:
            self.bar.update(self.task, status="aligning LFW's held-out pairs (once)")
            self.lfw = lfw.cached_pairs(
                self.state.model.extractor, root, c.lfw_pairs, self.out / "cache"
            )
        return self.lfw


def train(
    config: ExtractorConfig,
    *,
    resume: Path | None = None,
    progress: bool = True,
    evaluate_at_end: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    save_parts: Path | None = None,
) -> TrainResult:
    """Fit the heads (once), train jointly, then run the lookalike stage (or resume any
    of them) until done, ``max_minutes`` or SIGTERM/SIGINT; always leaves a checkpoint,
    an export and a log line behind. A SIGTERM during the head fit or an evaluation takes
    effect when it ends, during the lookalike searches at the next search step.

    ``resume``: a checkpoint, its run folder or its committed parts; the current
    meta-epoch's lookalikes the run folder lacks are searched again. ``save_parts``: also
    write every checkpoint there as parts small enough to commit."""
    device = pick_device(config.device)
    ckpt = read_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        config = resume_config(ExtractorConfig(**ckpt["train_config"]), config.model_dump())
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    data = make_data(config)
    state = new_state(config, data, device)
    if ckpt is not None:
        restore(state, ckpt, data)
    elif config.init_export is not None:
        start_from_export(state, Path(config.init_export))
    elif config.weights is not None:
        state.init_sha256 = sha256_file(config.weights)
    generator = stage_generator(state)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    with StopSignal() as stop, progress_bar(progress) as bar:
        session = Session(state, data, generator, stop, bar, evaluate_at_end, on_step, save_parts)
        try:
            reason, entry = session.run()
        finally:
            session.close()
    out = Path(config.out)
    return TrainResult(
        step=state.step,
        reason=reason,
        checkpoint=out / CHECKPOINT_NAME,
        export=out / EXPORT_NAME,
        metrics=entry.get("metrics", {}),
        last=session.last,
        meta_history=state.meta_history,
    )
