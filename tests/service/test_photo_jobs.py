"""Photo mode through the API and the worker, in-process on one SQLite store: faces listed
by POST /faces, a photo job's faces batched in one search, the composite and each face
served back; photos that cannot work are refused at submission. For the tiny 32-px
generator every face of the astronaut photo is large (over half its side): faces=all
refuses it, indices upscale the faces all the same."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from app.api.deps import PhotoPlanner
from app.main import create_app
from likeness.jobs.sqlite_store import SQLiteJobStore
from likeness.settings import Settings
from tests.commands.test_upscale_photo_cli import astronaut_photo
from worker.engine.checkpoints import LoadedGenerator, load_generator
from worker.process import EXIT_OK, StopFlag, Worker

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


PHOTO = png_bytes(astronaut_photo())
TINY_SIDE = 32  # the tiny_weights generator's


@pytest.fixture(scope="module")
def model(tiny_weights: Path) -> LoadedGenerator:
    loaded = load_generator(tiny_weights, "cpu")
    assert loaded.generator.config.resolution == TINY_SIDE
    return loaded


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "store": f"sqlite:///{tmp_path / 'jobs.sqlite3'}",
        "weights_dir": tmp_path / "weights",  # no manifest: the bundled detector is found
        "worker_poll_seconds": 0.01,
        "progress_interval_seconds": 0,
        "search_precision": "fp32",
    }
    return Settings(**{**values, **overrides})


def tiny_app(settings: Settings, store: SQLiteJobStore) -> Any:
    """The app, planning photos for the tiny generator the worker runs (without a
    manifest it would plan for the bundled 128-px one)."""
    app = create_app(settings, store=store)
    planner = app.state.photo_planner
    app.state.photo_planner = PhotoPlanner(planner.detector, settings, TINY_SIDE)
    return app


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[TestClient, SQLiteJobStore, Settings]]:
    settings = make_settings(tmp_path, photo_max_faces=3)
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    with TestClient(tiny_app(settings, store)) as client:
        yield client, store, settings
    store.close()


def submit(client: TestClient, image: bytes, **form: str) -> Any:
    files = {"thumbnail": ("photo.png", image, "image/png")}
    data = {"steps": "2", "restarts": "1", "seed": "4", "eps": "1.0", **form}
    return client.post("/upscale", files=files, data=data)


def test_faces_lists_every_face_of_a_photo(service: Any) -> None:
    client, _, _ = service
    r = client.post("/faces", files={"photo": ("p.png", PHOTO, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"], body["max_faces"]) == (400, 300, 3)
    assert [f["index"] for f in body["faces"]] == [0, 1, 2]
    assert all(f["usable"] and f["prob"] > 0.9 for f in body["faces"])
    # Listed, though faces=all would choose none of them: each says why.
    for f in body["faces"]:
        assert f["large"] and not f["chosen"]
        assert f"already {f['face_side']:.0f} px" in f["reason"] and "32 px" in f["reason"]
    sides = [f["face_side"] for f in body["faces"]]
    assert sides == sorted(sides, reverse=True)  # largest first


def test_for_a_128_px_generator_only_the_large_face_is_left_out(tmp_path: Path) -> None:
    # Without a manifest the API plans for the bundled 128-px generator: face 0 (an 84-px
    # frame) is over half its side, faces 1 and 2 (61 and 48 px) are not.
    settings = make_settings(tmp_path)
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    with TestClient(create_app(settings, store=store)) as client:
        faces = client.post("/faces", files={"photo": ("p.png", PHOTO, "image/png")}).json()
        assert [(f["large"], f["chosen"]) for f in faces["faces"]] == [
            (True, False),
            (False, True),
            (False, True),
        ]
        assert "128 px faces" in faces["faces"][0]["reason"]
        assert faces["faces"][1]["reason"] is None
        r = submit(client, PHOTO)
        assert r.status_code == 202, r.text
    store.close()


def test_a_photo_job_upscales_its_faces_in_one_search_and_serves_them(
    service: Any, model: LoadedGenerator, tmp_path: Path
) -> None:
    client, store, settings = service
    r = submit(client, PHOTO, faces="0,2")
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    job = client.get(f"/jobs/{job_id}").json()
    assert job["options"]["mode"] == "photo" and job["options"]["faces"] == "0,2"

    worker = Worker(store, model, "tiny", torch.device("cpu"), settings, stop=StopFlag())
    assert worker.run(once=True) == EXIT_OK
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    report = job["result"]
    assert report["mode"] == "photo" and report["faces_chosen"] == [0, 2]
    assert report["batch_size"] == 2  # both faces (16-px thumbnails) in one search
    chosen = [f for f in report["faces"] if f["chosen"]]
    assert [f["index"] for f in chosen] == [0, 2]
    assert all(f["result"]["accepted"] for f in chosen)
    assert all("chosen by index" in f["reason"] for f in chosen)
    assert not any("result" in f for f in report["faces"] if not f["chosen"])

    composite = Image.open(io.BytesIO(client.get(f"/jobs/{job_id}/result").content))
    factor = report["output"]["factor"]
    assert composite.size == (400 * factor, 300 * factor)
    face = client.get(f"/jobs/{job_id}/faces/2")
    assert face.status_code == 200 and face.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(face.content)).size == (32, 32)
    crop = client.get(f"/jobs/{job_id}/faces/2", params={"kind": "thumbnail"})
    assert Image.open(io.BytesIO(crop.content)).size == (16, 16)
    missing = client.get(f"/jobs/{job_id}/faces/1")
    assert (missing.status_code, missing.json()["code"]) == (404, "no_result")


def test_a_small_image_keeps_the_thumbnail_path(service: Any) -> None:
    client, _, _ = service
    small = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    r = submit(client, png_bytes(small))
    assert r.status_code == 202, r.text
    assert client.get(f"/jobs/{r.json()['id']}").json()["options"]["mode"] == "thumbnail"


def test_photos_that_cannot_work_are_refused_and_store_nothing(
    service: Any, tmp_path: Path
) -> None:
    client, store, _ = service
    noise = Image.fromarray(
        np.random.default_rng(1).integers(0, 256, (200, 260, 3), dtype=np.uint8)
    )
    r = submit(client, png_bytes(noise))
    assert r.status_code == 422 and r.json()["code"] == "no_face"
    assert "260x200" in r.json()["message"] and "20 pixels" in r.json()["message"]
    r = client.post("/faces", files={"photo": ("n.png", png_bytes(noise), "image/png")})
    assert r.status_code == 422 and r.json()["code"] == "no_face"
    r = submit(client, PHOTO, faces="0,1,2", mode="photo")
    assert r.status_code == 202  # three faces: at the limit
    jobs = len(store.list_jobs("anonymous", limit=100).items)
    for spec in ("all", "largest"):
        r = submit(client, PHOTO, faces=spec)
        assert r.status_code == 422 and r.json()["code"] == "faces_too_large", r.text
        message = r.json()["message"]
        assert "400x300" in message and "84, 61, 48 px" in message and "faces=0" in message
    settings = make_settings(tmp_path, photo_max_faces=2)
    with TestClient(tiny_app(settings, store)) as two:
        r = submit(two, PHOTO, faces="0,1,2")
        assert r.status_code == 422 and r.json()["code"] == "too_many_faces"
        assert "3 faces" in r.json()["message"] and "at most 2" in r.json()["message"]
        assert submit(two, PHOTO, faces="0").status_code == 202
    r = submit(client, PHOTO, faces="5")
    assert r.status_code == 422 and r.json()["code"] == "invalid_faces"
    r = submit(client, PHOTO, mode="panorama")
    assert r.status_code == 422 and r.json()["code"] == "invalid_mode"
    assert len(store.list_jobs("anonymous", limit=100).items) == jobs + 1
