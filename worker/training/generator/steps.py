"""One training step: the D update, the G update and the EMA of G.

Every real image comes with its mask of measured pixels, and D sees every image,
real or fake, through the mask of the real of its batch index
(worker/training/generator/measurement.py).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from likeness.errors import LikenessError
from worker.engine.generator import Generator
from worker.training.generator.diffaugment import diff_augment
from worker.training.generator.losses import (
    d_logistic_loss,
    g_nonsaturating_loss,
    path_lengths,
    r1_penalty,
)
from worker.training.generator.measurement import measure
from worker.training.generator.state import TrainState, amp_dtype
from worker.training.generator.vae import (
    decode,
    encode,
    kl_divergence,
    reconstruction_terms,
)


def sample_w_plus(G: Generator, batch: int, mixing: float, device: torch.device) -> Tensor:
    """W+ for a batch; with probability ``mixing`` the layers after a random
    cut take a second w (style mixing, which decorrelates the layers' styles).
    Always draws the same random numbers, mixing or not."""
    n, dim = G.n_latent, G.config.style_dim
    w = G.mapping(torch.randn(2 * batch, dim, device=device)).view(2, batch, dim)
    mix = bool(torch.rand(()) < mixing)
    cut = int(torch.randint(1, n, ())) if n > 1 else n
    cut = cut if mix else n
    return torch.cat([w[0, :, None].expand(-1, cut, -1), w[1, :, None].expand(-1, n - cut, -1)], 1)


def _autocast(state: TrainState) -> contextlib.AbstractContextManager:
    dtype = amp_dtype(state.config, state.device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def _step(loss: Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def d_step(
    state: TrainState, real: Tensor, mask: Tensor, fake: Tensor | None = None
) -> dict[str, float]:
    """D's update on reals and as many fakes (G's random samples unless given), all
    measured by ``mask``; lazy R1."""
    c, G, D = state.config, state.G, state.D
    G.requires_grad_(False)
    D.requires_grad_(True)
    real = measure(real, mask)
    with _autocast(state):
        with torch.no_grad():
            if fake is None:
                fake = G.synthesis(sample_w_plus(G, real.shape[0], c.mixing, state.device))
            fake = measure(fake.detach(), mask)
        fake_pred = D(diff_augment(fake, state.augment))
        real_pred = D(diff_augment(real, state.augment))
        loss = d_logistic_loss(real_pred.float(), fake_pred.float())
    _step(loss, state.opt_D, state.scaler_D)
    out = {
        "loss_D": loss.item(),
        "real_score": real_pred.float().mean().item(),
        "fake_score": fake_pred.float().mean().item(),
    }
    if c.r1_gamma > 0 and state.step % c.r1_every == 0:
        # in fp32: the gradient penalty is where reduced precision hurts most
        real = real.detach().requires_grad_(True)
        real_pred = D(diff_augment(real, state.augment))
        r1 = r1_penalty(real_pred, real)
        state.opt_D.zero_grad(set_to_none=True)
        # `0 * pred` keeps the final layer's bias in the graph
        (c.r1_gamma / 2 * r1 * c.r1_every + 0 * real_pred[0, 0]).backward()
        state.opt_D.step()
        out["r1"] = r1.item()
    return out


def g_step(state: TrainState, mask: Tensor) -> dict[str, float]:
    """G's adversarial update on a batch of fakes as large as ``mask``'s, measured by it."""
    c, G, D = state.config, state.G, state.D
    G.requires_grad_(True)
    D.requires_grad_(False)
    batch = mask.shape[0]
    with _autocast(state):
        fake = measure(G.synthesis(sample_w_plus(G, batch, c.mixing, state.device)), mask)
        loss = state.adv_weight_now * g_nonsaturating_loss(
            D(diff_augment(fake, state.augment)).float()
        )
    _step(loss, state.opt_G, state.scaler_G)
    out = {"loss_G": loss.item()}
    if c.pl_weight > 0 and state.step % c.pl_every == 0:
        w_plus = sample_w_plus(G, max(1, batch // c.pl_batch_shrink), c.mixing, state.device)
        fake = G.synthesis(w_plus)
        lengths = path_lengths(fake, w_plus)
        target = state.mean_path_length + c.pl_decay * (
            lengths.mean().item() - state.mean_path_length
        )
        penalty = (lengths - target).pow(2).mean()
        state.opt_G.zero_grad(set_to_none=True)
        (c.pl_weight * c.pl_every * penalty + 0 * fake[0, 0, 0, 0]).backward()
        state.opt_G.step()
        state.mean_path_length = target
        out["pl"] = penalty.item()
        out["path_length"] = target
    return out


@torch.no_grad()
def update_ema(state: TrainState) -> None:
    c = state.config
    half_life = c.ema_half_life_kimg * 1000
    if c.ema_rampup is not None:
        # early on, a long half-life would average in the random initialisation
        half_life = min(half_life, (state.step + 1) * c.batch * c.ema_rampup)
    beta = 0.5 ** (c.batch / max(half_life, 1e-8))
    for p_ema, p in zip(state.G_ema.parameters(), state.G.parameters(), strict=True):
        p_ema.lerp_(p, 1 - beta)
    for b_ema, b in zip(state.G_ema.buffers(), state.G.buffers(), strict=True):
        b_ema.copy_(b)


def train_step(state: TrainState, real: Tensor, mask: Tensor) -> dict[str, float]:
    """The objective's updates (D, the autoencoder, G; with d_fakes=reconstructions the
    autoencoder, then D) on a batch of reals and their masks of measured pixels, the
    EMA; advances ``state.step``."""
    objective = state.config.objective
    adversarial = state.adversarial_now
    metrics: dict[str, float] = {}
    if adversarial and state.config.d_fakes == "reconstructions":
        # G's update first, as in VQGAN; D then judges those reconstructions, made
        # before G's update (one forward pass fewer than remaking them)
        vae_metrics, reconstructions = vae_step(state, real, mask)
        metrics |= d_step(state, real, mask, reconstructions) | vae_metrics
    else:
        if adversarial:
            metrics |= d_step(state, real, mask)
        if objective != "gan":
            metrics |= vae_step(state, real, mask)[0]
        if adversarial:
            metrics |= g_step(state, mask)
    update_ema(state)
    state.step += 1
    bad = {k: v for k, v in metrics.items() if k.startswith("loss_") and not math.isfinite(v)}
    if bad:
        raise LikenessError(
            "training_diverged",
            f"losses became non-finite at step {state.step}: "
            + ", ".join(f"{k} {v}" for k, v in bad.items()),
        )
    return metrics


def vae_step(state: TrainState, real: Tensor, mask: Tensor) -> tuple[dict[str, float], Tensor]:
    """One joint update of the encoder and G on a batch of reals (plus, for
    vae-gan, the adversarial loss of the reconstructions); the metrics and the
    reconstructions (detached)."""
    c, G, E = state.config, state.G, state.E
    assert E is not None and state.opt_E is not None
    G.requires_grad_(True)
    E.requires_grad_(True)
    mu, logvar = encode(E, real)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    fake, w = decode(G, z)
    if state.codes is not None:
        state.codes.update(w)
    terms = reconstruction_terms(
        fake, real, mask, state.face, c.perceptual_weight > 0, state.race_extractor
    )
    kl = kl_divergence(mu, logvar).mean()
    loss = terms["l1"] + c.lowres_weight * terms["lowres"] + c.kl_weight * kl
    if "identity" in terms:
        loss = loss + c.identity_weight * terms["identity"]
    if "perceptual" in terms:
        loss = loss + c.perceptual_weight * terms["perceptual"]
    if "race" in terms:
        loss = loss + c.race_weight * terms["race"]
    out = {f"rec_{name}": float(t.item()) for name, t in terms.items()} | {"kl": kl.item()}
    adv_weight = state.adv_weight_now
    if c.objective == "vae-gan" and adv_weight > 0:
        state.D.requires_grad_(False)
        adv = g_nonsaturating_loss(state.D(diff_augment(measure(fake, mask), state.augment)))
        if c.d_fakes == "reconstructions":
            balance = adaptive_adv_weight(loss, adv, G.to_rgbs[-1].conv.weight)
            out["adv_balance"] = balance.item()
            adv_weight = adv_weight * balance
        loss = loss + adv_weight * adv
        out["rec_adv"] = adv.item()
    state.opt_G.zero_grad(set_to_none=True)
    state.opt_E.zero_grad(set_to_none=True)
    loss.backward()
    state.opt_G.step()
    state.opt_E.step()
    out["loss_VAE"] = loss.item()
    return out, fake.detach()


def adaptive_adv_weight(reconstruction: Tensor, adversarial: Tensor, last_layer: Tensor) -> Tensor:
    """VQGAN's balance (Esser et al. 2021, eq. 7): the ratio of the two losses' gradient
    norms at the decoder's last layer: the adversarial term pulls as hard as the
    reconstruction terms (times ``adv_weight``) as both change in scale over a run,
    where a fixed weight is soon either lost beside them or swamps them."""
    (g_rec,) = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)
    (g_adv,) = torch.autograd.grad(adversarial, last_layer, retain_graph=True)
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()
