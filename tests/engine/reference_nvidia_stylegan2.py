"""An independent, functional rendering of NVIDIA's stylegan2-ada-pytorch generator.

Written from the formulas of NVIDIA's ``training/networks.py`` and
``torch_utils/ops`` (``modulated_conv2d`` in its fused, grouped form,
``conv2d_resample`` with its transposed-convolution up-sampling path and
``flip_weight`` rule, the reference ``upfirdn2d``, ``upsample2d`` and
``bias_act`` with its clamp), reading the tensors by NVIDIA's own names
(``mapping.fcN``, ``synthesis.bR.conv0/conv1/torgb``, ``affine``,
``noise_const``, ``noise_strength``). It shares no code with our generator or
with the importer, so agreement checks the name mapping and the math at once.
Noise is NVIDIA's ``noise_mode='const'``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SQRT2 = math.sqrt(2.0)


def setup_filter(taps: tuple[int, ...] = (1, 3, 3, 1)) -> Tensor:
    f = torch.tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def upfirdn2d(
    x: Tensor,
    f: Tensor,
    up: int = 1,
    down: int = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    flip_filter: bool = False,
    gain: float = 1.0,
) -> Tensor:
    """Zero-insert up-sampling, pad (x0, x1, y0, y1; negative crops), FIR convolution, decimate."""
    b, c, h, w = x.shape
    px0, px1, py0, py1 = padding
    x = x.reshape(b, c, h, 1, w, 1)
    x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1]).reshape(b, c, h * up, w * up)
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]
    f = f * gain ** (f.ndim / 2)
    if not flip_filter:
        f = f.flip([0, 1])
    x = F.conv2d(x, f[None, None].repeat(c, 1, 1, 1), groups=c)
    return x[:, :, ::down, ::down]


def upsample2d(x: Tensor, f: Tensor, up: int = 2) -> Tensor:
    fw = f.shape[-1]
    p = ((fw + up - 1) // 2, (fw - up) // 2)
    return upfirdn2d(x, f, up=up, padding=(p[0], p[1], p[0], p[1]), gain=up * up)


def _conv(
    x: Tensor,
    w: Tensor,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    transpose: bool = False,
    flip_weight: bool = True,
) -> Tensor:
    if not flip_weight and (w.shape[-1] > 1 or w.shape[-2] > 1):
        w = w.flip([2, 3])
    op = F.conv_transpose2d if transpose else F.conv2d
    return op(x, w, stride=stride, padding=padding, groups=groups)


def conv2d_resample(
    x: Tensor,
    w: Tensor,
    f: Tensor,
    up: int = 1,
    padding: int = 0,
    groups: int = 1,
    flip_weight: bool = True,
) -> Tensor:
    """Only the two paths a StyleGAN2 generator takes: plain, and up-sampling by 2."""
    out_ch, in_per_group, kh, kw = w.shape
    fw = fh = f.shape[-1]
    px0 = px1 = py0 = py1 = padding
    if up == 1:
        return _conv(x, w, padding=px0, groups=groups, flip_weight=flip_weight)
    px0 += (fw + up - 1) // 2
    px1 += (fw - up) // 2
    py0 += (fh + up - 1) // 2
    py1 += (fh - up) // 2
    w = w.reshape(groups, out_ch // groups, in_per_group, kh, kw).transpose(1, 2)
    w = w.reshape(groups * in_per_group, out_ch // groups, kh, kw)
    px0 -= kw - 1
    px1 -= kw - up
    py0 -= kh - 1
    py1 -= kh - up
    pxt = max(min(-px0, -px1), 0)
    pyt = max(min(-py0, -py1), 0)
    assert pxt == pyt
    x = _conv(
        x, w, stride=up, padding=pxt, groups=groups, transpose=True, flip_weight=not flip_weight
    )
    return upfirdn2d(x, f, padding=(px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt), gain=up * up)


def modulated_conv2d(
    x: Tensor,
    weight: Tensor,
    styles: Tensor,
    *,
    noise: Tensor | None,
    up: int,
    padding: int,
    f: Tensor,
    demodulate: bool,
    flip_weight: bool,
) -> Tensor:
    b = x.shape[0]
    out_ch, in_ch, kh, kw = weight.shape
    w = weight[None] * styles.reshape(b, 1, -1, 1, 1)
    if demodulate:
        w = w * (w.square().sum([2, 3, 4]) + 1e-8).rsqrt().reshape(b, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    x = conv2d_resample(
        x,
        w.reshape(-1, in_ch, kh, kw),
        f,
        up=up,
        padding=padding,
        groups=b,
        flip_weight=flip_weight,
    )
    x = x.reshape(b, -1, *x.shape[2:])
    return x + noise if noise is not None else x


def bias_act(x: Tensor, b: Tensor, act: str, clamp: float | None) -> Tensor:
    x = x + b.reshape(1, -1, 1, 1)
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2) * SQRT2
    return x.clamp(-clamp, clamp) if clamp is not None else x


def fully_connected(sd: dict[str, Tensor], p: str, x: Tensor, lr: float, act: str) -> Tensor:
    w, b = sd[p + "weight"], sd[p + "bias"]
    x = x @ (w * (lr / math.sqrt(w.shape[1]))).t()
    x = x + b * lr
    return F.leaky_relu(x, 0.2) * SQRT2 if act == "lrelu" else x


def mapping(sd: dict[str, Tensor], z: Tensor, lr_multiplier: float = 0.01) -> Tensor:
    x = z * (z.square().mean(1, keepdim=True) + 1e-8).rsqrt()
    i = 0
    while f"mapping.fc{i}.weight" in sd:
        x = fully_connected(sd, f"mapping.fc{i}.", x, lr_multiplier, "lrelu")
        i += 1
    return x


def synthesis_layer(
    sd: dict[str, Tensor], p: str, x: Tensor, w: Tensor, up: int, clamp: float | None
) -> Tensor:
    styles = fully_connected(sd, p + "affine.", w, 1.0, "linear")
    noise = sd[p + "noise_const"] * sd[p + "noise_strength"]
    x = modulated_conv2d(
        x,
        sd[p + "weight"],
        styles,
        noise=noise,
        up=up,
        padding=1,
        f=sd[p + "resample_filter"],
        demodulate=True,
        flip_weight=(up == 1),
    )
    return bias_act(x, sd[p + "bias"], "lrelu", clamp)


def torgb(sd: dict[str, Tensor], p: str, x: Tensor, w: Tensor, clamp: float | None) -> Tensor:
    weight = sd[p + "weight"]
    gain = 1 / math.sqrt(weight.shape[1] * weight.shape[2] * weight.shape[3])
    styles = fully_connected(sd, p + "affine.", w, 1.0, "linear") * gain
    x = modulated_conv2d(
        x,
        weight,
        styles,
        noise=None,
        up=1,
        padding=0,
        f=setup_filter(),
        demodulate=False,
        flip_weight=True,
    )
    return bias_act(x, sd[p + "bias"], "linear", clamp)


def synthesis(sd: dict[str, Tensor], ws: Tensor, conv_clamp: float | None = None) -> Tensor:
    """ws (B, num_ws, w_dim) → image, block by block as SynthesisNetwork/SynthesisBlock do."""
    resolutions = []
    r = 4
    while f"synthesis.b{r}.conv1.weight" in sd:
        resolutions.append(r)
        r *= 2
    x = img = None
    w_idx = 0
    for res in resolutions:
        p = f"synthesis.b{res}."
        n_conv = 1 if res == 4 else 2
        block_ws = ws.narrow(1, w_idx, n_conv + 1).unbind(1)
        w_idx += n_conv
        if res == 4:
            x = sd[p + "const"].unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
            x = synthesis_layer(sd, p + "conv1.", x, block_ws[0], 1, conv_clamp)
        else:
            x = synthesis_layer(sd, p + "conv0.", x, block_ws[0], 2, conv_clamp)
            x = synthesis_layer(sd, p + "conv1.", x, block_ws[1], 1, conv_clamp)
        if img is not None:
            img = upsample2d(img, sd[p + "resample_filter"])
        y = torgb(sd, p + "torgb.", x, block_ws[-1], conv_clamp)
        img = img + y if img is not None else y
    return img
