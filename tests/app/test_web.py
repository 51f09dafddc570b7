"""The web page and GET /labels, through the app in-process (no worker, no browser)."""

from __future__ import annotations

import warnings
from pathlib import Path

from app.labels import DEFAULT_ATTRIBUTES, DEFAULT_RACES
from app.main import create_app
from likeness.settings import Settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette prefers the httpx2 fork; httpx works the same
    from fastapi.testclient import TestClient


def make_client(tmp_path: Path, **overrides: object) -> TestClient:
    values: dict[str, object] = {
        "data_dir": tmp_path,
        "store": f"sqlite:///{tmp_path / 'jobs.sqlite3'}",
        "weights_dir": tmp_path / "weights",  # no manifest: the default label lists
        "api_keys": [],
    }
    values.update(overrides)
    return TestClient(create_app(Settings(**values)))  # type: ignore[arg-type]


def test_the_page_and_its_assets_are_served_with_their_content_types(tmp_path: Path) -> None:
    with make_client(tmp_path) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "/static/app.js" in page.text and "/static/style.css" in page.text
        js = client.get("/static/app.js")
        assert js.status_code == 200
        js_type = js.headers["content-type"].split(";")[0]
        assert js_type in ("text/javascript", "application/javascript")
        css = client.get("/static/style.css")
        assert css.status_code == 200
        assert css.headers["content-type"].startswith("text/css")
        assert client.get("/static/nope.js").status_code == 404


def test_the_page_is_not_part_of_the_api_schema_but_labels_are(tmp_path: Path) -> None:
    with make_client(tmp_path) as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert "get" in paths["/labels"]


def test_labels_lists_the_default_names(tmp_path: Path) -> None:
    with make_client(tmp_path) as client:
        r = client.get("/labels")
    assert r.status_code == 200
    body = r.json()
    assert body["races"] == list(DEFAULT_RACES)
    assert body["attributes"] == list(DEFAULT_ATTRIBUTES)
    assert body["source"] == "defaults"


def test_labels_need_a_key_when_keys_are_set_but_the_page_does_not(tmp_path: Path) -> None:
    with make_client(tmp_path, api_keys=["k1"]) as client:
        assert client.get("/labels").status_code == 401
        assert client.get("/labels", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert client.get("/").status_code == 200
