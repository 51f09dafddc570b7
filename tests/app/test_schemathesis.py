"""Property-based fuzzing of every documented endpoint: whatever the input, no 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.specs.openapi.schemas import OpenApiSchema

from app.main import create_app
from likeness.jobs.sqlite_store import SQLiteJobStore
from likeness.settings import Settings

FUZZ_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpenApiSchema, SQLiteJobStore]]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    store = SQLiteJobStore(tmp / "jobs.sqlite3")
    app = create_app(Settings(data_dir=tmp, store=f"sqlite:///{tmp / 'jobs.sqlite3'}"), store=store)
    yield schemathesis.openapi.from_asgi("/openapi.json", app), store
    store.close()


# Driven through schemathesis's Hypothesis strategies rather than its pytest plugin
# (``schema.parametrize``): the plugin renames pytest's test items through private node-id
# attributes that pytest 9.2 no longer has, so its tests fail or lose their names there.
def test_no_server_errors(
    api: tuple[OpenApiSchema, SQLiteJobStore], subtests: pytest.Subtests
) -> None:
    schema, store = api
    labels = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()
        labels.append(operation.label)
        # Valid and invalid requests alike, as the plugin generates by default.
        cases = st.one_of(*(operation.as_strategy(mode) for mode in GenerationMode))

        @FUZZ_SETTINGS
        @given(case=cases)
        def fuzz(case: Case) -> None:
            # /readyz answers 503 by design without a worker; fuzz it in the ready state.
            store.record_worker_heartbeat("fuzz-worker")
            case.call_and_validate(checks=[not_a_server_error])

        with subtests.test(operation.label):
            fuzz()
    # An empty or unreadable schema would otherwise pass without sending a request.
    assert "POST /upscale" in labels
