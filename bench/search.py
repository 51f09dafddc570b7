"""Time the latent search: per step and per image, for a generator config, batch and device.

    python bench/search.py --config ffhq1024 --batch 1
    python bench/search.py --config slim128 --batch 8 --restarts 1
    python bench/search.py --weights weights/faces128.pt --batch 1 --restarts 4
    python bench/search.py --config ffhq1024 --batch 8 --device cuda --precision bf16

For the whole GPU picture in one call (both configs, batches, precisions, layouts,
torch.compile, matmul peak, FLOPs) use bench/device_search.py.

Random weights unless --weights is given (timing does not depend on the
values). Prints one JSON object; nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from worker.engine.checkpoints import load_generator
from worker.engine.generator import Generator, GeneratorConfig
from worker.engine.mapping_fit import fit_mapping
from worker.engine.search import SearchConfig, latent_search

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
    p.add_argument("--channels-last", action="store_true", help="CUDA only")
    p.add_argument("--compile", default="off", help="torch.compile mode, CUDA only")
    return p.parse_args()


def main() -> None:
    args = parse()
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
    search = latent_search(g, fit, thumbs, config)
    times = []
    for i in range(total_steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        next(search)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
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
                "elements_per_step": elements,
                "thumb": args.thumb,
                "timed_steps": args.steps,
                "step_seconds_median": round(step, 4),
                "step_seconds_min": round(min(times), 4),
                "step_seconds_all": [round(t, 4) for t in times],
                "search_steps": args.search_steps,
                "search_seconds": round(step * args.search_steps, 2),
                "seconds_per_image": round(step * args.search_steps / args.batch, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
