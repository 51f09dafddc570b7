from __future__ import annotations

import pytest
import torch

from tests.tiny_models import random_extractor
from worker.engine.face.extractor import FaceExtractor


@pytest.fixture(scope="module")
def extractor() -> FaceExtractor:
    torch.manual_seed(0)
    return random_extractor()
