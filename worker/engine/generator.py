"""StyleGAN2 generator in plain PyTorch: one class for every resolution and width.

The module tree and parameter names follow the widely used PyTorch port of
StyleGAN2 (``style.N``, ``input.input``, ``conv1``, ``to_rgb1``, ``convs.N``,
``to_rgbs.N``, ``noises.noise_N``), so its checkpoints load unchanged with
``strict=True``. A slim CPU model and the 1024-px FFHQ model differ only in
their ``GeneratorConfig``. No compiled ops: the resampling is a depthwise
convolution, which runs on CPU and CUDA alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from torch import Tensor, nn

# The mapping network's and the synthesis' activation: leaky ReLU with this
# slope, times this gain (to keep unit variance). The latent search undoes it.
ACT_SLOPE = 0.2
ACT_GAIN = math.sqrt(2.0)


class GeneratorConfig(BaseModel):
    """Everything that fixes the generator's shapes (plus the mapping's lr multiplier)."""

    resolution: int = Field(description="output side in pixels, a power of two 32..1024")
    style_dim: int = Field(512, description="width of z, w and every style vector")
    n_mlp: int = Field(8, description="depth of the mapping network")
    channels: list[int] = Field(
        description="feature channels at 4, 8, ..., resolution px (one entry per resolution)"
    )
    lr_mlp: float = Field(0.01, description="equalised-lr multiplier of the mapping network")
    blur_kernel: list[int] = Field([1, 3, 3, 1], description="FIR kernel of the up-sampling")
    conv_clamp: float | None = Field(
        None,
        description="clamp every conv layer's output (after its activation) and every "
        "ToRGB output to ±conv_clamp, as NVIDIA's float16-safe networks do; None: no clamp",
    )

    @model_validator(mode="after")
    def _check(self) -> GeneratorConfig:
        log = math.log2(self.resolution)
        if log != int(log) or not 8 <= self.resolution <= 1024:
            raise ValueError(f"resolution must be a power of two in 8..1024, got {self.resolution}")
        if len(self.channels) != int(log) - 1:
            raise ValueError(
                f"channels needs {int(log) - 1} entries (4..{self.resolution} px), "
                f"got {len(self.channels)}"
            )
        if min(self.channels) < 1:
            raise ValueError(f"every resolution needs at least one channel: {self.channels}")
        return self

    @classmethod
    def stylegan2(
        cls, resolution: int, channel_multiplier: int = 2, style_dim: int = 512, n_mlp: int = 8
    ) -> GeneratorConfig:
        """The port's standard widths (1024 px, multiplier 2 is the FFHQ model)."""
        base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
        widths = [
            base[r] * (channel_multiplier if r >= 64 else 1) for r in _resolutions(resolution)
        ]
        return cls(resolution=resolution, style_dim=style_dim, n_mlp=n_mlp, channels=widths)

    @classmethod
    def slim(
        cls,
        resolution: int,
        channel_max: int = 256,
        channel_base: int = 4096,
        style_dim: int = 256,
        n_mlp: int = 4,
    ) -> GeneratorConfig:
        """Width halves as resolution doubles: min(channel_max, channel_base / res)."""
        widths = [min(channel_max, channel_base // r) for r in _resolutions(resolution)]
        return cls(resolution=resolution, style_dim=style_dim, n_mlp=n_mlp, channels=widths)

    @property
    def log_size(self) -> int:
        return int(math.log2(self.resolution))

    @property
    def n_latent(self) -> int:
        """Number of W+ rows (style inputs)."""
        return self.log_size * 2 - 2

    @property
    def num_noise(self) -> int:
        return (self.log_size - 2) * 2 + 1

    def width(self, res: int) -> int:
        return self.channels[int(math.log2(res)) - 2]


def _resolutions(resolution: int) -> list[int]:
    return [2**i for i in range(2, int(math.log2(resolution)) + 1)]


def make_kernel(k: Sequence[int]) -> Tensor:
    t = torch.tensor(k, dtype=torch.float32)
    t = t[None, :] * t[:, None]
    return t / t.sum()


def upfirdn2d(
    x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> Tensor:
    """Upsample by zero insertion, pad, FIR filter (true convolution), downsample.

    Same semantics as the port's compiled op, written as a depthwise conv so it
    runs anywhere and is differentiable by autograd.
    """
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(b, c, h * up, w * up)
    p0, p1 = pad
    x = F.pad(x, (max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)))
    if p0 < 0 or p1 < 0:
        hh, ww = x.shape[2], x.shape[3]
        x = x[:, :, max(-p0, 0) : hh - max(-p1, 0), max(-p0, 0) : ww - max(-p1, 0)]
    k = torch.flip(kernel, (0, 1)).to(x.dtype)
    weight = k[None, None].expand(c, 1, *k.shape)
    x = F.conv2d(x, weight, groups=c)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def scaled_leaky_relu(x: Tensor, bias: Tensor | None = None) -> Tensor:
    if bias is not None:
        # In x's dtype: under bf16 autocast a float32 bias would promote the
        # whole activation to float32 (twice the memory traffic, and a cast
        # back at the next convolution). A no-op in float32.
        x = x + bias.view(1, -1, *([1] * (x.ndim - 2))).to(x.dtype)
    return F.leaky_relu(x, ACT_SLOPE) * ACT_GAIN


class PixelNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate (weights scaled at run time)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activate: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: Tensor) -> Tensor:
        if self.activate:
            return scaled_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class Blur(nn.Module):
    def __init__(self, kernel: Sequence[int], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel) * upsample_factor**2)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    def __init__(self, kernel: Sequence[int], factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor**2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """Style-modulated (and optionally demodulated) convolution.

    Written as modulate-input → shared-weight conv → demodulate-output rather
    than as a grouped conv with per-sample weights: the same result, but one
    dense convolution for the whole batch, which is what makes batched search
    fast on both CPU and GPU.
    """

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
        blur_kernel: Sequence[int] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(
                blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor
            )
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(
            torch.randn(1, out_channel, in_channel, kernel_size, kernel_size)
        )
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        batch = x.shape[0]
        s = self.modulation(style)  # (B, in)
        weight = self.scale * self.weight[0]  # (out, in, k, k)
        x = x * s.view(batch, -1, 1, 1)
        if self.upsample:
            out = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
            out = self.blur(out)
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # sum over (in, k, k) of (w * s)^2, per sample and output channel
            w2 = weight.pow(2).sum((2, 3))  # (out, in)
            demod = torch.rsqrt(s.pow(2) @ w2.t() + 1e-8)  # (B, out)
            out = out * demod.view(batch, -1, 1, 1)
        return out


class NoiseInjection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is None:
            noise = x.new_empty(x.shape[0], 1, x.shape[2], x.shape[3]).normal_()
        return x + (self.weight * noise).to(x.dtype)  # keeps bf16 activations bf16


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> Tensor:
        return self.input.expand(batch, -1, -1, -1)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel))

    def forward(self, x: Tensor) -> Tensor:
        return scaled_leaky_relu(x, self.bias)


def _clamp(x: Tensor, limit: float | None) -> Tensor:
    return x if limit is None else x.clamp(-limit, limit)


class StyledConv(nn.Module):
    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        style_dim: int,
        upsample: bool = False,
        blur_kernel: Sequence[int] = (1, 3, 3, 1),
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(
            in_channel,
            out_channel,
            kernel_size,
            style_dim,
            upsample=upsample,
            blur_kernel=blur_kernel,
        )
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)
        self.conv_clamp = conv_clamp

    def forward(self, x: Tensor, style: Tensor, noise: Tensor | None = None) -> Tensor:
        return _clamp(self.activate(self.noise(self.conv(x, style), noise)), self.conv_clamp)


class ToRGB(nn.Module):
    def __init__(
        self,
        in_channel: int,
        style_dim: int,
        upsample: bool = True,
        blur_kernel: Sequence[int] = (1, 3, 3, 1),
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.conv_clamp = conv_clamp

    def forward(self, x: Tensor, style: Tensor, skip: Tensor | None = None) -> Tensor:
        out = _clamp(self.conv(x, style) + self.bias, self.conv_clamp)
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class Generator(nn.Module):
    """Mapping network ``style`` (z → w) and synthesis (W+ → image in [-1, 1])."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        c, sd, bk, cc = config, config.style_dim, config.blur_kernel, config.conv_clamp
        self.style = nn.Sequential(
            PixelNorm(),
            *[EqualLinear(sd, sd, lr_mul=c.lr_mlp, activate=True) for _ in range(c.n_mlp)],
        )
        self.input = ConstantInput(c.width(4))
        self.conv1 = StyledConv(c.width(4), c.width(4), 3, sd, blur_kernel=bk, conv_clamp=cc)
        self.to_rgb1 = ToRGB(c.width(4), sd, upsample=False, conv_clamp=cc)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for i in range(c.num_noise):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, res, res))
        in_ch = c.width(4)
        for log_res in range(3, c.log_size + 1):
            out_ch = c.width(2**log_res)
            self.convs.append(
                StyledConv(in_ch, out_ch, 3, sd, upsample=True, blur_kernel=bk, conv_clamp=cc)
            )
            self.convs.append(StyledConv(out_ch, out_ch, 3, sd, blur_kernel=bk, conv_clamp=cc))
            self.to_rgbs.append(ToRGB(out_ch, sd, blur_kernel=bk, conv_clamp=cc))
            in_ch = out_ch

    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    def noise_shapes(self) -> list[tuple[int, int]]:
        """(height, width) of every noise map, coarse to fine."""
        return [(2 ** ((i + 5) // 2),) * 2 for i in range(self.config.num_noise)]

    def stored_noise(self) -> list[Tensor]:
        return [getattr(self.noises, f"noise_{i}") for i in range(self.config.num_noise)]

    def mapping(self, z: Tensor) -> Tensor:
        """z (N, style_dim) → w (N, style_dim)."""
        return self.style(z)

    def synthesis(
        self,
        w_plus: Tensor,
        noise: Sequence[Tensor | None] | None = None,
        memory_format: torch.memory_format | None = None,
    ) -> Tensor:
        """W+ latent (B, n_latent, style_dim) → image (B, 3, res, res) in about [-1, 1].

        ``noise``: one map per layer, broadcastable to (B, 1, h, w); ``None``
        entries (or ``noise=None``) draw fresh Gaussian noise. ``memory_format``
        (e.g. ``torch.channels_last``, which tensor-core convolutions prefer)
        lays out the activations; None keeps PyTorch's default.
        """
        if w_plus.ndim != 3 or w_plus.shape[1] != self.n_latent:
            raise ValueError(
                f"expected W+ of shape (B, {self.n_latent}, {self.config.style_dim}), "
                f"got {tuple(w_plus.shape)}"
            )
        noise = list(noise) if noise is not None else [None] * self.config.num_noise
        out = self.input(w_plus.shape[0])
        if memory_format is not None:
            # Converting the first activation is enough: convolutions and
            # element-wise ops keep the layout of their input from there on.
            out = out.contiguous(memory_format=memory_format)
        out = self.conv1(out, w_plus[:, 0], noise[0])
        skip = self.to_rgb1(out, w_plus[:, 1])
        i = 1
        for up_conv, conv, to_rgb, n1, n2 in zip(
            self.convs[::2], self.convs[1::2], self.to_rgbs, noise[1::2], noise[2::2], strict=True
        ):
            out = up_conv(out, w_plus[:, i], n1)
            out = conv(out, w_plus[:, i + 1], n2)
            skip = to_rgb(out, w_plus[:, i + 2], skip)
            i += 2
        return skip

    def forward(
        self,
        z: Tensor,
        noise: Sequence[Tensor | None] | None = None,
        truncation: float = 1.0,
        latent_avg: Tensor | None = None,
    ) -> Tensor:
        """Sample images from z (B, style_dim): the same w fed to every layer."""
        w = self.mapping(z)
        if truncation < 1.0:
            if latent_avg is None:
                raise ValueError("truncation needs latent_avg")
            w = latent_avg + truncation * (w - latent_avg)
        return self.synthesis(w.unsqueeze(1).expand(-1, self.n_latent, -1), noise)
