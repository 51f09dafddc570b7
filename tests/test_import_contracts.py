"""The layers of .importlinter hold: the same check CI runs with `lint-imports`."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlinter.cli import EXIT_STATUS_SUCCESS, lint_imports

    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    assert (
        lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True)
        == EXIT_STATUS_SUCCESS
    )
