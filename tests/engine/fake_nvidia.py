"""Synthetic NVIDIA network pickles, written the way stylegan2-ada-pytorch writes them.

NVIDIA's code is not available here, so these small ``nn.Module`` classes
rebuild its generator's *layout*: the module tree, parameter and buffer names
and shapes, plain attributes (``activation``, ``conv_clamp``, ``architecture``,
``bias_gain``, numpy ``weight_gain`` scalars, an ``EasyDict`` of init kwargs)
and its initialisation conventions (weights ``randn / lr_multiplier``, affine
biases 1). Each module pickles like a ``torch_utils.persistence`` class: a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with the module's
state and a *source code string*, which here would write a marker file if
anything ever executed it. Tensors go through torch's own ``__reduce_ex__``
(``_rebuild_tensor_v2`` / ``_rebuild_parameter`` over ``_load_from_bytes``
storages), exactly as in NVIDIA's files.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tests.engine.reference_nvidia_stylegan2 import setup_filter


def _reconstruct_persistent_obj(meta: dict) -> Any:
    raise AssertionError("the unpickler must never call NVIDIA's reconstructor")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class EasyDict(dict):
    """Stands for dnnlib.util.EasyDict (a dict subclass pickled by reference)."""


EasyDict.__module__ = "dnnlib.util"


class Network(nn.Module):
    """Pickles as NVIDIA's persistent classes do; ``module_src`` is never to be run."""

    module_src = "raise AssertionError('pickled source must never run')\n"

    def __reduce__(self) -> tuple:
        fields = list(super().__reduce__())
        fields += [None] * max(3 - len(fields), 0)
        meta = dict(
            type="class",
            version=6,
            module_src=Network.module_src,
            class_name=type(self).__name__,
            state=fields[2],
        )
        return (_reconstruct_persistent_obj, (meta,), None)


class FullyConnectedLayer(Network):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str = "linear",
        lr_multiplier: float = 1,
        bias_init: float = 0,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], np.float32(bias_init)))
        self.weight_gain = lr_multiplier / np.sqrt(in_features)
        self.bias_gain = lr_multiplier


class MappingNetwork(Network):
    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_ws: int,
        num_layers: int = 8,
        lr_multiplier: float = 0.01,
    ) -> None:
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers = num_layers
        self.w_avg_beta = 0.995
        if c_dim:
            self.embed = FullyConnectedLayer(c_dim, w_dim)
        features = [z_dim + (w_dim if c_dim else 0)] + [w_dim] * num_layers
        for i in range(num_layers):
            setattr(
                self,
                f"fc{i}",
                FullyConnectedLayer(features[i], features[i + 1], "lrelu", lr_multiplier),
            )
        self.register_buffer("w_avg", torch.zeros([w_dim]))


class SynthesisLayer(Network):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        up: int = 1,
        conv_clamp: float | None = None,
        use_noise: bool = True,
    ) -> None:
        super().__init__()
        self.resolution, self.up, self.use_noise = resolution, up, use_noise
        self.activation = "lrelu"
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter())
        self.padding = 1
        self.act_gain = np.sqrt(2)
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 3, 3]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))


class ToRGBLayer(Network):
    def __init__(
        self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None
    ) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / np.sqrt(in_channels)


class SynthesisBlock(Network):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        is_last: bool,
        architecture: str = "skip",
        conv_clamp: float | None = None,
        use_fp16: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.resolution, self.is_last = in_channels, resolution, is_last
        self.architecture, self.use_fp16, self.img_channels = architecture, use_fp16, 3
        self.register_buffer("resample_filter", setup_filter())
        self.num_conv = self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(
                in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=conv_clamp
            )
            self.num_conv += 1
        self.conv1 = SynthesisLayer(
            out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp
        )
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, 3, w_dim, conv_clamp=conv_clamp)
            self.num_torgb += 1


class SynthesisNetwork(Network):
    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        channels: dict[int, int],
        conv_clamp: float | None = None,
        architecture: str = "skip",
    ) -> None:
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, 3
        self.block_resolutions = [2**i for i in range(2, int(np.log2(img_resolution)) + 1)]
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(
                channels[res // 2] if res > 4 else 0,
                channels[res],
                w_dim,
                res,
                is_last=res == img_resolution,
                architecture=architecture,
                conv_clamp=conv_clamp,
                use_fp16=res >= img_resolution // 2,
            )
            self.num_ws += block.num_conv + (block.num_torgb if res == img_resolution else 0)
            setattr(self, f"b{res}", block)


class Generator(Network):
    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int,
        channels: dict[int, int],
        num_layers: int,
        conv_clamp: float | None = None,
        architecture: str = "skip",
    ) -> None:
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, 3
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, channels, conv_clamp, architecture)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws, num_layers)
        self._init_args = ()
        self._init_kwargs = EasyDict(
            z_dim=z_dim,
            c_dim=c_dim,
            w_dim=w_dim,
            img_resolution=img_resolution,
            img_channels=3,
            mapping_kwargs=EasyDict(num_layers=num_layers),
            synthesis_kwargs=EasyDict(conv_clamp=conv_clamp),
        )


class Discriminator(Network):
    def __init__(self) -> None:
        super().__init__()
        self.b4 = FullyConnectedLayer(8, 1)


def fake_generator(
    seed: int = 0,
    resolution: int = 32,
    w_dim: int = 32,
    num_layers: int = 3,
    channels: dict[int, int] | None = None,
    conv_clamp: float | None = None,
    c_dim: int = 0,
    architecture: str = "skip",
) -> Generator:
    """A small G_ema in NVIDIA's layout with every tensor random (zero biases would hide
    layout mistakes), in/out widths that differ (transpositions would show)."""
    torch.manual_seed(seed)
    channels = channels or {4: 32, 8: 24, 16: 16, 32: 8, 64: 8}
    g = Generator(w_dim, c_dim, w_dim, resolution, channels, num_layers, conv_clamp, architecture)
    with torch.no_grad():
        for name, t in [*g.named_parameters(), *g.named_buffers()]:
            if name.endswith("resample_filter"):
                continue
            if name.endswith(("bias", "noise_strength", "w_avg")):
                t.normal_(0, 0.3)
            if name.endswith("affine.bias"):
                t.add_(1.0)
    return g.eval().requires_grad_(False)


@contextlib.contextmanager
def nvidia_modules() -> Iterator[None]:
    """Make ``torch_utils.persistence`` and ``dnnlib.util`` importable while pickling only,
    so the stream names them; they are gone again before anything is unpickled."""
    names = ["torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"]
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}
    mods["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    mods["dnnlib.util"].EasyDict = EasyDict
    sys.modules.update(mods)
    try:
        yield
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def write_network_pickle(
    path: Path,
    g_ema: nn.Module,
    *,
    protocol: int = 4,
    marker: Path | None = None,
    extra: dict | None = None,
) -> None:
    """``{"G", "D", "G_ema", "augment_pipe", "training_set_kwargs"}`` as NVIDIA's training
    loop writes it; ``G`` differs from ``G_ema`` so picking the wrong one shows."""
    if marker is not None:
        Network.module_src = f"open({str(marker)!r}, 'w').write('the source ran')\n"
    g = fake_generator(
        seed=99,
        resolution=g_ema.img_resolution,
        w_dim=g_ema.w_dim,
        num_layers=g_ema.mapping.num_layers,
        channels={
            int(k[1:]): getattr(g_ema.synthesis, k).conv1.weight.shape[0]
            for k, _ in g_ema.synthesis.named_children()
        },
    )
    data = {
        "G": g,
        "D": Discriminator(),
        "G_ema": g_ema,
        "augment_pipe": None,
        "training_set_kwargs": EasyDict(path="ffhq.zip", resolution=g_ema.img_resolution),
        **(extra or {}),
    }
    with nvidia_modules():
        payload = pickle.dumps(data, protocol=protocol)
    path.write_bytes(payload)
