from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deploy: builds the Docker images and runs the compose stack; needs a Docker engine "
        "and LIKENESS_DEPLOY_TEST=1 (.ci/deploy), skipped otherwise",
    )
