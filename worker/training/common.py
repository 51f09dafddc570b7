"""What every training loop shares: resumable RNG state, reading a checkpoint back,
stopping on a signal, and running means of step metrics."""

from __future__ import annotations

import io
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from likeness.errors import LikenessError
from worker.training.parts import checkpoint_named, has_parts, join_parts


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint_file(path: Path, command: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A checkpoint file, or the committed parts of one (parts.py), joined; one that lacks
    any of ``keys`` is not ``command``'s checkpoint."""
    named = checkpoint_named(path)
    source: Path | io.BytesIO = path
    # the parts when their index is named, or when no file of the checkpoint's name exists
    if has_parts(named) and (named != path or not path.is_file()):
        path, source = named, io.BytesIO(join_parts(named))
    try:
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LikenessError(
            "checkpoint_not_found", f"no such checkpoint: {path}", status=404
        ) from None
    except Exception as e:  # torch raises many types for a bad file
        raise LikenessError("bad_checkpoint", f"cannot read {path}: {e}") from None
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in keys):
        raise LikenessError("bad_checkpoint", f"{path} is not a {command} checkpoint")
    return ckpt


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
