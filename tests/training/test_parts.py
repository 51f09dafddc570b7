"""Committed checkpoint parts: a stop while writing new parts keeps the old ones whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.training import parts as parts_module
from worker.training.parts import checkpoint_named, index_path, join_parts, split_into_parts


def test_a_checkpoint_is_named_by_itself_or_by_its_parts_index() -> None:
    checkpoint = Path("state") / "checkpoint.pt"
    assert checkpoint_named(checkpoint) == checkpoint
    assert checkpoint_named(index_path(checkpoint)) == checkpoint


def test_a_failed_rewrite_leaves_the_previous_parts_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    old.write_bytes(os.urandom(250))
    new.write_bytes(os.urandom(120))
    committed = tmp_path / "state" / "checkpoint.pt"
    split_into_parts(old, committed, part_bytes=100)
    assert join_parts(committed) == old.read_bytes()

    def stop(*_: object) -> None:
        raise KeyboardInterrupt  # the machine went away before anything was renamed

    monkeypatch.setattr(parts_module.os, "replace", stop)
    with pytest.raises(KeyboardInterrupt):
        split_into_parts(new, committed, part_bytes=100)
    assert join_parts(committed) == old.read_bytes()

    monkeypatch.undo()
    split_into_parts(new, committed, part_bytes=100)
    assert join_parts(committed) == new.read_bytes()
    names = sorted(p.name for p in committed.parent.glob("checkpoint.pt.part[0-9][0-9][0-9]"))
    assert names == ["checkpoint.pt.part000", "checkpoint.pt.part001"]  # the third is gone
