"""Official checkpoints → our modules, each loaded with ``strict=True``.

Three layouts are understood:

- ``port`` — the PyTorch port of StyleGAN2 (``{"g_ema": state_dict, "latent_avg": …}``,
  training files may add ``g``, ``d``, optimisers and ``args``); our own
  checkpoints are this layout too.
- ``nvidia-pkl`` — NVIDIA's stylegan2-ada-pytorch / stylegan3 network pickles
  (``{"G", "D", "G_ema", …}``) holding a StyleGAN2 generator; read by
  :mod:`worker.engine.nvidia_pickle` without NVIDIA's code, then renamed onto
  our generator (the tensors need only reshaping: both store unscaled,
  equalised-learning-rate weights and apply the same gains at run time, and
  the up-sampling convolution is the same transposed convolution + [1,3,3,1]
  FIR filter in both).
- ``arcface`` — insightface ``arcface_torch`` IResNet ``backbone.pth`` files
  (a plain state_dict whose names are already ours).

Nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from likeness.errors import LikenessError
from worker.engine.checkpoints import infer_config
from worker.engine.face import iresnet
from worker.engine.generator import Generator, GeneratorConfig, make_kernel
from worker.engine.mapping_fit import MappingFit
from worker.engine.nvidia_pickle import class_name, is_module, module_tree, restricted_load

FORMATS = ("port", "nvidia-pkl", "arcface")
KIND_OF_FORMAT = {"port": "generator", "nvidia-pkl": "generator", "arcface": "extractor"}

_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (pre-1.6, non-zip) files start with this pickled magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


@dataclass
class ImportedGenerator:
    generator: Generator
    latent_avg: Tensor | None
    format: str
    mapping_fit: MappingFit | None = None
    notes: list[str] = field(default_factory=list)
    kind: str = "generator"


@dataclass
class ImportedExtractor:
    model: iresnet.IResNet
    state: dict[str, Tensor]
    layers: tuple[int, int, int, int]
    embedding_dim: int
    format: str = "arcface"
    notes: list[str] = field(default_factory=list)
    kind: str = "extractor"

    @property
    def arch(self) -> str:
        return iresnet.name_of(self.layers) or "iresnet-" + "-".join(map(str, self.layers))


# ------------------------------------------------------------------ entry points


def read_checkpoint_file(
    path: str | Path, fmt: str = "auto"
) -> ImportedGenerator | ImportedExtractor:
    """Read ``path`` in format ``fmt`` (``auto`` looks at the bytes and the keys)."""
    path = Path(path)
    if fmt not in ("auto", *FORMATS):
        raise LikenessError(
            "unknown_format", f"unknown format '{fmt}'; use auto, {', '.join(FORMATS)}"
        )
    container = sniff(path)
    if fmt == "nvidia-pkl" or (fmt == "auto" and container == "pickle"):
        return read_nvidia_pkl(path)
    if container != "torch":
        raise LikenessError(
            "unknown_format", f"{path} is not a torch checkpoint (.pt/.pth), so not '{fmt}'"
        )
    ckpt = _torch_load(path)
    if fmt == "auto":
        fmt = _torch_layout(ckpt, path)
    if fmt == "port":
        return generator_from_port(ckpt, str(path))
    return extractor_from_arcface(ckpt, str(path))


def read_port_pt(path: str | Path) -> ImportedGenerator:
    return generator_from_port(_torch_load(Path(path)), str(path))


def read_nvidia_pkl(path: str | Path) -> ImportedGenerator:
    data = restricted_load(path)
    return generator_from_nvidia(_pick_generator(data, str(path)), str(path))


def read_arcface_pth(path: str | Path) -> ImportedExtractor:
    return extractor_from_arcface(_torch_load(Path(path)), str(path))


def sniff(path: Path) -> str:
    """``"torch"`` (torch.save, zip or legacy), ``"pickle"`` (a plain pickle) or ``"unknown"``."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_TORCH_MAGIC))
    except FileNotFoundError:
        raise LikenessError("weights_not_found", f"no such file: {path}", status=404) from None
    except IsADirectoryError:
        raise LikenessError("weights_not_found", f"{path} is a folder, not a file") from None
    if head.startswith(_ZIP_MAGIC) or head == _LEGACY_TORCH_MAGIC:
        return "torch"
    if head[:1] == b"\x80":  # pickle protocol 2+
        return "pickle"
    return "unknown"


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise LikenessError("weights_not_found", f"no such file: {path}", status=404)
    try:
        # Training checkpoints of the port also pickle their argparse options.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad or unsafe file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LikenessError(
            "bad_checkpoint", f"cannot read {path} with torch.load: {first}"
        ) from None


def _torch_layout(ckpt: Any, path: Path) -> str:
    if isinstance(ckpt, dict) and "g_ema" in ckpt:
        return "port"
    state = _unwrap_state(ckpt)
    if (
        state is not None
        and "conv1.weight" in state
        and any(k.startswith("layer1.") for k in state)
    ):
        return "arcface"
    keys = ", ".join(list(ckpt)[:5]) if isinstance(ckpt, dict) else type(ckpt).__name__
    raise LikenessError(
        "unknown_format",
        f"{path} is neither a StyleGAN2 port checkpoint (no 'g_ema') nor an arcface_torch "
        f"IResNet state_dict (found: {keys}); pass --format to say which it is",
    )


# ------------------------------------------------------------------ shared checks


def _few(names: list[str], n: int = 4) -> str:
    more = f", … (+{len(names) - n})" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_state(expected: dict[str, Tensor], got: dict[str, Tensor], source: str) -> None:
    """Same names and shapes, or one error that lists what differs."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k} {tuple(got[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in got and got[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_few(shapes, 2)}")
    if problems:
        raise LikenessError("bad_checkpoint", f"{source}: " + "; ".join(problems))


def _float(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def strict_generator(config: GeneratorConfig, state: dict[str, Tensor], source: str) -> Generator:
    generator = Generator(config)
    check_state(generator.state_dict(), state, source)
    generator.load_state_dict(_float(state), strict=True)
    return generator.eval().requires_grad_(False)


# ------------------------------------------------------------------ the port's .pt


def generator_from_port(ckpt: Any, source: str) -> ImportedGenerator:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("g_ema"), dict):
        raise LikenessError("bad_checkpoint", f"{source} has no 'g_ema' generator state_dict")
    state = ckpt["g_ema"]
    notes = []
    if "config" in ckpt:
        config = GeneratorConfig(**ckpt["config"])
    else:
        config = infer_config(state)
        notes.append("config inferred from tensor shapes (mapping lr multiplier 0.01 assumed)")
    generator = strict_generator(config, state, source)
    latent_avg = ckpt.get("latent_avg")
    if latent_avg is not None:
        latent_avg = latent_avg.float().reshape(-1)
        if latent_avg.numel() != config.style_dim:
            raise LikenessError(
                "bad_checkpoint",
                f"{source}: latent_avg has "
                f"{latent_avg.numel()} values, expected {config.style_dim}",
            )
    fit = MappingFit.from_dict(ckpt["mapping_fit"]) if "mapping_fit" in ckpt else None
    dropped = sorted(k for k in ckpt if k not in ("g_ema", "latent_avg", "config", "mapping_fit"))
    if dropped:
        notes.append(f"not imported: {', '.join(dropped)}")
    return ImportedGenerator(generator, latent_avg, "port", mapping_fit=fit, notes=notes)


# ------------------------------------------------------------------ NVIDIA's .pkl


def _pick_generator(data: Any, source: str) -> Any:
    values = (
        list(data.values())
        if isinstance(data, dict)
        else (list(data) if isinstance(data, tuple | list) else [data])
    )
    if any(class_name(v).startswith("dnnlib.tflib") for v in values):
        raise LikenessError(
            "unsupported_checkpoint",
            f"{source} is a TensorFlow-era StyleGAN2 pickle; convert it first with NVIDIA's "
            "stylegan2-ada-pytorch `python legacy.py --source=<it> --dest=<new>.pkl`, or use "
            "the PyTorch ffhq.pkl",
        )
    if isinstance(data, dict):
        if "G_ema" in data and is_module(data["G_ema"]):
            return data["G_ema"]
        keys = ", ".join(map(str, list(data)[:6]))
        raise LikenessError(
            "bad_checkpoint", f"{source} has no 'G_ema' generator network (found: {keys})"
        )
    if is_module(data):
        return data
    raise LikenessError("bad_checkpoint", f"{source} is not an NVIDIA network pickle")


def _nvidia_filter() -> Tensor:
    """upfirdn2d.setup_filter([1, 3, 3, 1]): the outer product, normalised to sum 1."""
    return make_kernel([1, 3, 3, 1])


def generator_from_nvidia(network: Any, source: str) -> ImportedGenerator:
    """An unpickled (stubbed) NVIDIA ``Generator`` → our generator with the same function."""
    tree = module_tree(network)
    sd, attrs = tree.tensors, tree.attributes

    def fail(message: str) -> LikenessError:
        return LikenessError("unsupported_checkpoint", f"{source}: {message}")

    if any(k.startswith("synthesis.input.") or re.match(r"synthesis\.L\d+_", k) for k in sd):
        raise fail(
            "a StyleGAN3 (alias-free) generator, a different architecture from "
            "StyleGAN2; import a StyleGAN2 pickle such as stylegan2-ffhq-1024x1024.pkl"
        )
    if "mapping.fc0.weight" not in sd or "synthesis.b4.const" not in sd:
        raise LikenessError(
            "bad_checkpoint",
            f"{source}: G_ema is not a StyleGAN2 generator "
            "(no mapping.fc0.weight or synthesis.b4.const)",
        )
    if any(k.startswith("mapping.embed.") for k in sd):
        raise fail(
            "a class-conditional generator (mapping.embed); only unconditional ones can be searched"
        )

    n_mlp = len([k for k in sd if re.fullmatch(r"mapping\.fc\d+\.weight", k)])
    style_dim = sd["mapping.fc0.weight"].shape[1]
    for i in range(n_mlp):
        shape = tuple(sd[f"mapping.fc{i}.weight"].shape)
        if shape != (style_dim, style_dim):
            raise fail(
                f"mapping.fc{i}.weight is {shape}; z, w and the mapping's width must "
                f"all be {style_dim}"
            )
        if attrs.get(f"mapping.fc{i}", {}).get("activation", "lrelu") != "lrelu":
            raise fail(f"mapping.fc{i} does not use the leaky ReLU")
    lr_mlp = attrs.get("mapping.fc0", {}).get("bias_gain", 0.01)
    lr_mlp = float(lr_mlp) if isinstance(lr_mlp, int | float) else 0.01

    resolutions = sorted(
        int(m.group(1)) for k in sd if (m := re.fullmatch(r"synthesis\.b(\d+)\.conv1\.weight", k))
    )
    expected_res = [2**i for i in range(2, int(math.log2(max(resolutions))) + 1)]
    if resolutions != expected_res:
        raise fail(f"synthesis blocks {resolutions} are not 4, 8, …, a power of two")
    for res in resolutions:
        block = f"synthesis.b{res}"
        arch = attrs.get(block, {}).get("architecture", "skip")
        if arch != "skip" or f"{block}.torgb.weight" not in sd:
            raise fail(
                f"{block} has the '{arch}' architecture; our generator is the 'skip' "
                "one (every block has a ToRGB)"
            )
        if f"{block}.torgb.weight" in sd and sd[f"{block}.torgb.weight"].shape[0] != 3:
            raise fail("the generator does not output RGB images")
    for key, value in sd.items():
        if key.endswith("resample_filter") and (
            value.shape != (4, 4) or not torch.allclose(value.float(), _nvidia_filter())
        ):
            raise fail(f"{key} is not the [1, 3, 3, 1] filter")

    layer_names = [p for p, c in tree.classes.items() if c in ("SynthesisLayer", "ToRGBLayer")]
    clamps = {attrs[p].get("conv_clamp") for p in layer_names}
    if len(clamps) > 1:
        raise fail(f"layers clamp their outputs differently ({sorted(map(str, clamps))})")
    conv_clamp = clamps.pop() if clamps else None
    if any(
        attrs[p].get("activation", "lrelu") != "lrelu"
        for p in layer_names
        if tree.classes[p] == "SynthesisLayer"
    ):
        raise fail("a synthesis layer does not use the leaky ReLU")

    channels = [sd["synthesis.b4.const"].shape[0]]
    channels += [sd[f"synthesis.b{r}.conv0.weight"].shape[0] for r in resolutions[1:]]
    config = GeneratorConfig(
        resolution=resolutions[-1],
        style_dim=style_dim,
        n_mlp=n_mlp,
        channels=channels,
        lr_mlp=lr_mlp,
        conv_clamp=float(conv_clamp) if conv_clamp is not None else None,
    )
    target = Generator(config).state_dict()
    out: dict[str, Tensor] = {k: v for k, v in target.items() if k.endswith(".kernel")}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in sd:
            raise LikenessError("bad_checkpoint", f"{source}: missing tensor {key}")
        used.add(key)
        return sd[key]

    for i in range(n_mlp):
        out[f"style.{i + 1}.weight"] = take(f"mapping.fc{i}.weight")
        out[f"style.{i + 1}.bias"] = take(f"mapping.fc{i}.bias")
    out["input.input"] = take("synthesis.b4.const").unsqueeze(0)

    def modulated(src: str, dst: str) -> None:
        out[f"{dst}.conv.weight"] = take(f"{src}.weight").unsqueeze(0)
        out[f"{dst}.conv.modulation.weight"] = take(f"{src}.affine.weight")
        out[f"{dst}.conv.modulation.bias"] = take(f"{src}.affine.bias")

    def synthesis_layer(src: str, dst: str, noise_index: int) -> None:
        modulated(src, dst)
        out[f"{dst}.activate.bias"] = take(f"{src}.bias")
        size = 2 ** ((noise_index + 5) // 2)
        if f"{src}.noise_strength" in sd:
            out[f"{dst}.noise.weight"] = take(f"{src}.noise_strength").reshape(1)
            out[f"noises.noise_{noise_index}"] = take(f"{src}.noise_const").reshape(
                1, 1, size, size
            )
        else:  # use_noise=False: no noise at all
            out[f"{dst}.noise.weight"] = torch.zeros(1)
            out[f"noises.noise_{noise_index}"] = torch.zeros(1, 1, size, size)

    def to_rgb(src: str, dst: str) -> None:
        modulated(src, dst)
        out[f"{dst}.bias"] = take(f"{src}.bias").reshape(1, -1, 1, 1)

    synthesis_layer("synthesis.b4.conv1", "conv1", 0)
    to_rgb("synthesis.b4.torgb", "to_rgb1")
    for j, res in enumerate(resolutions[1:]):
        synthesis_layer(f"synthesis.b{res}.conv0", f"convs.{2 * j}", 2 * j + 1)
        synthesis_layer(f"synthesis.b{res}.conv1", f"convs.{2 * j + 1}", 2 * j + 2)
        to_rgb(f"synthesis.b{res}.torgb", f"to_rgbs.{j}")

    latent_avg = sd.get("mapping.w_avg")
    left = sorted(
        k
        for k in sd
        if k not in used and not k.endswith("resample_filter") and k != "mapping.w_avg"
    )
    if left:
        raise fail(f"{len(left)} tensor(s) have no place in a StyleGAN2 generator: {_few(left)}")
    generator = strict_generator(config, out, source)
    notes = [
        f"NVIDIA {tree.classes.get('', 'Generator')} G_ema, {resolutions[-1]} px, "
        f"{n_mlp}-layer mapping (lr multiplier {lr_mlp:g})"
    ]
    if conv_clamp is not None:
        notes.append(f"conv outputs clamped to ±{conv_clamp:g}, as in NVIDIA's network")
    if latent_avg is None:
        notes.append("no mapping.w_avg: truncation needs a latent average computed separately")
    return ImportedGenerator(
        generator,
        latent_avg.float().clone() if latent_avg is not None else None,
        "nvidia-pkl",
        notes=notes,
    )


# ------------------------------------------------------------------ arcface_torch's .pth


def _unwrap_state(obj: Any) -> dict[str, Tensor] | None:
    """A state_dict, possibly inside ``{"state_dict": …}`` and with DataParallel's ``module.``."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "backbone"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        return None
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def extractor_from_arcface(ckpt: Any, source: str) -> ImportedExtractor:
    state = _unwrap_state(ckpt)
    if state is None:
        raise LikenessError("bad_checkpoint", f"{source} is not a state_dict of tensors")
    try:
        layers = iresnet.layers_of(state)
    except ValueError as e:
        raise LikenessError("bad_checkpoint", f"{source}: {e}") from None
    if "fc.weight" not in state:
        raise LikenessError("bad_checkpoint", f"{source}: missing tensor fc.weight")
    dim = int(state["fc.weight"].shape[0])
    model = iresnet.IResNet(layers, num_features=dim)
    check_state(model.state_dict(), state, source)
    state = _float(state)
    model.load_state_dict(state, strict=True)
    notes = [f"IResNet {iresnet.name_of(layers) or layers}, {dim}-d embedding"]
    return ImportedExtractor(model.eval().requires_grad_(False), state, layers, dim, notes=notes)
