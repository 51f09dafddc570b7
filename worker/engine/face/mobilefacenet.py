"""MobileFaceNet (Chen et al. 2018) for 112×96 SphereFace-aligned faces, 128-d.

The module layout (``conv1``, ``dw_conv1``, ``blocks.N.conv.K``, ``conv2``,
``linear7``, ``linear1``) matches ``mobilefacenet_casia_068.ckpt`` so that its
state_dict loads with ``strict=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# Input normalisation the checkpoint was trained with, expressed on [0, 1]
# images: (x * 255 - 127.5) / 128 == (x - MEAN) / STD.
MEAN = 127.5 / 255.0
STD = 128.0 / 255.0

# (expansion t, output channels c, repeats n, first stride s) from the paper's Table 1.
BOTTLENECKS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


class ConvBlock(nn.Module):
    """Conv → BN (→ PReLU unless ``linear``); depthwise when ``dw``."""

    def __init__(
        self,
        inp: int,
        oup: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int = 0,
        dw: bool = False,
        linear: bool = False,
    ) -> None:
        super().__init__()
        groups = inp if dw else 1
        self.conv = nn.Conv2d(inp, oup, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(oup)
        self.prelu = None if linear else nn.PReLU(oup)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class Bottleneck(nn.Module):
    """Inverted residual: 1×1 expand, 3×3 depthwise, 1×1 linear projection."""

    def __init__(self, inp: int, oup: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = inp * expansion
        self.residual = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.PReLU(hidden),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.PReLU(hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """Takes normalised [B, 3, 112, 96] crops (see MEAN/STD), returns [B, 128]."""

    input_size = (112, 96)

    def __init__(self, embedding_dim: int = 128) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.conv1 = ConvBlock(3, 64, 3, 2, 1)
        self.dw_conv1 = ConvBlock(64, 64, 3, 1, 1, dw=True)
        blocks: list[nn.Module] = []
        inp = 64
        for t, c, n, s in BOTTLENECKS:
            for i in range(n):
                blocks.append(Bottleneck(inp, c, s if i == 0 else 1, t))
                inp = c
        self.blocks = nn.Sequential(*blocks)
        self.conv2 = ConvBlock(inp, 512, 1)
        # Global depthwise conv over the final 7×6 map instead of average pooling.
        self.linear7 = ConvBlock(512, 512, (7, 6), dw=True, linear=True)
        self.linear1 = ConvBlock(512, embedding_dim, 1, linear=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dw_conv1(self.conv1(x))
        x = self.conv2(self.blocks(x))
        x = self.linear1(self.linear7(x))
        return x.flatten(1)


def fold_batch_norms(model: MobileFaceNet) -> MobileFaceNet:
    """Fold every BatchNorm into the convolution before it, in place, for a frozen model in
    eval mode: the same function, and its forward and backward passes cost about a fifth less
    on a CPU, where the search pays F's backward pass at every step. Not for training (the
    statistics are gone) nor for saving (the state_dict no longer matches the checkpoint)."""
    if model.training:
        raise ValueError("fold batch norms only of a model in eval mode")
    for block in model.modules():
        if isinstance(block, ConvBlock) and isinstance(block.bn, nn.BatchNorm2d):
            block.conv = fuse_conv_bn_eval(block.conv, block.bn)
            block.bn = nn.Identity()  # type: ignore[assignment]
        elif isinstance(block, Bottleneck):
            layers = list(block.conv)
            for i, (a, b) in enumerate(zip(layers, layers[1:], strict=False)):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    block.conv[i] = fuse_conv_bn_eval(a, b)
                    block.conv[i + 1] = nn.Identity()
    return model


def from_state_dict(state: dict[str, Tensor]) -> MobileFaceNet:
    """A MobileFaceNet holding ``state`` (width read from it, ``strict=True``), in eval mode."""
    model = MobileFaceNet(embedding_dim=state["linear1.bn.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_mobilefacenet(path: str | Path, map_location: str | torch.device = "cpu") -> MobileFaceNet:
    """A MobileFaceNet from a ``{"net_state_dict": ...}`` checkpoint (strict), in eval mode."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    return from_state_dict(ckpt.get("net_state_dict", ckpt))
