"""The HTTP API against a real store: a temp SQLite file and (when reachable) Redis.

Every rejected request must leave the store exactly as it was.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import uuid
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

from app.main import create_app
from likeness.errors import LikenessError
from likeness.images import DecodedImage
from likeness.jobs import JobError, JobStatus, JobStore, Progress
from likeness.jobs.redis_store import RedisJobStore
from likeness.settings import Settings

with warnings.catch_warnings():
    # Starlette prefers the httpx2 fork; plain httpx works the same for these tests.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("LIKENESS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MAX_UPLOAD = 200_000
KEY_A, KEY_B = "key-alice", "key-bob"


def _redis_unreachable() -> str | None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        return f"Redis at {REDIS_URL} is unreachable ({exc})"
    return None


REDIS_SKIP = _redis_unreachable()


# -- images -----------------------------------------------------------------------------------


def png(size: int = 32, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def face_photo() -> bytes:
    """A real face (the astronaut's head and shoulders), as a small JPEG."""
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()[20:260, 110:350]).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels; no pixel is ever allocated."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


THUMB = png(32)


# -- fixtures ---------------------------------------------------------------------------------


def make_settings(kind: str, tmp_path: Path, prefix: str, **overrides: Any) -> Settings:
    store = f"sqlite:///{tmp_path / 'jobs.sqlite3'}" if kind == "sqlite" else REDIS_URL
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "store": store,
        "redis_key_prefix": prefix,
        "max_upload_bytes": MAX_UPLOAD,
        "weights_dir": tmp_path / "weights",  # no manifest: the default label lists
        "api_keys": [],
    }
    values.update(overrides)
    return Settings(**values)


class Api:
    """A running app plus handles to build variants of it on the same store."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.prefix = f"likeness-test:{uuid.uuid4().hex}:"
        self._clients: list[TestClient] = []

    def client(self, **overrides: Any) -> TestClient:
        settings = make_settings(self.kind, self.tmp_path, self.prefix, **overrides)
        client = TestClient(create_app(settings))
        client.__enter__()  # runs the lifespan: the app opens its own store
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.__exit__(None, None, None)
        if self.kind == "redis":
            r = redis.Redis.from_url(REDIS_URL)
            keys = list(r.scan_iter(match=self.prefix + "*", count=1000))
            if keys:
                r.delete(*keys)
            r.close()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.skipif(bool(REDIS_SKIP), reason=REDIS_SKIP or "")),
    ]
)
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    env = Api(request.param, tmp_path)
    yield env
    env.close()


@pytest.fixture
def client(api: Api) -> TestClient:
    return api.client()


def store_of(client: TestClient) -> JobStore:
    store: JobStore = client.app.state.store  # type: ignore[attr-defined]
    return store


def stored_jobs(client: TestClient) -> int:
    return sum(store_of(client).counts_by_status().values())


def submit(
    client: TestClient,
    thumbnail: bytes = THUMB,
    *,
    data: dict[str, Any] | list[tuple[str, str]] | None = None,
    reference: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    files: list[tuple[str, tuple[str, bytes, str]]] = [
        ("thumbnail", ("thumb.png", thumbnail, "image/png"))
    ]
    if reference is not None:
        files.append(("reference", ("ref.png", reference, "image/png")))
    form: dict[str, Any] = {}
    # httpx wants repeated fields as a list under one key.
    for name, value in data.items() if isinstance(data, dict) else data or []:
        if name in form:
            form[name] = [*([form[name]] if isinstance(form[name], str) else form[name]), value]
        else:
            form[name] = value
    return client.post("/upscale", files=files, data=form, headers=headers or {})


def finish_with_result(store: JobStore, job_id: str, image: bytes = b"\x89PNG-result") -> None:
    [claimed] = store.claim("test-worker")
    assert claimed.id == job_id
    assert store.finish(
        job_id, "test-worker", JobStatus.SUCCEEDED, result={"mse": 0.001},
        result_blobs={"result.png": image},
    )  # fmt: skip


# -- submit and status ------------------------------------------------------------------------


def test_submit_answers_202_with_links_and_the_job_is_queued(client: TestClient) -> None:
    form = [
        ("race", "asian"),
        ("attribute", "Smiling:1"),
        ("attribute", "eyeglasses:0"),
        ("steps", "20"),
        ("restarts", "2"),
        ("eps", "0.002"),
        ("views", "4"),
    ]
    r = submit(client, data=form)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and len(body["id"]) == 32
    assert r.headers["location"] == body["links"]["self"]
    assert body["links"]["self"].endswith(f"/jobs/{body['id']}")

    job = client.get(body["links"]["self"]).json()
    assert job["status"] == "queued" and job["queue_position"] == 1
    assert job["options"]["race"] == "Asian"
    assert job["options"]["attributes"] == {"Smiling": 1, "Eyeglasses": 0}
    assert (job["options"]["steps"], job["options"]["restarts"]) == (20, 2)
    assert job["options"]["views"] == 4
    assert isinstance(job["options"]["seed"], int), "a seed is chosen so results reproduce"
    assert job["progress"] == {"step": 0, "steps": 20, "best_mse": None}
    assert job["inputs"]["thumbnail"]["size"] == len(THUMB)
    assert job["inputs"]["thumbnail"]["width"] == 32
    assert job["timings"]["wait_seconds"] >= 0 and job["timings"]["run_seconds"] is None
    assert stored_jobs(client) == 1
    assert store_of(client).get_blob(body["id"], "thumbnail") == THUMB


def test_defaults_come_from_settings(api: Api) -> None:
    client = api.client(steps_default=7, restarts_default=3)
    job_id = submit(client).json()["id"]
    options = client.get(f"/jobs/{job_id}").json()["options"]
    assert (options["steps"], options["restarts"], options["race"]) == (7, 3, None)


def test_the_kept_race_is_on_unless_the_form_turns_it_off(client: TestClient) -> None:
    kept = client.get(f"/jobs/{submit(client).json()['id']}").json()["options"]
    assert kept["keep_race"] is True
    off = submit(client, data={"keep_race": "false"}).json()["id"]
    assert client.get(f"/jobs/{off}").json()["options"]["keep_race"] is False
    r = submit(client, data={"keep_race": "maybe"})
    assert r.status_code == 422 and "keep_race" in r.text


def test_reference_photo_is_stored(client: TestClient) -> None:
    ref = face_photo()
    r = submit(client, reference=ref)
    assert r.status_code == 202, r.text
    job = client.get(f"/jobs/{r.json()['id']}").json()
    assert job["inputs"]["reference"]["size"] == len(ref)
    assert store_of(client).get_blob(r.json()["id"], "reference") == ref


def test_empty_form_fields_mean_not_given(client: TestClient) -> None:
    # What a browser sends for an untouched form: empty text fields, a nameless empty file.
    files = [
        ("thumbnail", ("t.png", THUMB, "image/png")),
        ("reference", ("", b"", "application/octet-stream")),
    ]
    r = client.post("/upscale", files=files, data={"race": "", "steps": ""})
    assert r.status_code == 202, r.text
    job = client.get(f"/jobs/{r.json()['id']}").json()
    assert "reference" not in job["inputs"]
    assert job["options"]["race"] is None and job["options"]["steps"] == 100


def test_running_job_shows_progress_and_timings(client: TestClient) -> None:
    job_id = submit(client, data={"steps": "50"}).json()["id"]
    store = store_of(client)
    store.claim("w1")
    store.update_progress(job_id, Progress(step=10, steps=50, best_mse=0.01), worker_id="w1")
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "running" and job["queue_position"] is None
    assert job["progress"] == {"step": 10, "steps": 50, "best_mse": 0.01}
    assert job["attempts"] == 1 and job["started"] is not None
    assert job["timings"]["run_seconds"] >= 0


def test_queue_positions_follow_submission_order(client: TestClient) -> None:
    ids = [submit(client).json()["id"] for _ in range(3)]
    assert [client.get(f"/jobs/{i}").json()["queue_position"] for i in ids] == [1, 2, 3]


# -- rejected requests store nothing ----------------------------------------------------------

BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("not an image", {"thumbnail": b"hello, this is text"}, 422, "not_an_image"),
    ("truncated png", {"thumbnail": png(64)[: len(png(64)) // 2]}, 422, "truncated_image"),
    ("empty file", {"thumbnail": b""}, 422, "empty_file"),
    ("pixel bomb", {"thumbnail": png_header_bomb(20000, 20000)}, 413, "image_too_large"),
    ("file too big", {"thumbnail": THUMB + b"\0" * MAX_UPLOAD}, 413, "upload_too_large"),
    ("unknown race", {"data": {"race": "Martian"}}, 422, "unknown_race"),
    ("unknown attribute", {"data": {"attribute": "Wings:1"}}, 422, "unknown_attribute"),
    ("attribute value 2", {"data": {"attribute": "Smiling:2"}}, 422, "invalid_attribute"),
    ("attribute no value", {"data": {"attribute": "Smiling"}}, 422, "invalid_attribute"),
    ("attribute twice", {"data": [("attribute", "Male:1"), ("attribute", "male:0")]}, 422,
     "invalid_attribute"),
    ("steps 0", {"data": {"steps": "0"}}, 422, "out_of_range"),
    ("steps 1001", {"data": {"steps": "1001"}}, 422, "out_of_range"),
    ("restarts 33", {"data": {"restarts": "33"}}, 422, "out_of_range"),
    ("seed negative", {"data": {"seed": "-1"}}, 422, "out_of_range"),
    ("eps 0", {"data": {"eps": "0"}}, 422, "out_of_range"),
    ("views 0", {"data": {"views": "0"}}, 422, "out_of_range"),
    ("views 17", {"data": {"views": "17"}}, 422, "out_of_range"),
    ("eps nan", {"data": {"eps": "nan"}}, 422, "out_of_range"),
    ("weight negative", {"data": {"race_weight": "-0.5"}}, 422, "out_of_range"),
    ("steps not a number", {"data": {"steps": "many"}}, 422, "invalid_request"),
    ("reference not an image", {"reference": b"GIF89a-nope"}, 422, "not_an_image"),
    ("reference without a face", {"reference": png(96, seed=3)}, 422, "no_face"),
    ("reference pixel bomb", {"reference": png_header_bomb(20000, 20000)}, 413,
     "image_too_large"),
    ("idempotency key too long", {"headers": {"Idempotency-Key": "k" * 300}}, 400,
     "invalid_idempotency_key"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "kwargs", "status", "code"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_request_is_refused_and_stores_nothing(
    client: TestClient, case: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    r = submit(client, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code
    assert set(body) == {"code", "message"} and body["message"]
    if "reference" in kwargs:
        assert body["message"].startswith("reference:")
    assert stored_jobs(client) == 0


def test_missing_thumbnail_is_invalid_request(client: TestClient) -> None:
    r = client.post("/upscale", data={"steps": "5"})
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_request" and "thumbnail" in r.json()["message"]
    assert stored_jobs(client) == 0


def test_request_body_over_the_limit_is_refused_while_streaming(client: TestClient) -> None:
    huge = b"\0" * (2 * MAX_UPLOAD + 100_000)
    r = submit(client, thumbnail=THUMB, reference=huge)
    assert r.status_code == 413
    assert r.json()["code"] == "request_too_large"
    assert stored_jobs(client) == 0


def test_chunked_body_over_the_limit_is_refused(client: TestClient) -> None:
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="thumbnail"; filename="t.png"'
        "\r\nContent-Type: image/png\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:  # no Content-Length: the server must count
        yield head
        for _ in range(2 * MAX_UPLOAD // 10_000 + 20):
            yield b"\0" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post(
        "/upscale",
        content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413, r.text
    assert r.json()["code"] == "request_too_large"
    assert stored_jobs(client) == 0


def test_reference_checker_hook_can_refuse(client: TestClient) -> None:
    def no_face(data: bytes) -> DecodedImage:
        raise LikenessError("no_face", "No face was found in the photo.", status=422)

    client.app.state.reference_checker = no_face  # type: ignore[attr-defined]
    r = submit(client, reference=png(64))
    assert (r.status_code, r.json()["code"]) == (422, "no_face")
    assert r.json()["message"].startswith("reference:")
    assert stored_jobs(client) == 0
    assert submit(client).status_code == 202, "no reference, no check"


def test_label_names_come_from_the_manifest(api: Api, tmp_path: Path) -> None:
    weights = tmp_path / "custom-weights"
    weights.mkdir()
    manifest = {"labels": {"races": ["Latino_Hispanic", "White"], "attributes": ["Smiling"]}}
    (weights / "manifest.json").write_text(json.dumps(manifest))
    client = api.client(weights_dir=weights)
    assert submit(client, data={"race": "latino_hispanic"}).status_code == 202
    r = submit(client, data={"race": "Asian"})
    assert (r.status_code, r.json()["code"]) == (422, "unknown_race")
    r = submit(client, data={"attribute": "Male:1"})
    assert (r.status_code, r.json()["code"]) == (422, "unknown_attribute")
    assert stored_jobs(client) == 1


# -- idempotency ------------------------------------------------------------------------------


def test_idempotency_key_replays_the_first_job(client: TestClient) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = submit(client, data={"steps": "9"}, headers=headers)
    again = submit(client, data={"steps": "9"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    assert "idempotent-replayed" not in first.headers
    assert stored_jobs(client) == 1

    conflict = submit(client, data={"steps": "10"}, headers=headers)
    assert (conflict.status_code, conflict.json()["code"]) == (409, "idempotency_conflict")
    other_image = submit(client, thumbnail=png(32, seed=5), data={"steps": "9"}, headers=headers)
    assert other_image.status_code == 409
    assert stored_jobs(client) == 1

    fresh = submit(client, data={"steps": "9"}, headers={"Idempotency-Key": "order-43"})
    assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]
    assert stored_jobs(client) == 2


# -- cancel and result ------------------------------------------------------------------------


def test_cancel_queued_job(client: TestClient) -> None:
    job_id = submit(client).json()["id"]
    r = client.post(f"/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert client.get(f"/jobs/{job_id}").json()["status"] == "canceled"
    assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "canceled"
    assert store_of(client).claim("w1") == []


def test_cancel_running_job_flags_it(client: TestClient) -> None:
    job_id = submit(client).json()["id"]
    store_of(client).claim("w1")
    body = client.post(f"/jobs/{job_id}/cancel").json()
    assert body["status"] == "running" and body["cancel_requested"] is True
    assert store_of(client).heartbeat("w1", [job_id]).cancel_requested == [job_id]


def test_cancel_finished_job_is_a_conflict(client: TestClient) -> None:
    job_id = submit(client).json()["id"]
    finish_with_result(store_of(client), job_id)
    r = client.post(f"/jobs/{job_id}/cancel")
    assert (r.status_code, r.json()["code"]) == (409, "job_finished")


def test_result_until_done_then_png(client: TestClient) -> None:
    job_id = submit(client).json()["id"]
    for path in ("result", "faces/0"):
        r = client.get(f"/jobs/{job_id}/{path}")
        assert (r.status_code, r.json()["code"]) == (404, "result_not_ready")
    finish_with_result(store_of(client), job_id, b"\x89PNG-the-image")
    r = client.get(f"/jobs/{job_id}/result")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.content == b"\x89PNG-the-image"
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["result"] == {"mse": 0.001}


def test_failed_job_reports_its_error_and_has_no_result(client: TestClient) -> None:
    job_id = submit(client).json()["id"]
    store = store_of(client)
    store.claim("w1")
    store.finish(job_id, "w1", JobStatus.FAILED, error=JobError(code="no_face", message="m."))
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"] == {"code": "no_face", "message": "m."}
    r = client.get(f"/jobs/{job_id}/result")
    assert (r.status_code, r.json()["code"]) == (404, "no_result")


@pytest.mark.parametrize("job_id", ["0" * 32, "not-an-id", "../../etc"])
def test_unknown_job_is_404(client: TestClient, job_id: str) -> None:
    for r in (
        client.get(f"/jobs/{job_id}"),
        client.get(f"/jobs/{job_id}/result"),
        client.post(f"/jobs/{job_id}/cancel"),
    ):
        assert r.status_code == 404 and r.json()["code"] == "not_found"


# -- listing and auth -------------------------------------------------------------------------


def test_listing_is_paginated_newest_first(client: TestClient) -> None:
    ids = [submit(client).json()["id"] for _ in range(5)]
    seen: list[str] = []
    url = "/jobs?limit=2"
    while True:
        page = client.get(url).json()
        seen += [job["id"] for job in page["items"]]
        if page["next_cursor"] is None:
            break
        url = f"/jobs?limit=2&cursor={page['next_cursor']}"
    assert seen == ids[::-1]
    assert client.get("/jobs?limit=0").json()["code"] == "invalid_request"
    bad = client.get("/jobs?cursor=abc")
    assert (bad.status_code, bad.json()["code"]) == (422, "invalid_cursor")


def test_api_keys_required_and_jobs_are_private(api: Api) -> None:
    client = api.client(api_keys=[KEY_A, KEY_B])
    alice = {"Authorization": f"Bearer {KEY_A}"}
    bob = {"Authorization": f"Bearer {KEY_B}"}

    r = submit(client)
    assert (r.status_code, r.json()["code"]) == (401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    r = submit(client, headers={"Authorization": "Bearer wrong"})
    assert (r.status_code, r.json()["code"]) == (401, "unauthorized")
    assert stored_jobs(client) == 0

    job_id = submit(client, headers=alice).json()["id"]
    assert client.get(f"/jobs/{job_id}", headers=alice).status_code == 200
    for r in (
        client.get(f"/jobs/{job_id}", headers=bob),
        client.get(f"/jobs/{job_id}/result", headers=bob),
        client.post(f"/jobs/{job_id}/cancel", headers=bob),
    ):
        assert (r.status_code, r.json()["code"]) == (404, "not_found")
    assert client.get(f"/jobs/{job_id}", headers=alice).json()["status"] == "queued"
    assert [j["id"] for j in client.get("/jobs", headers=alice).json()["items"]] == [job_id]
    assert client.get("/jobs", headers=bob).json()["items"] == []
    assert client.get("/jobs").status_code == 401
    assert client.get("/healthz").status_code == 200, "probes need no key"


def test_idempotency_keys_are_per_caller(api: Api) -> None:
    client = api.client(api_keys=[KEY_A, KEY_B])
    a = submit(client, headers={"Authorization": f"Bearer {KEY_A}", "Idempotency-Key": "k"})
    b = submit(client, headers={"Authorization": f"Bearer {KEY_B}", "Idempotency-Key": "k"})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


# -- errors, health, metrics ------------------------------------------------------------------


def test_unknown_route_and_wrong_method_are_json(client: TestClient) -> None:
    r = client.get("/nope")
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    r = client.get("/upscale")
    assert (r.status_code, r.json()["code"]) == (405, "method_not_allowed")
    assert "POST" in r.headers.get("allow", "")


def test_unexpected_error_is_500_without_details(api: Api) -> None:
    from app.api.deps import get_store

    client = api.client()

    def broken() -> JobStore:
        raise RuntimeError("secret internals")

    client.app.dependency_overrides[get_store] = broken  # type: ignore[attr-defined]
    quiet = TestClient(client.app, raise_server_exceptions=False)
    r = quiet.get(f"/jobs/{'0' * 32}")
    assert r.status_code == 500
    assert r.json() == {
        "code": "internal_error",
        "message": "An internal error occurred; please retry later.",
    }
    assert "secret" not in r.text and "Traceback" not in r.text


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_needs_a_recent_worker_heartbeat(api: Api) -> None:
    client = api.client(worker_heartbeat_timeout_seconds=30)
    r = client.get("/readyz")
    assert (r.status_code, r.json()["code"]) == (503, "no_worker")
    store_of(client).record_worker_heartbeat("w1")
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"

    stale = api.client(worker_heartbeat_timeout_seconds=30)
    store_of(stale).clock = lambda: store_of(client).clock() + 31  # type: ignore[method-assign]
    r = stale.get("/readyz")
    assert (r.status_code, r.json()["code"]) == (503, "no_worker")


def test_readyz_and_metrics_when_the_store_is_down(tmp_path: Path) -> None:
    down = RedisJobStore("redis://127.0.0.1:1/0")  # nothing listens on port 1
    settings = make_settings("sqlite", tmp_path, "unused:")
    with TestClient(create_app(settings, store=down)) as client:
        r = client.get("/readyz")
        assert (r.status_code, r.json()["code"]) == (503, "store_unreachable")
        r = client.get("/metrics")
        assert r.status_code == 200 and "likeness_store_up 0" in r.text
    down.close()


def test_metrics_count_jobs_by_status(client: TestClient) -> None:
    ids = [submit(client).json()["id"] for _ in range(3)]
    client.post(f"/jobs/{ids[0]}/cancel")
    store_of(client).record_worker_heartbeat("w1")
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = dict(
        line.rsplit(" ", 1) for line in r.text.splitlines() if line and not line.startswith("#")
    )
    assert samples['likeness_jobs{status="queued"}'] == "2"
    assert samples['likeness_jobs{status="canceled"}'] == "1"
    assert samples['likeness_jobs{status="running"}'] == "0"
    assert samples["likeness_queue_depth"] == "2"
    assert samples["likeness_store_up"] == "1"
    assert float(samples["likeness_worker_heartbeat_age_seconds"]) >= 0


def test_openapi_describes_every_field(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    upload_form = next(v for k, v in schemas.items() if k.startswith("Body_submit_upscale"))
    for schema in (upload_form, schemas["JobView"], schemas["SubmitResponse"]):
        for name, prop in schema["properties"].items():
            described = "description" in prop or "$ref" in prop or "allOf" in prop
            assert described, f"{name} has no description"
    params = spec["paths"]["/upscale"]["post"]["parameters"]
    assert any(p["name"] == "Idempotency-Key" and p.get("description") for p in params)


def test_the_app_never_imports_torch(tmp_path: Path) -> None:
    code = """
import sys
from fastapi.testclient import TestClient
import app.main
with TestClient(app.main.app) as c:
    assert c.get("/healthz").status_code == 200
    thumbnail = ("t.png", sys.stdin.buffer.read())
    assert c.post("/upscale", files={"thumbnail": thumbnail}).status_code == 202
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    env = {
        **os.environ,
        "LIKENESS_DATA_DIR": str(tmp_path),
        "LIKENESS_STORE": "",
        "LIKENESS_API_KEYS": "",
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], input=THUMB, capture_output=True, cwd=ROOT, env=env,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.strip() == b"ok"
    assert (tmp_path / "jobs.sqlite3").exists()
