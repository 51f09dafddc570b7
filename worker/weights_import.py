"""``likeness weights import``: convert an official checkpoint, store it, record it.

The converted file is in our own format (a generator checkpoint with its config,
latent average and mapping fit; an IResNet state_dict), written to a folder of
the user's (default ``$LIKENESS_DATA_DIR/weights``: large third-party weights
stay out of the repository), and entered in the weights manifest with its
sha256, its config and where it came from (file name, sha256 and format of the
source, the licence it carries). Nothing is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from likeness.errors import LikenessError
from likeness.manifest import WeightsEntry, default_manifest, load_manifest, register, sha256_file
from worker.engine.checkpoints import load_generator, save_generator
from worker.engine.face import iresnet
from worker.engine.generator import Generator
from worker.engine.import_checkpoints import (
    FORMATS,
    KIND_OF_FORMAT,
    ImportedExtractor,
    ImportedGenerator,
    read_checkpoint_file,
)
from worker.engine.mapping_fit import fit_mapping

# What each format's official files carry; recorded unless --licence says otherwise.
LICENCES = {
    "nvidia-pkl": "NVIDIA Source Code License-NC: non-commercial use only (research or evaluation)",
    "port": "not recorded in the file; weights converted from NVIDIA's StyleGAN2 "
    "(e.g. stylegan2-ffhq-config-f.pt) carry NVIDIA's Source Code License-NC "
    "(non-commercial use only)",
    "arcface": "insightface pretrained models: non-commercial research purposes only "
    "(the insightface code itself is MIT)",
}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class ImportResult:
    entry: WeightsEntry
    path: Path
    manifest_path: Path


def default_folder() -> Path:
    from likeness.settings import get_settings

    return get_settings().data_dir / "weights"


def default_name(source: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source.stem).strip("-._") or "imported"
    return name[:64]


def import_weights(
    source: str | Path,
    *,
    kind: str | None = None,
    fmt: str = "auto",
    name: str | None = None,
    into: str | Path | None = None,
    manifest_path: Path | None = None,
    default: bool = False,
    fit: bool = True,
    fit_samples: int = 100_000,
    fit_batch: int = 10_000,
    device: torch.device | str = "cpu",
    licence: str | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    manifest_path = default_manifest(manifest_path)
    source = Path(source).expanduser()
    if not source.is_file():
        raise LikenessError("weights_not_found", f"no such file: {source}", status=404)
    if kind is not None and kind not in ("generator", "extractor"):
        raise LikenessError("bad_kind", f"--kind must be generator or extractor, got '{kind}'")
    if fmt != "auto" and kind is not None and KIND_OF_FORMAT.get(fmt, kind) != kind:
        raise LikenessError(
            "bad_kind",
            f"format '{fmt}' holds a {KIND_OF_FORMAT[fmt]}, "
            f"not a{'n' if kind[0] in 'aeiou' else ''} {kind}",
        )
    name = name or default_name(source)
    if not _NAME.fullmatch(name):
        raise LikenessError(
            "bad_name",
            f"'{name}' is not a usable name (letters, digits, '.', '_' and '-', at most 64)",
        )
    if any(e.name == name for e in load_manifest(manifest_path).models) and not force:
        raise LikenessError(
            "weights_exist",
            f"{manifest_path} already has '{name}'; pass "
            "--force to replace it or --name to choose another name",
        )
    folder = Path(into).expanduser() if into is not None else default_folder()
    dest = folder / f"{name}.pt"
    if dest.exists() and dest.resolve() == source.resolve():
        raise LikenessError(
            "bad_destination", f"{dest} is the source file itself; choose another --name or --into"
        )
    if dest.exists() and not force:
        raise LikenessError("weights_exist", f"{dest} exists; pass --force to overwrite it")

    imported = read_checkpoint_file(source, fmt)
    if kind is not None and imported.kind != kind:
        raise LikenessError(
            "bad_kind",
            f"{source.name} holds a {imported.kind} "
            f"({imported.format}), not a{'n' if kind[0] in 'aeiou' else ''} "
            f"{kind}",
        )
    provenance: dict[str, Any] = {
        "source_file": source.name,
        "source_sha256": sha256_file(source),
        "source_bytes": source.stat().st_size,
        "source_format": imported.format,
        "licence": licence or LICENCES[imported.format],
        "imported_by": "likeness weights import",
        "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "notes": list(imported.notes),
    }
    if isinstance(imported, ImportedGenerator):
        config, sha256, checks = _store_generator(
            imported, dest, fit, fit_samples, fit_batch, torch.device(device), progress, provenance
        )
    else:
        config, sha256, checks = _store_extractor(imported, dest)
    provenance["checks"] = checks
    try:
        file = str(dest.resolve().relative_to(manifest_path.parent.resolve()))
    except ValueError:
        file = str(dest.resolve())
    entry = WeightsEntry(
        name=name,
        kind=imported.kind,
        file=file,
        sha256=sha256,
        default=default,
        config=config,
        provenance=provenance,
    )
    register(entry, manifest_path)
    return ImportResult(entry, dest, manifest_path)


@torch.no_grad()
def _render(generator: Generator) -> torch.Tensor:
    """One fixed sample with the stored noise (what a reload must reproduce exactly)."""
    z = torch.randn(1, generator.config.style_dim, generator=torch.Generator().manual_seed(0))
    w = generator.mapping(z).unsqueeze(1).expand(-1, generator.n_latent, -1)
    return generator.synthesis(w, generator.stored_noise())


def _store_generator(
    imported: ImportedGenerator,
    dest: Path,
    fit: bool,
    samples: int,
    batch: int,
    device: torch.device,
    progress: Callable[[int], None] | None,
    provenance: dict[str, Any],
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    generator = imported.generator
    mapping_fit = imported.mapping_fit
    if mapping_fit is not None:
        provenance["notes"].append(
            f"mapping fit kept from the source ({mapping_fit.samples} samples)"
        )
    elif fit:
        mapping_fit = fit_mapping(generator.to(device), samples, batch, progress=progress).cpu()
        generator.cpu()
    provenance["mapping_fit_samples"] = mapping_fit.samples if mapping_fit is not None else None
    provenance["latent_avg"] = imported.latent_avg is not None
    sha256 = save_generator(
        dest,
        generator,
        latent_avg=imported.latent_avg,
        mapping_fit=mapping_fit,
        extra={
            "imported_from": {
                k: provenance[k]
                for k in ("source_file", "source_sha256", "source_format", "licence")
            }
        },
    )
    reloaded = load_generator(dest)
    if reloaded.sha256 != sha256:
        raise LikenessError("weights_corrupt", f"{dest} changed while it was being written")
    image = _render(generator)
    diff = float((_render(reloaded.generator) - image).abs().max())
    if not torch.isfinite(image).all() or diff > 0:
        raise LikenessError(
            "bad_checkpoint",
            f"{dest} does not render like the imported generator (max |Δ| {diff:g})",
        )
    checks = {
        "strict_load": True,
        "reload_render_max_abs_diff": diff,
        "sample_std": round(float(image.std()), 4),
    }
    return generator.config.model_dump(), sha256, checks


def _store_extractor(
    imported: ImportedExtractor, dest: Path
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".tmp")
    torch.save({k: v.contiguous() for k, v in imported.state.items()}, tmp)
    tmp.replace(dest)
    sha256 = sha256_file(dest)
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((iresnet.load_iresnet(dest)(x) - imported.model(x)).abs().max())
    if diff > 0:
        raise LikenessError(
            "bad_checkpoint", f"{dest} does not embed like the imported backbone (max |Δ| {diff:g})"
        )
    config = {
        "architecture": "iresnet",
        "name": imported.arch,
        "layers": list(imported.layers),
        "embedding_dim": imported.embedding_dim,
        "input": {
            "height": 112,
            "width": 112,
            "template": "arcface_112",
            "normalisation": {"mean": iresnet.MEAN, "std": iresnet.STD, "range": "[0, 1] RGB"},
        },
    }
    return config, sha256, {"strict_load": True, "reload_embedding_max_abs_diff": diff}


__all__ = ["FORMATS", "LICENCES", "ImportResult", "default_folder", "import_weights"]
