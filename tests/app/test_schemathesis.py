"""Property-based fuzzing of every documented endpoint: whatever the input, no 5xx."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from app.main import create_app
from likeness.jobs.sqlite_store import SQLiteJobStore
from likeness.settings import Settings

STORE: list[SQLiteJobStore] = []


def build_schema(tmp: Path):  # type: ignore[no-untyped-def]
    store = SQLiteJobStore(tmp / "jobs.sqlite3")
    STORE.append(store)
    app = create_app(Settings(data_dir=tmp, store=f"sqlite:///{tmp / 'jobs.sqlite3'}"), store=store)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return build_schema(tmp_path_factory.mktemp("fuzz"))


@schema.parametrize()
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_no_server_errors(case) -> None:  # type: ignore[no-untyped-def]
    from schemathesis.checks import not_a_server_error

    # /readyz answers 503 by design without a worker; fuzz it in the ready state.
    STORE[-1].record_worker_heartbeat("fuzz-worker")
    case.call_and_validate(checks=[not_a_server_error])
