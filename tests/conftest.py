from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The suite's networks are tiny: on them a second thread costs more in hand-offs than it
# gains, and several times more on a busy machine. Set before torch is imported, so
# subprocesses (CLI runs, workers) inherit it too.
os.environ["OMP_NUM_THREADS"] = "1"

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


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    """Undo a --threads option an in-process command run set before this test."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
