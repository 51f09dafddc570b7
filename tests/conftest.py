from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Data-marked tests skip with a reason when ../shared is absent (a fresh clone)."""
    if (SHARED / "data").is_dir():
        return
    skip = pytest.mark.skip(reason=f"needs the shared data sets at {SHARED} (absent)")
    for item in items:
        if "data" in item.keywords:
            item.add_marker(skip)
