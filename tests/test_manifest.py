"""What ships in git: every manifest entry's file is there and matches its sha256;
committed training state joins to the checkpoint its index describes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from likeness.manifest import BUNDLED_MANIFEST_PATH, entry_path, load_manifest, sha256_file

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_LIMIT_BYTES = 40 * 2**20


def test_every_bundled_file_matches_its_sha256() -> None:
    entries = load_manifest().models
    assert entries, "the manifest lists at least the face detector"
    names = [e.name for e in entries]
    assert len(names) == len(set(names)), "one entry per name: a new version replaces the old"
    for e in entries:
        path = entry_path(e, BUNDLED_MANIFEST_PATH)
        assert path.is_file(), f"{e.name}: {path} is missing"
        assert sha256_file(path) == e.sha256, f"{e.name}: {path} does not match its sha256"


def test_bundled_weights_stay_small() -> None:
    total = sum(p.stat().st_size for p in BUNDLED_MANIFEST_PATH.parent.rglob("*") if p.is_file())
    assert total <= BUNDLED_LIMIT_BYTES, f"weights/ holds {total / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    "index",
    sorted(ROOT.glob("training_state/**/*.parts.json")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_committed_training_state_is_whole(index: Path) -> None:
    from worker.training.parts import checkpoint_named, join_parts

    checkpoint = checkpoint_named(index)
    described = json.loads(index.read_text())
    assert len(join_parts(checkpoint)) == described["bytes"]  # every sha256 checked inside
