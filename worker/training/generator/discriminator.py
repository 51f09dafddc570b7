"""StyleGAN2 residual discriminator, sized by the generator's ``GeneratorConfig``.

Module tree and parameter names follow the PyTorch port's ``Discriminator``
(``convs.N``, ``final_conv``, ``final_linear``), so a D trained here and one
from the port's checkpoints share a layout. Widths mirror the generator's:
the block that reads ``res`` px has ``config.width(res)`` channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.engine.generator import (
    Blur,
    EqualLinear,
    FusedLeakyReLU,
    GeneratorConfig,
)


class EqualConv2d(nn.Module):
    """Conv with equalised learning rate (weights scaled at run time)."""

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.stride, self.padding = stride, padding
        self.bias = nn.Parameter(torch.zeros(out_channel)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(
            x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding
        )


class ConvLayer(nn.Sequential):
    """[blur →] conv [→ bias + leaky ReLU]; downsampling blurs first so the
    stride-2 conv does not alias."""

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        downsample: bool = False,
        blur_kernel: Sequence[int] = (1, 3, 3, 1),
        bias: bool = True,
        activate: bool = True,
    ) -> None:
        layers: list[nn.Module] = []
        if downsample:
            p = (len(blur_kernel) - 2) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        # with an activation the bias lives in the activation (the port's layout)
        layers.append(
            EqualConv2d(
                in_channel,
                out_channel,
                kernel_size,
                stride=stride,
                padding=padding,
                bias=bias and not activate,
            )
        )
        if activate:
            layers.append(FusedLeakyReLU(out_channel))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Two 3×3 convs (the second halves the size) plus a 1×1 downsampled skip."""

    def __init__(
        self, in_channel: int, out_channel: int, blur_kernel: Sequence[int] = (1, 3, 3, 1)
    ) -> None:
        super().__init__()
        self.conv1 = ConvLayer(in_channel, in_channel, 3)
        self.conv2 = ConvLayer(in_channel, out_channel, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(
            in_channel,
            out_channel,
            1,
            downsample=True,
            blur_kernel=blur_kernel,
            activate=False,
            bias=False,
        )

    def forward(self, x: Tensor) -> Tensor:
        # 1/sqrt(2) keeps the sum at unit variance
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class Discriminator(nn.Module):
    """Image (B, 3, res, res) in [-1, 1] → one realness logit per image (B, 1).

    The same residual trunk doubles as the VAE objective's encoder: ``out_dim``
    outputs (z's mean and log-variance) and ``stddev_group=0``, since a code
    must depend on its own image only, not on the rest of the batch.
    """

    def __init__(self, config: GeneratorConfig, stddev_group: int = 4, out_dim: int = 1) -> None:
        super().__init__()
        self.config = config
        c, bk = config, config.blur_kernel
        convs: list[nn.Module] = [ConvLayer(3, c.width(c.resolution), 1)]
        in_ch = c.width(c.resolution)
        for log_res in range(c.log_size, 2, -1):
            out_ch = c.width(2 ** (log_res - 1))
            convs.append(ResBlock(in_ch, out_ch, bk))
            in_ch = out_ch
        self.convs = nn.Sequential(*convs)
        self.stddev_group = stddev_group
        self.final_conv = ConvLayer(in_ch + (1 if stddev_group else 0), c.width(4), 3)
        self.final_linear = nn.Sequential(
            EqualLinear(c.width(4) * 4 * 4, c.width(4), activate=True),
            EqualLinear(c.width(4), out_dim),
        )

    def minibatch_stddev(self, x: Tensor) -> Tensor:
        """Append the feature std across a group of samples as one extra channel:
        lets D see a batch's lack of variety (mode collapse)."""
        b, c, h, w = x.shape
        # the largest group size <= stddev_group that divides the batch
        group = next(g for g in range(min(b, self.stddev_group), 0, -1) if b % g == 0)
        y = x.reshape(group, -1, c, h, w)
        y = torch.sqrt(y.var(0, unbiased=False) + 1e-8).mean((1, 2, 3))  # (b / group,)
        y = y.reshape(1, -1, 1, 1, 1).expand(group, -1, 1, h, w).reshape(b, 1, h, w)
        return torch.cat([x, y], 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.convs(x)
        if self.stddev_group:
            out = self.minibatch_stddev(out)
        out = self.final_conv(out)
        return self.final_linear(out.flatten(1))
