"""StyleGAN2's losses and regularisers as plain functions of D's logits and G's outputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def d_logistic_loss(real_pred: Tensor, fake_pred: Tensor) -> Tensor:
    return F.softplus(-real_pred).mean() + F.softplus(fake_pred).mean()


def g_nonsaturating_loss(fake_pred: Tensor) -> Tensor:
    return F.softplus(-fake_pred).mean()


def r1_penalty(real_pred: Tensor, real: Tensor) -> Tensor:
    """Mean squared norm of dD/dx on reals (the x that required grad)."""
    (grad,) = torch.autograd.grad(real_pred.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def path_lengths(fake: Tensor, w_plus: Tensor) -> Tensor:
    """|J_w^T y| per sample for a random image-space y (the PPL regulariser's quantity)."""
    noise = torch.randn_like(fake) / math.sqrt(fake.shape[2] * fake.shape[3])
    (grad,) = torch.autograd.grad((fake * noise).sum(), w_plus, create_graph=True)
    return grad.pow(2).sum(2).mean(1).sqrt()
