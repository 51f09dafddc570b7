"""bench/device_search.py, the one-call GPU benchmark: its --quick run on the CPU writes
the JSON a device run writes, and its FLOPs convention matches torch's own count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.device_search import CONFIGS, counted_step_flops, step_flops_per_image
from worker.engine.generator import Generator

ROOT = Path(__file__).resolve().parents[2]
CASE_KEYS = {
    "name",
    "config",
    "batch",
    "restarts",
    "precision",
    "channels_last",
    "compile",
    "cudnn_benchmark",
    "status",
    "step_seconds",
    "host_step_seconds",
    "image_seconds_100_steps",
    "gflop_per_step",
    "tflops",
    "fraction_of_bf16_peak",
    "finite",
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_analytic_flops_are_torchs_count(name: str) -> None:
    # On the meta device: shapes only, so even 1024 px costs nothing.
    g = Generator(CONFIGS[name]()).to("meta").requires_grad_(False)
    assert step_flops_per_image(g.config) == counted_step_flops(g, torch.device("meta"))


@pytest.mark.slow
def test_quick_run_on_cpu_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "device_search.json"
    done = subprocess.run(
        [sys.executable, "bench/device_search.py", "--quick", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) >= {"environment", "matmul", "flops", "sync_check", "cases", "summary"}
    assert report["environment"]["device"] == "cpu"
    assert {"bf16_tflops", "fp32_tflops", "tf32_tflops"} <= set(report["matmul"])
    flops = report["flops"]["tiny32"]
    assert flops["step_per_image"] == flops["counted_step_per_image"] > 0
    assert report["sync_check"]["status"] == "skipped"  # CUDA only
    cases = report["cases"]
    assert [c["precision"] for c in cases] == ["fp32", "bf16", "bf16", "bf16"]
    assert cases[-1]["compile"] == "default"  # the child-process path ran too
    for case in cases:
        assert case["status"] == "ok", case
        assert set(case) >= CASE_KEYS, CASE_KEYS - set(case)
        assert case["finite"] and case["step_seconds"] > 0
        assert case["image_seconds_100_steps"] == pytest.approx(
            case["step_seconds"] * 100 / case["batch"], rel=1e-3
        )
    assert set(report["summary"]) >= {"meets_image_goal", "meets_throughput_goal"}
    assert "tiny32 b2 bf16 nhwc" in done.stdout  # the closing table
