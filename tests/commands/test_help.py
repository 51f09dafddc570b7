"""Every command's help: no type labels, one default style, no internal wording."""

from __future__ import annotations

import contextlib
import io
import re
from typing import Any

import pytest

from cli.main import build_command
from worker.evaluation.config import EvalConfig


def command_paths(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [path]
    for name, sub in getattr(command, "commands", {}).items():
        paths += command_paths(sub, (*path, name))
    return paths


PATHS = command_paths(build_command())


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) or "likeness" for p in PATHS])
def test_help_has_no_type_labels_one_default_style_and_no_internal_words(
    path: tuple[str, ...],
) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        build_command().main(args=[*path, "--help"], prog_name="likeness", standalone_mode=False)
    text = out.getvalue()
    assert "Usage: likeness" in text
    assert not re.search(r"<(bool|int|float|str|path|list\[[a-z]+\])>", text), text
    assert "[default:" not in text and "Default:" not in text
    assert not re.search(r"\bissue \d|\bsession\b", text)


def test_evaluate_writes_under_the_working_folder_not_the_repository_docs() -> None:
    out = EvalConfig().out
    assert not out.is_absolute() and out.parts[0] == "runs" and "docs" not in out.parts
