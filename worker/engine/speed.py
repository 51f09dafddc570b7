"""How to run the search fastest on a device without changing what it finds.

``bench/search.py --sweep`` measured the choices on CPUs (docs/benchmarks.md).
Where the CPU has bf16 units (AVX512-BF16, AMX), bfloat16 autocast with
channels-last activations is the fastest at every batch and makes batching
pay (3.6 s per image at 8 x 4 against fp32's best, 6.0 s at 4 x 4); without
them fp32 in the default layout stays faster, and a batch of 4 jobs is the
best. Compiling for a CPU took over 10 minutes per batch shape for no gain
in a step, so nothing here turns it on.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import torch

from worker.engine.search import Precision

PrecisionChoice = Literal["auto", "fp32", "bf16"]

# The CPU flags under which bf16 convolutions and matmuls run natively.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is not there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_flags() & BF16_CPU_FLAGS)


def fastest_precision(choice: PrecisionChoice, device: torch.device) -> Precision:
    """``auto``: bf16 where the device has bf16 units, fp32 elsewhere; else the choice."""
    if choice != "auto":
        return choice
    return "bf16" if bf16_is_fast(device) else "fp32"


def fastest_layout(choice: bool | None, device: torch.device, precision: Precision) -> bool:
    """None: channels-last where it was measured faster (bf16 on a CPU with bf16 units);
    else the choice."""
    if choice is not None:
        return choice
    return device.type == "cpu" and precision == "bf16" and bf16_is_fast(device)


def best_batch_size(device: torch.device, precision: Precision) -> int:
    """Jobs per batched search (each adds its restarts, 4 by default, to the batch) with
    the lowest seconds per image measured for this kind of device and precision."""
    if device.type == "cuda":
        return 8  # not measured here: bench/device_search.py gives a GPU's own
    return 8 if precision == "bf16" else 4
