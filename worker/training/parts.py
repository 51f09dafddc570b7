"""A training checkpoint as parts small enough to commit (≤ 15 MiB each).

Git hosts refuse large files, and a CPU-trained generator has to carry its
full state (G, D, EMA, optimisers, RNG) from one run to the next. The
bytes are split verbatim, with an index holding every part's sha256, so the
joined file is the very checkpoint that was saved: resuming stays exact.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from likeness.errors import LikenessError

PART_BYTES = 15 * 2**20
INDEX_SUFFIX = ".parts.json"


def index_path(checkpoint: Path) -> Path:
    """``<dir>/checkpoint.pt`` → ``<dir>/checkpoint.pt.parts.json``."""
    return checkpoint.with_name(checkpoint.name + INDEX_SUFFIX)


def checkpoint_named(path: Path) -> Path:
    """The checkpoint a path names, given as the checkpoint itself or as its parts' index."""
    return path.with_name(path.name.removesuffix(INDEX_SUFFIX))


def has_parts(checkpoint: Path) -> bool:
    return index_path(checkpoint).is_file()


def split_into_parts(source: Path, checkpoint: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """Write ``source`` as ``<checkpoint>.partNNN`` files plus the index; stale parts of
    an earlier, longer version are removed (a new version replaces the old). Everything is
    written under temporary names first and renamed into place at the end, so a stop
    while writing leaves the previous parts whole."""
    data = source.read_bytes()
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    parts, staged = [], []
    for i, start in enumerate(range(0, max(len(data), 1), part_bytes)):
        path = checkpoint.with_name(f"{checkpoint.name}.part{i:03d}")
        chunk = data[start : start + part_bytes]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(chunk)
        staged.append((tmp, path))
        parts.append(
            {"file": path.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()}
        )
    index = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "parts": parts}
    index_tmp = index_path(checkpoint).with_name(index_path(checkpoint).name + ".tmp")
    index_tmp.write_text(json.dumps(index, indent=2) + "\n")
    for tmp, path in staged:
        os.replace(tmp, path)
    os.replace(index_tmp, index_path(checkpoint))
    keep = {path.name for _, path in staged}
    for old in checkpoint.parent.glob(checkpoint.name + ".part[0-9][0-9][0-9]"):
        if old.name not in keep:
            old.unlink()
    return [path for _, path in staged]


def join_parts(checkpoint: Path) -> bytes:
    """The checkpoint's bytes from its parts, every part and the whole checked."""
    index = json.loads(index_path(checkpoint).read_text())
    chunks = []
    for part in index["parts"]:
        path = checkpoint.with_name(part["file"])
        if not path.is_file():
            raise LikenessError("bad_checkpoint", f"{path} is missing (a part of {checkpoint})")
        chunk = path.read_bytes()
        if hashlib.sha256(chunk).hexdigest() != part["sha256"]:
            raise LikenessError(
                "bad_checkpoint",
                f"{path} does not match its sha256 in {index_path(checkpoint).name}",
            )
        chunks.append(chunk)
    data = b"".join(chunks)
    if hashlib.sha256(data).hexdigest() != index["sha256"]:
        raise LikenessError("bad_checkpoint", f"the joined parts of {checkpoint} do not match")
    return data
