from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.service.helpers import Service, redis_unreachable
from worker.engine.checkpoints import save_generator
from worker.engine.generator import Generator, GeneratorConfig
from worker.engine.mapping_fit import fit_mapping

REDIS_SKIP = redis_unreachable()
STORE_KINDS = [
    "sqlite",
    pytest.param("redis", marks=pytest.mark.skipif(bool(REDIS_SKIP), reason=REDIS_SKIP or "")),
]


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32-px generator with its mapping fit: what LIKENESS_GENERATOR points workers at."""
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.manual_seed(0)
    g = Generator(GeneratorConfig.slim(32, channel_max=32, channel_base=512, style_dim=32, n_mlp=2))
    save_generator(path, g, mapping_fit=fit_mapping(g, 5000))
    return path


@pytest.fixture
def make_service(
    tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Service]]:
    """Services on fresh stores; their worker subprocesses are killed at teardown."""
    made: list[Service] = []

    def make(kind: str) -> Service:
        service = Service(kind, tmp_path_factory.mktemp(f"service-{kind}"), tiny_weights)
        made.append(service)
        return service

    yield make
    for service in made:
        service.close()
