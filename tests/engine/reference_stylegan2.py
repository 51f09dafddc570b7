"""An independent, functional rendering of the PyTorch port's StyleGAN2 forward pass.

It follows the port's *fused* formulation — per-sample modulated weights and
grouped (transposed) convolutions, and its reshape-based native ``upfirdn2d`` —
reading parameters straight from a state_dict by the port's key names. Our
``Generator`` uses a different (dense, batched) formulation; agreement between
the two checks the math and the layout at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def native_upfirdn2d(x: Tensor, kernel: Tensor, up: int, pad0: int, pad1: int) -> Tensor:
    _, channel, in_h, in_w = x.shape
    x = x.reshape(-1, in_h, in_w, 1)
    kh, kw = kernel.shape
    out = x.view(-1, in_h, 1, in_w, 1, 1)
    out = F.pad(out, [0, 0, 0, up - 1, 0, 0, 0, up - 1])
    out = out.view(-1, in_h * up, in_w * up, 1)
    out = F.pad(out, [0, 0, pad0, pad1, pad0, pad1])
    out = out.permute(0, 3, 1, 2).reshape(-1, 1, in_h * up + pad0 + pad1, in_w * up + pad0 + pad1)
    w = torch.flip(kernel, [0, 1]).view(1, 1, kh, kw)
    out = F.conv2d(out, w)
    oh, ow = out.shape[-2:]
    return out.reshape(-1, channel, oh, ow)


def lrelu(x: Tensor, bias: Tensor) -> Tensor:
    shape = [1, -1] + [1] * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(*shape), 0.2) * math.sqrt(2)


def mapping(sd: dict[str, Tensor], z: Tensor, lr_mul: float = 0.01) -> Tensor:
    x = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)
    i = 1
    while f"style.{i}.weight" in sd:
        weight = sd[f"style.{i}.weight"]
        x = lrelu(
            F.linear(x, weight * lr_mul / math.sqrt(weight.shape[1])),
            sd[f"style.{i}.bias"] * lr_mul,
        )
        i += 1
    return x


def modconv(
    sd: dict[str, Tensor], p: str, x: Tensor, style: Tensor, demod: bool, up: bool
) -> Tensor:
    b, cin, h, w = x.shape
    wt = sd[p + "weight"]
    cout, k = wt.shape[1], wt.shape[-1]
    mw = sd[p + "modulation.weight"]
    s = F.linear(style, mw / math.sqrt(mw.shape[1]), sd[p + "modulation.bias"])
    weight = wt / math.sqrt(cin * k * k) * s.view(b, 1, cin, 1, 1)
    if demod:
        weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, cout, 1, 1, 1)
    if up:
        weight = weight.transpose(1, 2).reshape(b * cin, cout, k, k)
        out = F.conv_transpose2d(x.view(1, b * cin, h, w), weight, stride=2, groups=b)
        out = out.view(b, cout, *out.shape[-2:])
        p_ = 4 - 2 - (k - 1)
        return native_upfirdn2d(out, sd[p + "blur.kernel"], 1, (p_ + 1) // 2 + 1, p_ // 2 + 1)
    weight = weight.view(b * cout, cin, k, k)
    out = F.conv2d(x.view(1, b * cin, h, w), weight, padding=k // 2, groups=b)
    return out.view(b, cout, h, w)


def styled(
    sd: dict[str, Tensor], p: str, x: Tensor, style: Tensor, noise: Tensor, up: bool = False
) -> Tensor:
    out = modconv(sd, p + "conv.", x, style, True, up)
    out = out + sd[p + "noise.weight"] * noise
    return lrelu(out, sd[p + "activate.bias"])


def to_rgb(sd: dict[str, Tensor], p: str, x: Tensor, style: Tensor, skip: Tensor | None) -> Tensor:
    out = modconv(sd, p + "conv.", x, style, False, False) + sd[p + "bias"]
    if skip is not None:
        out = out + native_upfirdn2d(skip, sd[p + "upsample.kernel"], 2, 2, 1)
    return out


def synthesis(sd: dict[str, Tensor], latent: Tensor, noise: list[Tensor]) -> Tensor:
    b = latent.shape[0]
    out = sd["input.input"].repeat(b, 1, 1, 1)
    out = styled(sd, "conv1.", out, latent[:, 0], noise[0])
    skip = to_rgb(sd, "to_rgb1.", out, latent[:, 1], None)
    i, j = 1, 0
    while f"to_rgbs.{j}.bias" in sd:
        out = styled(sd, f"convs.{2 * j}.", out, latent[:, i], noise[2 * j + 1], up=True)
        out = styled(sd, f"convs.{2 * j + 1}.", out, latent[:, i + 1], noise[2 * j + 2])
        skip = to_rgb(sd, f"to_rgbs.{j}.", out, latent[:, i + 2], skip)
        i += 2
        j += 1
    return skip
