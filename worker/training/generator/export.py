"""What a run leaves behind: G_ema with its mean w and mapping fit, and a sample grid."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from worker.engine.checkpoints import save_generator
from worker.engine.generator import Generator
from worker.engine.mapping_fit import fit_mapping
from worker.training.generator.config import GENERATOR_NAME, GRID_COLUMNS, GRID_ROWS
from worker.training.generator.state import TrainState
from worker.training.generator.vae import (
    CodeMoments,
    encoded_codes,
    set_mapping_to_gaussian,
)
from worker.training.images_zip import (
    ImagesZip,
    read_member_list,
)


@torch.no_grad()
def mean_w(G: Generator, samples: int, seed: int = 0, chunk: int = 10_000) -> Tensor:
    """Mean of mapping(z) over ``samples`` z; own RNG so training draws are untouched."""
    device = next(G.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    total, done = torch.zeros(G.config.style_dim, dtype=torch.float64, device=device), 0
    while done < samples:
        n = min(chunk, samples - done)
        total += G.mapping(torch.randn(n, G.config.style_dim, generator=rng).to(device)).sum(0)
        done += n
    return (total / done).float()


@torch.no_grad()
def sample_grid(
    G: Generator, seed: int, columns: int = GRID_COLUMNS, rows: int = GRID_ROWS
) -> Image.Image:
    """A fixed-latent grid (no truncation, the stored noise): the same faces every time."""
    device = next(G.parameters()).device
    z = torch.randn(
        columns * rows, G.config.style_dim, generator=torch.Generator().manual_seed(seed)
    ).to(device)
    images = torch.cat([G(chunk, noise=G.stored_noise()) for chunk in z.split(8)])
    images = images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    r = G.config.resolution
    grid = (
        images.view(rows, columns, 3, r, r).permute(0, 3, 1, 4, 2).reshape(rows * r, columns * r, 3)
    )
    return Image.fromarray(grid.numpy())


def exported_generator(state: TrainState) -> Generator:
    """G_ema as it ships: for the vae objectives, with the mapping set to the
    Gaussian of the encoded faces (worker/training/generator/vae.py explains why): of the
    ``prior_members`` when given, else of the training batches seen lately."""
    c = state.config
    codes = state.codes
    if state.E is not None and c.prior_members is not None and c.data is not None:
        faces = ImagesZip(c.data, c.resolution, members=read_member_list(c.prior_members))
        # its own generator: otherwise creating the iterator draws from the run's RNG
        loader = DataLoader(faces, batch_size=64, generator=torch.Generator().manual_seed(c.seed))
        images = (real for real, _ in loader)
        codes = CodeMoments.exact(encoded_codes(state.E, state.G, images, c.seed))
    if codes is None or codes.weight <= 0:
        return state.G_ema
    G = copy.deepcopy(state.G_ema)
    set_mapping_to_gaussian(G, *codes.gaussian())
    return G


def export(state: TrainState, out: Path, G: Generator | None = None) -> dict[str, str]:
    """``g_ema.pt`` in the engine's layout (with latent_avg and a mapping fit) and a grid PNG;
    ``G``: the exported generator, when the caller has it already."""
    c = state.config
    G = G if G is not None else exported_generator(state)
    latent_avg = mean_w(G, c.latent_avg_samples, seed=c.seed)
    fit = fit_mapping(G, samples=c.latent_avg_samples, batch=10_000, seed=c.seed)
    extra = {
        "train": {
            "kimg": state.kimg,
            "step": state.step,
            "train_seconds": state.train_seconds,
            "device_seconds": state.device_seconds,
            "data": str(c.data or "synthetic"),
        }
    }
    save_generator(out / GENERATOR_NAME, G, latent_avg=latent_avg, mapping_fit=fit, extra=extra)
    grid_path = out / f"samples_kimg{int(state.kimg):04d}.png"
    tmp = grid_path.with_name(grid_path.name + ".tmp")
    sample_grid(G, c.grid_seed).save(tmp, format="PNG")
    os.replace(tmp, grid_path)
    return {"generator": str(out / GENERATOR_NAME), "grid": str(grid_path)}
