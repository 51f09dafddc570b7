"""Deterministic train/val/test splits by identity (torch-free).

A person's split is a pure function of their identity and a salt, so every
tool (training, evaluation, benchmarks) agrees on who is held out without
sharing a split file, and no person ever appears in two splits.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Literal

from likeness.errors import LikenessError
from likeness.labels import UTKFACE_RACES

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
DEFAULT_SALT = "likeness-v1"
# Cumulative upper bounds of the 80/10/10 split on a uniform [0, 1) draw.
_BOUNDS = (0.8, 0.9)


def unit_hash(key: str, salt: str = DEFAULT_SALT) -> float:
    """A uniform draw in [0, 1) from sha256(salt:key): stable across runs and machines."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(identity: str | int, salt: str = DEFAULT_SALT) -> Split:
    u = unit_hash(str(identity), salt)
    if u < _BOUNDS[0]:
        return "train"
    return "val" if u < _BOUNDS[1] else "test"


def read_rows(labels_csv: str | Path) -> list[dict[str, str]]:
    with open(labels_csv, newline="") as f:
        return list(csv.DictReader(f))


def members(
    labels_csv: str | Path, split: Split, column: str = "identity", salt: str = DEFAULT_SALT
) -> list[str]:
    """Member file names of ``split``, in CSV order.

    Sets without ``column`` (UTKFace has no identities) are split by file
    name: each image then stands for its own person.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = read_rows(labels_csv)
    key = column if rows and column in rows[0] else "file"
    return [r["file"] for r in rows if split_of(r[key], salt) == split]


# The hash order held-out people are taken in (not the split's salt).
ORDER_SALT = "evaluate"


def require_set(root: Path) -> None:
    for name in ("images.zip", "labels.csv"):
        if not (root / name).is_file():
            raise LikenessError(
                "data_not_found",
                f"no {root / name}: --data-root must be the folder holding "
                "celebahq/ and utkface/ in the ../shared/data format",
                status=404,
            )


def race_balanced_order(names: list[str], race: dict[str, int]) -> list[list[str]]:
    """Per race (UTKFace's five), its names in a fixed hash order."""
    by_race: list[list[str]] = [[] for _ in UTKFACE_RACES]
    for n in names:
        by_race[race[n]].append(n)
    return [sorted(group, key=lambda n: (unit_hash(n, ORDER_SALT), n)) for group in by_race]
