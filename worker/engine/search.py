"""PULSE latent search, batched: B thumbnails × K restarts in one tensor batch.

``latent_search`` is a generator: it yields a ``SearchStep`` after every
optimiser step (the caller shows progress, or stops by closing it) and
returns a ``SearchResult``. Every loss is per element; nothing is summed
across elements except for the backward pass, where elements are independent
(Adam is element-wise), so a batched search equals the searches run alone.

Each restart keeps its best step: the lowest total loss among the steps that
meet the acceptance rules (downscale MSE within eps, every constraint within
its limit), or, while none has, the lowest total loss overall. PULSE likewise
accepts a restart that reached eps at any step.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from collections.abc import Generator as Gen
from dataclasses import dataclass, field
from typing import Any, Literal
from weakref import WeakKeyDictionary

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from likeness.request import choose_seed
from worker.engine.downscale import downscale, downscale_factor
from worker.engine.generator import Generator
from worker.engine.mapping_fit import MappingFit

# PULSE's code scales GEOCROSS by 512 / 8 whatever the style width.
GEOCROSS_SCALE = 512 / 8

Schedule = Literal["linear1cycledrop", "linear1cycle", "fixed"]
Precision = Literal["fp32", "bf16"]
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"]


@dataclass
class ExtraTerms:
    """What an extra objective adds at one step, per element (N,).

    ``losses`` are weighted and summed into the total. ``constraints`` are
    raw values that must end at most ``limits[name]`` for a candidate to be
    accepted (PAPER.md §2: final L_r, L_a ≤ 0.1), alongside the eps rule.
    """

    losses: dict[str, Tensor]
    constraints: dict[str, Tensor] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)


# Extra objectives (identity, race, attributes): images (N, 3, R, R) in [0, 1]
# → named, already weighted per-element losses (N,), or ExtraTerms with constraints.
ExtraLoss = Callable[[Tensor], dict[str, Tensor] | ExtraTerms]


class SearchConfig(BaseModel):
    """PULSE's defaults (PAPER.md §1)."""

    steps: int = Field(100, ge=1, le=10_000, description="optimiser steps")
    restarts: int = Field(4, ge=1, le=64, description="random restarts per thumbnail")
    lr: float = Field(0.4, gt=0, description="Adam's peak learning rate")
    schedule: Schedule = Field("linear1cycledrop", description="learning-rate schedule")
    eps: float = Field(2e-3, gt=0, description="accept a face if its downscale MSE <= eps")
    fit_eps: float | None = Field(
        None,
        gt=0,
        description="the downscale MSE the search pulls down to (at most eps; None: eps): "
        "below eps the search fits the thumbnail tighter, while a face still counts as "
        "matching at eps",
    )
    ds_weight: float = Field(100.0, ge=0, description="weight of the downscale loss")
    geocross_weight: float = Field(0.05, ge=0, description="weight of GEOCROSS")
    trainable_noise: int = Field(5, ge=0, description="coarsest noise maps optimised")
    seed: int | None = Field(None, description="seed of the initial latents and noise")
    # How the generator runs; none of these changes what is optimised.
    precision: Precision = Field(
        "fp32",
        description="fp32, or bf16: the generator runs under bfloat16 autocast, which "
        "tensor-core GPUs run several times faster; the images are cast back to float32 "
        "before every loss, the extra losses' networks (F) run in float32, and the "
        "latents, noise, Adam state, sphere "
        "projection and best-so-far tracking stay float32. Results differ from fp32 by "
        "rounding. CPUs with bf16 units (AVX512-BF16, AMX) gain too; others lose",
    )
    channels_last: bool = Field(
        False,
        description="channels-last (NHWC) activations in the generator, the layout "
        "tensor-core convolutions prefer",
    )
    compile: CompileMode = Field(
        "off",
        description="torch.compile the synthesis with this mode, once per generator (and "
        "again for a new batch shape), which costs a warm-up of seconds to minutes; "
        "reduce-overhead adds CUDA graphs on a GPU and is the default mode on a CPU",
    )


@dataclass
class SearchStep:
    """Progress after one step; tensors stay on the device until read."""

    step: int  # 1-based, steps done
    steps: int
    lr: float
    best_mse: Tensor  # (B,) best downscale MSE so far over the restarts


@dataclass
class SearchResult:
    images: Tensor  # (B, 3, R, R) in [0, 1]: the chosen candidate per thumbnail
    accepted: Tensor  # (B,) bool
    mse: Tensor  # (B,) downscale MSE of the chosen candidate
    loss: Tensor  # (B,) total loss of the chosen candidate
    restart: Tensor  # (B,) index of the chosen restart
    candidates: Tensor  # (B, K, 3, R, R)
    candidate_mse: Tensor  # (B, K)
    candidate_loss: Tensor  # (B, K)
    candidate_accepted: Tensor  # (B, K)
    terms: dict[str, Tensor] = field(default_factory=dict)  # name → (B, K) at the best step
    # name → (B, K) raw constrained values at the best step, and their limits
    constraints: dict[str, Tensor] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)
    w_plus: Tensor | None = None  # (B, K, n_latent, style_dim)
    seed: int = 0
    steps: int = 0
    seeds: list[int] = field(default_factory=list)  # (B,) the seed each thumbnail's restarts used


class SearchStopped(Exception):
    """Raised by ``run_search`` when the progress callback asks to stop."""


def lr_factor(step: int, steps: int, schedule: Schedule) -> float:
    """PULSE's schedules; ``linear1cycledrop`` ramps up and down over 90% of the
    steps, then decays linearly from 1/10 to 1/1000."""
    if schedule == "fixed":
        return 1.0
    if schedule == "linear1cycle":
        return (9 * (1 - abs(step / steps - 0.5) * 2) + 1) / 10
    cycle = 0.9 * steps
    if step < cycle:
        return (9 * (1 - abs(step / cycle - 0.5) * 2) + 1) / 10
    return 0.1 + (step - cycle) / (0.1 * steps) * (1 / 1000 - 0.1)


def pull_eps(config: SearchConfig) -> float:
    """The MSE below which the downscale loss stops pulling: fit_eps, never above eps."""
    return config.eps if config.fit_eps is None else min(config.fit_eps, config.eps)


def config_key(config: SearchConfig) -> dict[str, Any]:
    """The settings as stored in cache and resume keys: fit_eps left out while unset, so
    the keys written before it existed still match the searches they describe."""
    key = config.model_dump(mode="json")
    if key["fit_eps"] is None:
        del key["fit_eps"]
    return key


def geocross(w_plus: Tensor) -> Tensor:
    """Mean squared geodesic angle between the style rows, per element: (N, L, D) → (N,)."""
    x, y = w_plus.unsqueeze(1), w_plus.unsqueeze(2)
    # The 1e-9 keeps the gradient finite on the diagonal, where the distance is 0.
    a = ((x - y).pow(2).sum(-1) + 1e-9).sqrt()
    b = ((x + y).pow(2).sum(-1) + 1e-9).sqrt()
    angle = 2 * torch.atan2(a, b)
    return angle.pow(2).mean((1, 2)) * GEOCROSS_SCALE


def downscale_mse(images: Tensor, thumbnails: Tensor) -> Tensor:
    """Per-element MSE between D(images) and the thumbnails, both in [0, 1]: (N,)."""
    return (downscale(images, thumbnails.shape[-2:]) - thumbnails).pow(2).mean((1, 2, 3))


@torch.no_grad()
def project_to_sphere(x: Tensor, radius: Tensor) -> None:
    """Rescale every row (last dim for latents, last two for noise) to ``radius``, in place."""
    dims = tuple(range(2, x.ndim))
    x.mul_(radius / (x.pow(2).sum(dims, keepdim=True) + 1e-9).sqrt())


def _radius(x: Tensor) -> Tensor:
    return (x.pow(2).sum(tuple(range(2, x.ndim)), keepdim=True) + 1e-9).sqrt()


def _draw(generator: Generator, n: int, seed: int) -> tuple[Tensor, list[Tensor]]:
    """n initial latents and noise maps from one seed, on the CPU, in a fixed draw order."""
    rng = torch.Generator().manual_seed(seed)
    cfg = generator.config
    v = torch.randn(n, cfg.n_latent, cfg.style_dim, generator=rng)
    shapes = generator.noise_shapes()
    noise = [
        # the finest map adds only grain: zeroed, as in PULSE (and it draws nothing)
        torch.zeros(n, 1, h, w) if i == len(shapes) - 1 else torch.randn(n, 1, h, w, generator=rng)
        for i, (h, w) in enumerate(shapes)
    ]
    return v, noise


# Compiled synthesis functions per generator and mode; compiling is slow, so once.
_COMPILED: WeakKeyDictionary[Generator, dict[str, Callable[..., Tensor]]] = WeakKeyDictionary()


def synthesis_fn(
    generator: Generator, config: SearchConfig, device: torch.device
) -> Callable[[Tensor, list[Tensor]], Tensor]:
    """The generator's W+ → image function, run as ``config`` asks on ``device``."""
    cuda = device.type == "cuda"
    run: Callable[..., Tensor] = generator.synthesis
    if config.compile != "off":
        mode = config.compile
        if mode == "reduce-overhead" and not cuda:
            mode = "default"  # CUDA graphs are what reduce-overhead adds; a CPU has none
        run = functools.partial(_compiled(generator, mode), generator)
    if config.channels_last:
        return functools.partial(run, memory_format=torch.channels_last)
    return run


def _compiled(generator: Generator, mode: CompileMode) -> Callable[..., Tensor]:
    """torch.compile of the unbound synthesis, called with the generator as first argument:
    the cache then holds no reference to the generator and dies with it."""
    per_mode = _COMPILED.setdefault(generator, {})
    if mode not in per_mode:
        per_mode[mode] = torch.compile(
            type(generator).synthesis, mode=None if mode == "default" else mode
        )
    return per_mode[mode]


def autocast(config: SearchConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the networks when asked; nothing at all for fp32."""
    if config.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def init_variables(
    generator: Generator,
    n: int,
    config: SearchConfig,
    seed: int,
    device: torch.device,
    seeds: Sequence[int] | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Initial latent v (N, L, D) and the noise maps (trainable ones listed apart).

    Drawn on the CPU from ``seed`` so a seed means the same start on any device.
    With ``seeds`` (one per thumbnail), the N rows come in ``len(seeds)`` equal
    blocks, block i drawn from ``seeds[i]`` exactly as a search of that
    thumbnail alone would draw it: jobs batched together keep their own seeds.
    """
    if seeds is None:
        v, noise = _draw(generator, n, seed)
    else:
        if not seeds or n % len(seeds):
            raise ValueError(f"{n} rows cannot be split into {len(seeds)} equal seed blocks")
        blocks = [_draw(generator, n // len(seeds), s) for s in seeds]
        v = torch.cat([bv for bv, _ in blocks])
        noise = [torch.cat(maps) for maps in zip(*(bn for _, bn in blocks), strict=True)]
    noise = [t.to(device) for t in noise]
    trainable = noise[: min(config.trainable_noise, len(noise) - 1)]
    for t in trainable:
        t.requires_grad_(True)
    return v.to(device).requires_grad_(True), noise, trainable


def latent_search(
    generator: Generator,
    fit: MappingFit,
    thumbnails: Tensor,
    config: SearchConfig | None = None,
    extra_loss: ExtraLoss | None = None,
    seeds: Sequence[int] | None = None,
) -> Gen[SearchStep, None, SearchResult]:
    """Search W+ for faces that downscale to ``thumbnails`` (B, 3, h, w) in [0, 1].

    ``seeds`` (one per thumbnail) overrides ``config.seed``: each thumbnail's
    restarts start where a search of it alone with its seed would.
    """
    config = config or SearchConfig()
    device = thumbnails.device
    b, k = thumbnails.shape[0], config.restarts
    res = generator.config.resolution
    downscale_factor(res, thumbnails.shape[-1])  # fail early on an impossible size
    if seeds is not None and len(seeds) != b:
        raise ValueError(f"got {len(seeds)} seeds for {b} thumbnails")
    if seeds is not None:
        seed = int(seeds[0])
    elif config.seed is not None:
        seed = config.seed
    else:
        seed = choose_seed()  # not from torch's global generator: that is the caller's
    targets = thumbnails.repeat_interleave(k, dim=0)  # element i·K + j: thumbnail i, restart j
    n = b * k

    v, noise, trainable = init_variables(generator, n, config, seed, device, seeds)
    params = [v, *trainable]
    radii = [_radius(p.detach()) for p in params]
    opt = torch.optim.Adam(params, lr=config.lr)

    inf = torch.full((n,), math.inf, device=device)
    best_loss, best_mse = inf.clone(), inf.clone()
    best_feasible = torch.zeros(n, dtype=torch.bool, device=device)
    best_img = torch.zeros(n, 3, res, res, device=device)
    best_w = torch.zeros(n, generator.n_latent, generator.config.style_dim, device=device)
    best_terms: dict[str, Tensor] = {}
    best_constraints: dict[str, Tensor] = {}
    limits: dict[str, float] = {}
    synthesis = synthesis_fn(generator, config, device)
    pull = pull_eps(config)  # below this MSE the downscale term is flat
    graphs = config.compile == "reduce-overhead" and device.type == "cuda"

    # The loop never makes the host wait for the device (no .item(), no
    # tensor-valued `if`, no host copies): on a GPU the host queues the next
    # steps while the current one runs. SearchStep carries device tensors;
    # reading one is the caller's choice (and its sync), so read them seldom.
    for step in range(config.steps):
        lr = config.lr * lr_factor(step, config.steps, config.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        if graphs:  # a new step: the graphs' previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        w = fit.to_w(v)  # float32: w feeds GEOCROSS and the best-so-far copy
        with autocast(config, device):
            img = (synthesis(w, noise).float() + 1) / 2
        mse = downscale_mse(img, targets)
        terms = {
            "downscale": config.ds_weight * mse.clamp_min(pull),
            "geocross": config.geocross_weight * geocross(w),
        }
        constraints: dict[str, Tensor] = {}
        if extra_loss is not None:
            # F stays float32: it is small beside the generator (no faster in bf16 on a
            # CPU), and its steering gradients in bf16 led searches to faces that F reads
            # as the target race but an independent judge does not.
            extra = extra_loss(img)
            if not isinstance(extra, ExtraTerms):
                extra = ExtraTerms(extra)
            terms.update({name: t.float() for name, t in extra.losses.items()})
            constraints = {name: t.detach().float() for name, t in extra.constraints.items()}
            limits = extra.limits
        total = torch.stack(list(terms.values())).sum(0)

        with torch.no_grad():
            # The best step is the lowest-loss one among those that meet every
            # rule (MSE within eps, constraints within limits), and only until
            # one does, the lowest-loss one overall. Ranking by loss alone lets
            # GEOCROSS (and the steering terms) trade a face that downscales
            # correctly for a slightly smoother one that does not: with the
            # downscale term flat below its pull target (eps unless fit_eps is
            # tighter), the search hovers there and, at eps, the lowest total is
            # as often just outside it as inside.
            feasible = mse <= config.eps
            for name, t in constraints.items():
                feasible = feasible & (t <= limits[name])
            better = (feasible & ~best_feasible) | (
                (feasible == best_feasible) & (total < best_loss)
            )
            best_feasible = best_feasible | feasible
            best_loss = torch.where(better, total, best_loss)
            best_mse = torch.where(better, mse, best_mse)
            best_img = torch.where(better.view(-1, 1, 1, 1), img, best_img)
            best_w = torch.where(better.view(-1, 1, 1), w, best_w)
            for name, t in terms.items():
                prev = best_terms.get(name, torch.zeros_like(t))
                best_terms[name] = torch.where(better, t.detach(), prev)
            for name, t in constraints.items():
                prev = best_constraints.get(name, torch.full_like(t, math.inf))
                best_constraints[name] = torch.where(better, t, prev)

        total.sum().backward()
        opt.step()
        for p, r in zip(params, radii, strict=True):
            project_to_sphere(p.data, r)
        yield SearchStep(step + 1, config.steps, lr, best_mse.view(b, k).amin(1))

    result = _choose(
        best_img,
        best_mse,
        best_loss,
        best_w,
        best_terms,
        b,
        k,
        config,
        seed,
        best_constraints,
        limits,
    )
    result.seeds = [int(s) for s in seeds] if seeds is not None else [seed] * b
    return result


def _choose(
    img: Tensor,
    mse: Tensor,
    loss: Tensor,
    w: Tensor,
    terms: dict[str, Tensor],
    b: int,
    k: int,
    config: SearchConfig,
    seed: int,
    constraints: dict[str, Tensor] | None = None,
    limits: dict[str, float] | None = None,
) -> SearchResult:
    """Per thumbnail: the lowest-loss accepted restart, else the lowest-MSE one.

    A restart is accepted when its downscale MSE is within eps and every
    constraint within its limit.
    """
    constraints, limits = constraints or {}, limits or {}
    mse, loss = mse.view(b, k), loss.view(b, k)
    accepted = mse <= config.eps
    for name, value in constraints.items():
        accepted = accepted & (value.view(b, k) <= limits[name])
    score = torch.where(accepted, loss, torch.full_like(loss, math.inf))
    any_ok = accepted.any(1)
    idx = torch.where(any_ok, score.argmin(1), mse.argmin(1))
    rows = torch.arange(b, device=idx.device)
    cands = img.view(b, k, *img.shape[1:]).clamp(0, 1)
    return SearchResult(
        images=cands[rows, idx],
        accepted=any_ok,
        mse=mse[rows, idx],
        loss=loss[rows, idx],
        restart=idx,
        candidates=cands,
        candidate_mse=mse,
        candidate_loss=loss,
        candidate_accepted=accepted,
        terms={name: t.view(b, k) for name, t in terms.items()},
        constraints={name: t.view(b, k) for name, t in constraints.items()},
        limits=dict(limits),
        w_plus=w.view(b, k, *w.shape[1:]),
        seed=seed,
        steps=config.steps,
    )


def run_search(
    generator: Generator,
    fit: MappingFit,
    thumbnails: Tensor,
    config: SearchConfig | None = None,
    extra_loss: ExtraLoss | None = None,
    on_step: Callable[[SearchStep], bool | None] | None = None,
    seeds: Sequence[int] | None = None,
) -> SearchResult:
    """Drive ``latent_search`` to the end; ``on_step`` returning False stops it."""
    gen = latent_search(generator, fit, thumbnails, config, extra_loss, seeds)
    while True:
        try:
            step = next(gen)
        except StopIteration as done:
            return done.value
        if on_step is not None and on_step(step) is False:
            gen.close()
            raise SearchStopped(f"stopped after step {step.step} of {step.steps}")


__all__: Sequence[str] = [
    "ExtraTerms",
    "SearchConfig",
    "SearchResult",
    "SearchStep",
    "SearchStopped",
    "autocast",
    "config_key",
    "geocross",
    "latent_search",
    "lr_factor",
    "project_to_sphere",
    "pull_eps",
    "run_search",
    "downscale_mse",
    "synthesis_fn",
]
