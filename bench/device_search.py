"""The latent search's GPU performance in one call: run it once, read the JSON.

    python bench/device_search.py --out $OUT/device_search.json        # on the GPU machine
    python bench/device_search.py --quick --device cpu --out /tmp/d.json  # a tiny CPU check

It measures, and writes as one JSON object (rewritten after every case, so a run
that is killed keeps what it had measured):

- the device and the torch / CUDA / cuDNN versions;
- the card's large-matmul throughput (8192³ products timed with CUDA events after
  warm-up) in bf16, fp32 and TF32: the yardstick for the search's throughput;
- per case (generator config × thumbnails per search × precision, then
  channels-last, cuDNN autotuning and torch.compile variants): seconds per step
  (CUDA events over ``--steps`` steps after ``--warmup`` steps), seconds per image
  for a 100-step search (step × 100 / thumbnails, one restart each), the
  synthesis FLOPs per step, the achieved TFLOP/s and its fraction of the
  measured bf16 matmul rate, and the peak GPU memory. A case that runs out of
  memory is recorded as ``oom``; torch.compile cases run in child processes with
  a time limit, so a slow compile costs at most that limit;
- whether the step loop ever makes the host wait for the GPU
  (``torch.cuda.set_sync_debug_mode("error")`` over a few steps).

FLOPs convention (``synthesis_flops``): multiply-add = 2 FLOPs, counted per image
from the config: the modulated 3×3 convolutions (2·Cin·Cout·9·H·W; the
up-sampling ones are stride-2 transposed convolutions, counted at their input
resolution, which is the work they do), the 1×1 ToRGB convolutions, the style
affine layers (2·style_dim·Cin), the demodulation (2·Cin·Cout) and the
depthwise 4×4 blur filters (2·C·16·H·W). The mapping network does not run in the
search. A step is one forward and one backward pass; the generator's weights are
frozen, so the backward computes activation gradients only, the same FLOPs as the
forward: a step is 2 × forward (not training's 3 ×). Element-wise work
(activations, noise, losses, Adam) is not counted. torch's own FlopCounterMode
count of one step is recorded beside it as a check. "fp32" cases run as the
worker does by default, with cuDNN free to use TF32 for the convolutions
(``cudnn_allow_tf32`` in the JSON).

Random weights (timing does not depend on the values). Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Run from a bare checkout (no `pip install -e .` on the GPU machine): the repo on the path.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from worker.engine.generator import Generator, GeneratorConfig  # noqa: E402
from worker.engine.mapping_fit import MappingFit, fit_mapping  # noqa: E402
from worker.engine.search import SearchConfig, latent_search  # noqa: E402

CONFIGS: dict[str, Callable[[], GeneratorConfig]] = {
    # The official FFHQ model's shapes (30 M parameters).
    "ffhq1024": lambda: GeneratorConfig.stylegan2(1024, channel_multiplier=2),
    # The bundled generator's shapes: worker/training/generator/config.py TrainConfig's defaults.
    "bundled128": lambda: GeneratorConfig.slim(
        128, channel_max=128, channel_base=2048, style_dim=256, n_mlp=4
    ),
    # The tests' tiny generator, for --quick.
    "tiny32": lambda: GeneratorConfig.slim(
        32, channel_max=32, channel_base=512, style_dim=32, n_mlp=2
    ),
}
THUMB = {"ffhq1024": 16, "bundled128": 16, "tiny32": 8}  # thumbnail side per config
SEARCH_STEPS = 100  # a full search, for the seconds per image
GOAL_IMAGE_SECONDS = 2.0  # 1024 px, 100 steps, batched, on an H100
GOAL_PEAK_FRACTION = 0.5  # of the bf16 matmul rate measured in the same run


@dataclass(frozen=True)
class Case:
    config: str
    batch: int  # thumbnails per search, one restart each
    precision: str = "bf16"
    channels_last: bool = False
    compile: str = "off"
    cudnn_benchmark: bool = False

    @property
    def name(self) -> str:
        extras = [
            ("nhwc", self.channels_last),
            (f"compile={self.compile}", self.compile != "off"),
            ("cudnn-bench", self.cudnn_benchmark),
        ]
        return " ".join(
            [f"{self.config} b{self.batch} {self.precision}", *(text for text, on in extras if on)]
        )


def plan(quick: bool) -> tuple[list[Case], list[Case]]:
    """(cases run in this process, torch.compile cases run in children), most wanted first."""
    if quick:  # every code path once, not a measurement
        eager = [
            Case("tiny32", 1, "fp32"),
            Case("tiny32", 2, "bf16"),
            Case("tiny32", 2, "bf16", channels_last=True),
        ]
        return eager, [Case("tiny32", 2, "bf16", compile="default")]
    eager = [
        Case(c, b, p)
        for c in ("ffhq1024", "bundled128")
        for p in ("bf16", "fp32")
        for b in (1, 8, 32)
    ]
    eager += [
        Case("ffhq1024", 8, channels_last=True),
        Case("ffhq1024", 32, channels_last=True),
        Case("ffhq1024", 32, cudnn_benchmark=True),
        Case("ffhq1024", 32, channels_last=True, cudnn_benchmark=True),
        Case("ffhq1024", 8, "fp32", channels_last=True),
        Case("bundled128", 32, channels_last=True),
    ]
    compiled = [
        Case("ffhq1024", 8, compile="default"),
        Case("bundled128", 8, compile="reduce-overhead"),
        Case("bundled128", 32, compile="default"),
        Case("ffhq1024", 32, channels_last=True, compile="default"),
    ]
    return eager, compiled


# ---------------------------------------------------------------- FLOPs


def synthesis_flops(config: GeneratorConfig) -> dict[str, int]:
    """Forward FLOPs of one image's synthesis, by kind (see the module docstring)."""
    sd, taps = config.style_dim, len(config.blur_kernel) ** 2

    def modconv(cin: int, cout: int, k: int, pixels: int, demodulate: bool = True) -> int:
        style, demod = 2 * sd * cin, 2 * cin * cout if demodulate else 0
        return style + demod + 2 * cin * cout * k * k * pixels

    c = config.width(4)
    dense = modconv(c, c, 3, 16) + modconv(c, 3, 1, 16, demodulate=False)
    blur = 0
    for log_res in range(3, config.log_size + 1):
        res, cout = 2**log_res, config.width(2**log_res)
        dense += modconv(c, cout, 3, (res // 2) ** 2)  # transposed, stride 2: input pixels
        dense += modconv(cout, cout, 3, res * res)
        dense += modconv(cout, 3, 1, res * res, demodulate=False)  # ToRGB
        blur += 2 * cout * taps * res * res + 2 * 3 * taps * res * res  # after the up-conv; skip
        c = cout
    return {"dense": dense, "blur": blur, "total": dense + blur}


def step_flops_per_image(config: GeneratorConfig) -> int:
    return 2 * synthesis_flops(config)["total"]  # frozen weights: backward = forward


def counted_step_flops(g: Generator, device: torch.device) -> int:
    """torch's FlopCounterMode over one image's synthesis forward and backward."""
    cfg = g.config
    w = torch.randn(1, cfg.n_latent, cfg.style_dim, device=device, requires_grad=True)
    noise = [torch.randn(1, 1, h, w_, device=device) for h, w_ in g.noise_shapes()]
    with FlopCounterMode(display=False) as counter:
        g.synthesis(w, noise).sum().backward()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Device time (CUDA events) and host time of a stretch of queued work."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start_ev = torch.cuda.Event(enable_timing=True)
            self.end_ev = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self.start_ev.record()
        self.t0 = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        """(device seconds, seconds the host took to queue the work)."""
        host = time.perf_counter() - self.t0
        if not self.cuda:
            return host, host
        self.end_ev.record()
        self.end_ev.synchronize()
        return self.start_ev.elapsed_time(self.end_ev) / 1000, host


@contextlib.contextmanager
def matmul_precision(value: str) -> Iterator[None]:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def matmul_tflops(
    device: torch.device, dtype: torch.dtype, n: int, reps: int, precision: str = "highest"
) -> float:
    """TFLOP/s of n×n×n products (``precision`` "high" lets fp32 use TF32)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    timer = Timer(device)
    with matmul_precision(precision):
        for _ in range(3):
            torch.matmul(a, b, out=out)
        sync(device)
        timer.start()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        seconds, _ = timer.stop()
    return 2 * n**3 * reps / seconds / 1e12


def matmul_peaks(device: torch.device, quick: bool) -> dict[str, Any]:
    n, reps = (256, 2) if quick else (8192, 20)
    return {
        "n": n,
        "reps": reps,
        "bf16_tflops": round(matmul_tflops(device, torch.bfloat16, n, reps), 3),
        "fp32_tflops": round(matmul_tflops(device, torch.float32, n, max(2, reps // 4)), 3),
        "tf32_tflops": round(matmul_tflops(device, torch.float32, n, reps, "high"), 3),
    }


# ---------------------------------------------------------------- cases


@dataclass
class Model:
    generator: Generator
    fit: MappingFit


def build(name: str, device: torch.device, quick: bool) -> Model:
    torch.manual_seed(0)
    g = Generator(CONFIGS[name]()).to(device).eval().requires_grad_(False)
    samples = 2_000 if quick else 10_000  # the fit's values do not matter for timing
    return Model(g, fit_mapping(g, samples=samples, batch=samples))


def search_config(case: Case, steps: int) -> SearchConfig:
    return SearchConfig(
        steps=steps,
        restarts=1,
        seed=0,
        precision=case.precision,
        channels_last=case.channels_last,
        compile=case.compile,
    )


def time_case(
    model: Model, case: Case, device: torch.device, warmup: int, steps: int
) -> dict[str, Any]:
    """Seconds per step of one search, timed on the device after warm-up steps."""
    thumbs = torch.rand(case.batch, 3, THUMB[case.config], THUMB[case.config], device=device)
    search = latent_search(model.generator, model.fit, thumbs, search_config(case, warmup + steps))
    try:
        started = time.perf_counter()
        for _ in range(warmup):
            next(search)
        sync(device)
        warmup_seconds = time.perf_counter() - started
        timer = Timer(device)
        timer.start()
        for _ in range(steps):
            last = next(search)
        seconds, host = timer.stop()
        finite = bool(torch.isfinite(last.best_mse).all())  # after the timing: a sync
    finally:
        search.close()
    step = seconds / steps
    flops = step_flops_per_image(model.generator.config) * case.batch
    return {
        "status": "ok",
        "warmup_steps": warmup,
        "timed_steps": steps,
        "warmup_seconds": round(warmup_seconds, 3),
        "step_seconds": round(step, 6),
        # The host's time to queue the steps. With no sync in the loop it runs at most a
        # launch queue ahead, so this is near step_seconds unless the host is the slower.
        "host_step_seconds": round(host / steps, 6),
        "image_seconds_100_steps": round(step * SEARCH_STEPS / case.batch, 4),
        "gflop_per_step": round(flops / 1e9, 2),
        "tflops": round(flops / step / 1e12, 4),
        "finite": finite,
    }


def run_case(
    model: Model, case: Case, device: torch.device, warmup: int, steps: int
) -> dict[str, Any]:
    """One case, with its memory peak; running out of memory is a result, not a crash."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = case.cudnn_benchmark
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        out = time_case(model, case, device, warmup, steps)
    except Exception as exc:  # one broken case must not lose the others' numbers
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)
        out = {"status": "oom" if oom else "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}
    finally:
        torch.backends.cudnn.benchmark = before
    gc.collect()
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.empty_cache()
    return out


def run_child(case: Case, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """A torch.compile case in a fresh process: its compile time is bounded, and its
    compiled code and memory go away with it."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--case",
        json.dumps(asdict(case)),
        "--device",
        args.device,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
    ]
    if args.quick:
        cmd.append("--quick")
    # Its own process group, so a timeout also ends inductor's compile workers.
    child = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return {"status": "timeout", "timeout_seconds": round(timeout)}
    lines = stdout.strip().splitlines()
    if child.returncode != 0 or not lines:
        return {"status": "error", "error": f"exit {child.returncode}: {stderr[-2000:]}"}
    return json.loads(lines[-1])


def child_main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    case = Case(**json.loads(args.case))
    model = build(case.config, device, args.quick)
    print(json.dumps(run_case(model, case, device, args.warmup, args.steps)))


def sync_check(model: Model, name: str, device: torch.device) -> dict[str, Any]:
    """Steps 2.. of a search under set_sync_debug_mode("error"): any host sync raises."""
    if device.type != "cuda":
        return {"status": "skipped", "why": "CUDA only"}
    thumbs = torch.rand(8, 3, THUMB[name], THUMB[name], device=device)
    results = {}
    for precision in ("fp32", "bf16"):
        config = SearchConfig(steps=4, restarts=1, seed=0, precision=precision)
        search = latent_search(model.generator, model.fit, thumbs, config)
        next(search)  # the setup copies the start to the device: allowed
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(config.steps - 1):
                next(search)
            results[precision] = "no sync"
        except Exception as exc:  # the sync's RuntimeError, or anything else: report it
            results[precision] = f"synced: {type(exc).__name__}: {exc}"[:500]
        finally:
            torch.cuda.set_sync_debug_mode(0)
            search.close()
    return {"status": "ok", "sync_free": all(v == "no sync" for v in results.values()), **results}


# ---------------------------------------------------------------- report


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        env["name"] = platform.processor() or platform.machine()
    return env


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The two goals (GOAL_IMAGE_SECONDS, GOAL_PEAK_FRACTION), read off the 1024-px
    cases that ran."""
    ok = [c for c in report["cases"] if c.get("status") == "ok" and c["config"] == "ffhq1024"]
    batched = [c for c in ok if c["batch"] > 1]
    best_image = min(batched, key=lambda c: c["image_seconds_100_steps"], default=None)
    best_rate = max(ok, key=lambda c: c["fraction_of_bf16_peak"], default=None)
    return {
        "goal_image_seconds": GOAL_IMAGE_SECONDS,
        "best_1024_image_seconds": best_image and best_image["image_seconds_100_steps"],
        "best_1024_image_case": best_image and best_image["name"],
        "meets_image_goal": bool(best_image)
        and (best_image["image_seconds_100_steps"] <= GOAL_IMAGE_SECONDS),
        "goal_fraction_of_bf16_peak": GOAL_PEAK_FRACTION,
        "best_1024_fraction_of_bf16_peak": best_rate and best_rate["fraction_of_bf16_peak"],
        "best_1024_rate_case": best_rate and best_rate["name"],
        "meets_throughput_goal": bool(best_rate)
        and (best_rate["fraction_of_bf16_peak"] >= GOAL_PEAK_FRACTION),
    }


def markdown(report: dict[str, Any]) -> str:
    """The cases as rows of the GPU table in docs/benchmarks.md."""
    rows = [
        "| case | s / step | s / image (100 steps) | TFLOP/s | of bf16 matmul peak "
        "| peak GiB | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in report["cases"]:
        if c.get("status") == "ok":
            rows.append(
                f"| {c['name']} | {c['step_seconds']:.4f} | "
                f"{c['image_seconds_100_steps']:.3f} | {c['tflops']:.1f} | "
                f"{100 * (c['fraction_of_bf16_peak'] or 0):.1f}% | "
                f"{c.get('peak_memory_gib', '')} | |"
            )
        else:
            rows.append(f"| {c['name']} | | | | | | {c.get('status')} |")
    return "\n".join(rows)


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)  # a reader never sees half a file


def print_table(report: dict[str, Any]) -> None:
    """What matters, short enough to survive a truncated console."""
    mm = report["matmul"]
    print(
        f"\n{report['environment'].get('name')}: matmul bf16 {mm['bf16_tflops']} / fp32 "
        f"{mm['fp32_tflops']} / tf32 {mm['tf32_tflops']} TFLOP/s; sync check "
        f"{report['sync_check']}"
    )
    print(
        f"{'case':52s} {'status':8s} {'s/step':>9s} {'s/img@100':>10s} {'TFLOP/s':>8s} "
        f"{'%bf16':>6s} {'GiB':>6s}"
    )
    for c in report["cases"]:
        if c.get("status") == "ok":
            print(
                f"{c['name']:52s} ok       {c['step_seconds']:9.4f} "
                f"{c['image_seconds_100_steps']:10.3f} {c['tflops']:8.2f} "
                f"{100 * c['fraction_of_bf16_peak']:6.1f} {c.get('peak_memory_gib', 0):6.1f}"
            )
        else:
            print(f"{c['name']:52s} {c.get('status', '?'):8s} {c.get('error', '')[:60]}")
    print(json.dumps(report["summary"]))


# ---------------------------------------------------------------- main


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    default_out = (
        Path(os.environ["OUT"]) / "device_search.json"
        if os.environ.get("OUT")
        else Path("device_search.json")
    )
    p.add_argument(
        "--out",
        type=Path,
        default=default_out,
        help="JSON file (default: $OUT/device_search.json, else ./device_search.json)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny generator, 1 + 2 steps, small matmul: checks the script, on CPU too",
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; quick 2)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=400.0,
        help="start no case after this many seconds; compile children get what is left",
    )
    p.add_argument(
        "--compile-timeout-s",
        type=float,
        default=150.0,
        help="most seconds one torch.compile case may take, compiling included",
    )
    p.add_argument(
        "--only",
        metavar="REGEX",
        help="run only the cases whose name matches, e.g. 'ffhq1024 b(8|32) bf16'",
    )
    p.add_argument(
        "--markdown",
        type=Path,
        metavar="JSON",
        help="print a written report as docs/benchmarks.md table rows, then exit",
    )
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = p.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 20)
    return args


def main() -> None:
    args = parse()
    if args.case:
        child_main(args)
        return
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    started = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    device = torch.device(args.device)
    eager, compiled = plan(args.quick)
    if args.only:
        eager = [c for c in eager if re.search(args.only, c.name)]
        compiled = [c for c in compiled if re.search(args.only, c.name)]
    report: dict[str, Any] = {
        "schema": 1,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "environment": environment(device),
        "matmul": matmul_peaks(device, args.quick),
        "flops": {},
        "sync_check": None,
        "cases": [],
    }
    peak = report["matmul"]["bf16_tflops"]
    models: dict[str, Model] = {}

    def record(case: Case, out: dict[str, Any]) -> None:
        if out.get("status") == "ok":
            out["fraction_of_bf16_peak"] = round(out["tflops"] / peak, 4) if peak else None
        report["cases"].append({"name": case.name, **asdict(case), "restarts": 1, **out})
        report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
        write(report, args.out)
        print(f"{case.name}: {json.dumps(out)}", flush=True)

    for case in eager:
        if left() <= 0:
            record(case, {"status": "skipped", "error": "time budget spent"})
            continue
        if case.config not in models:
            models[case.config] = model = build(case.config, device, args.quick)
            cfg = model.generator.config
            report["flops"][case.config] = {
                "forward_per_image": synthesis_flops(cfg),
                "step_per_image": step_flops_per_image(cfg),
                "counted_step_per_image": counted_step_flops(model.generator, device),
            }
        record(case, run_case(models[case.config], case, device, args.warmup, args.steps))
    if models:
        name = "bundled128" if "bundled128" in models else next(iter(models))
        report["sync_check"] = {"config": name, **sync_check(models[name], name, device)}
    models.clear()  # the children need the memory
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    timed_out: set[str] = set()  # a config whose compile ran out of time: no second try
    for case in compiled:
        budget = min(args.compile_timeout_s, left())
        if budget < 30 or case.config in timed_out:
            why = "time budget spent" if budget < 30 else "an earlier compile of it timed out"
            record(case, {"status": "skipped", "error": why})
            continue
        out = run_child(case, args, budget)
        if out["status"] == "timeout":
            timed_out.add(case.config)
        record(case, out)
    report["summary"] = summarize(report)
    report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    write(report, args.out)
    print_table(report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
