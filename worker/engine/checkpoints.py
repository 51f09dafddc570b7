"""Reading and writing generator checkpoints in the PyTorch port's layout.

A checkpoint is ``{"g_ema": state_dict, "latent_avg": tensor}``; ours add
``"config"`` (a GeneratorConfig dict) and ``"mapping_fit"``. Files from the port
carry neither: the config is inferred from tensor shapes, and the mapping fit
comes from a sidecar ``<file>.fit.pt`` written by ``likeness weights fit-mapping``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from likeness.errors import LikenessError
from likeness.manifest import sha256_file
from worker.engine.generator import Generator, GeneratorConfig
from worker.engine.mapping_fit import MappingFit
from worker.engine.search import SearchConfig


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write through a temporary file, so a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


@dataclass
class LoadedGenerator:
    generator: Generator
    latent_avg: Tensor | None
    mapping_fit: MappingFit | None
    path: Path
    sha256: str
    # SearchConfig fields measured to suit this generator (its manifest entry's "search")
    search_defaults: dict[str, Any] = field(default_factory=dict)

    def search_config(self, **options: Any) -> SearchConfig:
        """PULSE's defaults, then this generator's, then ``options`` (None: not given)."""
        given = {k: v for k, v in options.items() if v is not None}
        return SearchConfig.model_validate(self.search_defaults | given)


def infer_config(state: dict[str, Tensor], lr_mlp: float = 0.01) -> GeneratorConfig:
    """Recover the generator's shapes from a state_dict (lr_mlp is not in the tensors)."""
    try:
        style_dim = state["style.1.weight"].shape[1]
        n_mlp = len({k.split(".")[1] for k in state if re.match(r"style\.\d+\.weight$", k)})
        n_rgbs = len({k.split(".")[1] for k in state if re.match(r"to_rgbs\.\d+\.", k)})
        widths = [state["input.input"].shape[1]]
        widths += [state[f"convs.{2 * i}.conv.weight"].shape[1] for i in range(n_rgbs)]
        kernel = state["convs.0.conv.blur.kernel"] if n_rgbs else None
    except KeyError as e:
        raise LikenessError(
            "bad_checkpoint", f"not a StyleGAN2 generator state_dict (missing {e.args[0]})"
        ) from None
    blur = [1, 3, 3, 1]
    if kernel is not None and kernel.shape[0] != 4:
        raise LikenessError("bad_checkpoint", f"unsupported blur kernel size {kernel.shape[0]}")
    return GeneratorConfig(
        resolution=4 * 2**n_rgbs,
        style_dim=style_dim,
        n_mlp=n_mlp,
        channels=widths,
        lr_mlp=lr_mlp,
        blur_kernel=blur,
    )


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LikenessError("weights_not_found", f"no such weights file: {path}", status=404)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise LikenessError("bad_checkpoint", f"cannot read {path}: {e}") from None
    if not isinstance(ckpt, dict) or "g_ema" not in ckpt:
        raise LikenessError("bad_checkpoint", f"{path} has no 'g_ema' generator state_dict")
    return ckpt


def fit_sidecar(path: str | Path) -> Path:
    return Path(str(path) + ".fit.pt")


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> LoadedGenerator:
    """Load a generator checkpoint (ours or the port's) with ``strict=True``."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    state = ckpt["g_ema"]
    config = GeneratorConfig(**ckpt["config"]) if "config" in ckpt else infer_config(state)
    generator = Generator(config)
    generator.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    generator.eval().requires_grad_(False).to(device)
    fit = None
    if "mapping_fit" in ckpt:
        fit = MappingFit.from_dict(ckpt["mapping_fit"])
    elif fit_sidecar(path).is_file():
        fit = MappingFit.from_dict(torch.load(fit_sidecar(path), weights_only=True))
    latent_avg = ckpt.get("latent_avg")
    return LoadedGenerator(
        generator=generator,
        latent_avg=latent_avg.float().to(device) if latent_avg is not None else None,
        mapping_fit=fit.to(device) if fit is not None else None,
        path=path,
        sha256=sha256_file(path),
    )


def save_generator(
    path: str | Path,
    generator: Generator,
    *,
    latent_avg: Tensor | None = None,
    mapping_fit: MappingFit | None = None,
    half: bool = False,
    extra: dict | None = None,
) -> str:
    """Write the port's layout plus our config; returns the file's sha256."""
    state = {
        k: (v.half() if half and v.is_floating_point() else v).cpu().clone()
        for k, v in generator.state_dict().items()
    }
    ckpt: dict = {"g_ema": state, "config": generator.config.model_dump()}
    if latent_avg is not None:
        ckpt["latent_avg"] = latent_avg.detach().cpu()
    if mapping_fit is not None:
        ckpt["mapping_fit"] = mapping_fit.to_dict()
    if extra:
        ckpt.update(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return sha256_file(path)
