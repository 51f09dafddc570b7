"""Time the latent search: per step and per image, for a generator config, batch and device.

    python bench/search.py --config ffhq1024 --batch 1
    python bench/search.py --config slim128 --batch 8 --restarts 1
    python bench/search.py --weights weights/faces128.pt --batch 1 --restarts 4
    python bench/search.py --config ffhq1024 --batch 8 --device cuda --precision bf16

    python bench/search.py --sweep --out docs/bench/search_sweep.json   # the CPU table
    python bench/search.py --weights weights/generator.pt --batch 8 --restarts 4 \
        --precision bf16 --channels-last --race White             # steered by the bundled F

--sweep runs each cell of a table in its own process (so each peak RSS is its
own): the bundled generator at batch 1/2/4/8 x 4 restarts and the FFHQ-1024
config at 1 x 1, under fp32 and bf16, eager, channels-last and compiled, and
prints it as a Markdown table. For the whole GPU picture in one call (matmul
peak, FLOPs, larger batches) use bench/device_search.py.

Random weights unless --weights is given (timing does not depend on the
values). Prints one JSON object; nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from worker.engine.checkpoints import load_generator
from worker.engine.generator import Generator, GeneratorConfig
from worker.engine.mapping_fit import fit_mapping
from worker.engine.objectives import objective_loss
from worker.engine.search import SearchConfig, latent_search
from worker.pipeline import build_objective, freeze_extractor, load_extractor, objective_weights

CONFIGS = {
    "ffhq1024": lambda: GeneratorConfig.stylegan2(1024, channel_multiplier=2),
    "port128": lambda: GeneratorConfig.stylegan2(128, channel_multiplier=2),
    "slim128": lambda: GeneratorConfig.slim(128),
    "bundled128": lambda: GeneratorConfig.slim(128, channel_max=128, channel_base=2048),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="slim128")
    p.add_argument("--weights", help="a checkpoint instead of a named random config")
    p.add_argument("--resolution", type=int, help="custom slim config: output side")
    p.add_argument("--channel-max", type=int, default=256)
    p.add_argument("--channel-base", type=int, default=4096)
    p.add_argument("--style-dim", type=int, default=256)
    p.add_argument("--n-mlp", type=int, default=4)
    p.add_argument("--batch", type=int, default=1, help="thumbnails per search")
    p.add_argument("--restarts", type=int, default=1, help="restarts per thumbnail")
    p.add_argument("--thumb", type=int, default=16, help="thumbnail side")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--search-steps", type=int, default=100, help="steps of a full search")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels-last", action="store_true", help="NHWC activations")
    p.add_argument("--compile", default="off", help="torch.compile mode (off, default, ...)")
    p.add_argument(
        "--race",
        help="steer every thumbnail towards this race with the bundled F (the --race search)",
    )
    p.add_argument("--sweep", action="store_true", help="run the whole table (see above)")
    p.add_argument(
        "--sweep-settings",
        nargs="+",
        default=list(SETTINGS),
        choices=list(SETTINGS),
        help="the table's columns",
    )
    p.add_argument("--sweep-batches", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument(
        "--sweep-compile-batches",
        nargs="*",
        type=int,
        default=[1, 8],
        help="the batches the compiled columns run at (each compiles from a cold cache)",
    )
    p.add_argument("--cell-timeout", type=float, default=900, help="seconds per cell")
    p.add_argument("--sweep-1024", nargs="*", default=["fp32", "bf16", "bf16+compile"])
    p.add_argument("--out", help="--sweep: also write the table's JSON here")
    return p.parse_args()


# Sweep columns: name -> (precision, compile, channels_last).
SETTINGS = {
    "fp32": ("fp32", "off", False),
    "fp32+channels_last": ("fp32", "off", True),
    "fp32+compile": ("fp32", "default", False),
    "bf16": ("bf16", "off", False),
    "bf16+channels_last": ("bf16", "off", True),
    "bf16+compile": ("bf16", "default", False),
}
BUNDLED = Path(__file__).resolve().parents[1] / "weights" / "generator.pt"


def _cell(args: argparse.Namespace, setting: str, model: list[str], batch: int, restarts: int):
    precision, compile_mode, channels_last = SETTINGS[setting]
    cmd = [sys.executable, __file__, *model, "--batch", str(batch), "--restarts", str(restarts)]
    cmd += ["--precision", precision, "--compile", compile_mode, "--threads", str(args.threads)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--channels-last"] if channels_last else []
    print(f"{setting:>20} {model[-1]:>10} {batch} x {restarts} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as cache:
        # A cold inductor cache per cell: the warm-up is what a fresh install pays
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=args.cell_timeout
            )
        except subprocess.TimeoutExpired:
            return {"setting": setting, "batch": batch, "error": f"over {args.cell_timeout} s"}
    if done.returncode != 0:
        return {"setting": setting, "batch": batch, "error": done.stderr.strip()[-500:]}
    return {"setting": setting, **json.loads(done.stdout)}


def sweep(args: argparse.Namespace) -> None:
    cells = [
        _cell(args, setting, ["--weights", str(BUNDLED)], batch, 4)
        for batch in args.sweep_batches
        for setting in args.sweep_settings
        if "compile" not in setting or batch in args.sweep_compile_batches
    ]
    cells += [_cell(args, setting, ["--config", "ffhq1024"], 1, 1) for setting in args.sweep_1024]
    lines = [
        "| generator | setting | batch x restarts | s/step | s/image (100 steps) | "
        "warm-up s | peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        if "error" in c:
            lines.append(f"| | {c['setting']} | {c['batch']} | error | | | |")
            continue
        name = "bundled" if c["generator"] == str(BUNDLED) else c["generator"]
        lines.append(
            f"| {name} | {c['setting']} | {c['batch']} x {c['restarts']} | "
            f"{c['step_seconds_median']} | {c['seconds_per_image']} | "
            f"{c['warmup_seconds']} | {c['peak_rss_mb']} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        load = os.getloadavg()
        result = {
            "cpu": _cpu_model(),
            "cpu_flags": _bf16_flags(),
            "torch": torch.__version__,
            "load_before_and_after": [round(x, 2) for x in load],
            "cells": cells,
            "table": table,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bf16_flags() -> list[str]:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")})


def main() -> None:
    args = parse()
    if args.sweep:
        sweep(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.weights:
        loaded = load_generator(args.weights, device)
        g, fit, name = loaded.generator, loaded.mapping_fit, args.weights
    else:
        if args.resolution:
            config = GeneratorConfig.slim(
                args.resolution, args.channel_max, args.channel_base, args.style_dim, args.n_mlp
            )
            name = f"slim{args.resolution}-c{args.channel_max}-b{args.channel_base}"
        else:
            config, name = CONFIGS[args.config](), args.config
        torch.manual_seed(0)
        g = Generator(config).to(device).eval().requires_grad_(False)
        fit = None
    if fit is None:
        fit = fit_mapping(g, samples=10_000, batch=5_000)  # values do not matter for timing
    thumbs = torch.rand(args.batch, 3, args.thumb, args.thumb, device=device)
    total_steps = args.warmup + args.steps
    config = SearchConfig(
        steps=total_steps,
        restarts=args.restarts,
        seed=0,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    extra_loss = None
    if args.race:
        # The objective exactly as `likeness upscale --race` builds it.
        extractor, threshold, _ = load_extractor(None, device)
        freeze_extractor(extractor, channels_last=args.channels_last)
        objective = build_objective(
            extractor,
            objective_weights(threshold_deg=threshold),
            [args.race] * args.batch,
            [{}] * args.batch,
            [None] * args.batch,
        )
        extra_loss = objective_loss(extractor, objective.targets, objective.weights, args.restarts)
    search = latent_search(g, fit, thumbs, config, extra_loss)
    times, warmup = [], 0.0
    for i in range(total_steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        next(search)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        else:  # compiling happens here
            warmup += time.perf_counter() - t0
    step = statistics.median(times)
    elements = args.batch * args.restarts
    print(
        json.dumps(
            {
                "generator": name,
                "config": g.config.model_dump(),
                "parameters": sum(p.numel() for p in g.parameters()),
                "device": str(device),
                "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "restarts": args.restarts,
                "precision": args.precision,
                "channels_last": args.channels_last,
                "compile": args.compile,
                "race": args.race,
                "elements_per_step": elements,
                "thumb": args.thumb,
                "timed_steps": args.steps,
                "step_seconds_median": round(step, 4),
                "step_seconds_min": round(min(times), 4),
                "step_seconds_all": [round(t, 4) for t in times],
                "warmup_steps": args.warmup,
                "warmup_seconds": round(warmup, 2),
                # ru_maxrss is in KiB on Linux: this process's peak, model and all
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "search_steps": args.search_steps,
                "search_seconds": round(step * args.search_steps, 2),
                "seconds_per_image": round(step * args.search_steps / args.batch, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
