"""The API under overload and outages: store outages answer 503 with Retry-After and
recover, reference checks beyond the limit answer 429, thumbnails over the pixel
limit are refused from the header, and /healthz answers while the store hangs."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image

from app.limits import thumbnail_max_pixels
from app.main import create_app
from likeness.images import DecodedImage, decode_image
from likeness.jobs.aio import DEFAULT_THREADS
from likeness.jobs.sqlite_store import SQLiteJobStore
from likeness.settings import Settings
from tests.app.test_api import (
    REDIS_SKIP,
    REDIS_URL,
    THUMB,
    TestClient,
    make_settings,
    png,
    png_header_bomb,
    stored_jobs,
    submit,
)

needs_redis = pytest.mark.skipif(bool(REDIS_SKIP), reason=REDIS_SKIP or "")


# -- a Redis connection a test can cut or freeze ----------------------------------------------


class RedisRelay:
    """A TCP relay to the test Redis on a fixed local port: ``down()`` closes it (connections
    refused), ``up()`` opens it again on the same port, ``frozen`` holds every byte."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.frozen = False
        self.held = 0  # chunks that met the freeze: each is a request stuck on its way
        self._lock = threading.Lock()  # the pumps of every connection count into ``held``
        self.port = 0
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            self._listener.close()
            self._listener = None
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self.frozen:
                    with self._lock:
                        self.held += 1
                while self.frozen:
                    time.sleep(0.01)
                dst.sendall(data)
        except OSError:
            pass


@pytest.fixture
def relay() -> Iterator[RedisRelay]:
    host, port = REDIS_URL.split("//", 1)[1].split("/", 1)[0].split(":")
    r = RedisRelay((host, int(port)))
    yield r
    r.frozen = False
    r.down()


@pytest.fixture
def store_timeout() -> float:
    return 0.5


@pytest.fixture
def redis_client(relay: RedisRelay, tmp_path: Path, store_timeout: float) -> Iterator[TestClient]:
    prefix = f"likeness-test:{uuid.uuid4().hex}:"
    settings = make_settings(
        "redis",
        tmp_path,
        prefix,
        store=f"redis://127.0.0.1:{relay.port}/{REDIS_URL.rsplit('/', 1)[1]}",
        store_timeout_seconds=store_timeout,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=prefix + "*"))
    if keys:
        r.delete(*keys)
    r.close()


def assert_unavailable(response: Any) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "store_unavailable"
    assert int(response.headers["Retry-After"]) > 0


@needs_redis
def test_a_redis_outage_answers_503_and_the_api_recovers(
    redis_client: TestClient, relay: RedisRelay
) -> None:
    job_id = submit(redis_client).json()["id"]
    relay.down()
    assert_unavailable(redis_client.get(f"/jobs/{job_id}"))
    assert_unavailable(submit(redis_client))
    assert_unavailable(redis_client.post(f"/jobs/{job_id}/cancel"))
    assert_unavailable(redis_client.get("/jobs"))
    assert redis_client.get("/readyz").status_code == 503
    assert redis_client.get("/healthz").status_code == 200
    relay.up()
    r = redis_client.get(f"/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "queued"
    assert submit(redis_client).status_code == 202


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Poll ``condition``; the deadline only turns a hang into a failure with a reason."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


@contextlib.contextmanager
def polls_on_a_frozen_redis(
    client: TestClient, relay: RedisRelay, count: int = 3
) -> Iterator[tuple[str, list[Future[Any]]]]:
    """A stored job, then Redis frozen and ``count`` polls of that job sent at once."""
    job_id = submit(client).json()["id"]
    relay.frozen = True
    with ThreadPoolExecutor(count) as pool:
        yield job_id, [pool.submit(client.get, f"/jobs/{job_id}") for _ in range(count)]


@needs_redis
def test_a_frozen_redis_answers_503_and_the_api_recovers(
    redis_client: TestClient, relay: RedisRelay
) -> None:
    with polls_on_a_frozen_redis(redis_client, relay) as (job_id, polls):
        # Redis never answers while frozen: only the store timeout can end these polls.
        for poll in polls:
            assert_unavailable(poll.result())
    relay.frozen = False
    assert redis_client.get(f"/jobs/{job_id}").status_code == 200


@needs_redis
@pytest.mark.parametrize("store_timeout", [60.0])
def test_healthz_answers_while_polls_wait_on_a_frozen_redis(
    redis_client: TestClient, relay: RedisRelay
) -> None:
    with polls_on_a_frozen_redis(redis_client, relay) as (_, polls):
        wait_until(lambda: relay.held >= 3, "three polls reaching the frozen Redis")
        assert redis_client.get("/healthz").status_code == 200
        # Ordering, not timing: /healthz answered while every poll still waits on Redis.
        assert not any(poll.done() for poll in polls)
        relay.frozen = False
        for poll in polls:
            assert poll.result().status_code == 200


class HangingStore(SQLiteJobStore):
    """Reads block until ``release`` is set, like a store whose disk stopped answering."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.release = threading.Event()
        self.stuck = 0
        self._lock = threading.Lock()  # the store's threads all count into ``stuck``

    def get(self, job_id: str) -> Any:
        with self._lock:
            self.stuck += 1
        self.release.wait(60)
        return super().get(job_id)


def test_healthz_answers_while_every_store_thread_hangs(tmp_path: Path) -> None:
    store = HangingStore(tmp_path / "jobs.sqlite3")
    settings = make_settings("sqlite", tmp_path, "", store_timeout_seconds=0.5)
    try:
        with (
            TestClient(create_app(settings, store=store)) as client,
            ThreadPoolExecutor(12) as pool,
        ):
            # More polls than the store has threads: all of them end stuck in get().
            polls = [pool.submit(client.get, f"/jobs/{'0' * 32}") for _ in range(10)]
            wait_until(lambda: store.stuck >= DEFAULT_THREADS, "every store thread stuck")
            assert client.get("/healthz").status_code == 200
            assert store.stuck == DEFAULT_THREADS  # no thread came free to take the rest
            for poll in polls:
                assert_unavailable(poll.result())
            store.release.set()
            assert client.get(f"/jobs/{'0' * 32}").status_code == 404
    finally:
        store.release.set()
        store.close()


# -- reference checks beyond the limit ---------------------------------------------------------


def test_reference_checks_beyond_the_limit_answer_429(tmp_path: Path) -> None:
    settings = make_settings("sqlite", tmp_path, "", reference_checks_max=1)
    entered, release = threading.Event(), threading.Event()

    def slow_check(data: bytes) -> DecodedImage:
        entered.set()
        release.wait(10)
        return decode_image(data)

    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(1) as pool:
        client.app.state.reference_checker = slow_check  # type: ignore[attr-defined]
        first = pool.submit(submit, client, reference=png(64, seed=1))
        assert entered.wait(10)
        r = submit(client, reference=png(64, seed=2))
        assert r.status_code == 429 and r.json()["code"] == "reference_checks_busy"
        assert int(r.headers["Retry-After"]) > 0
        assert submit(client).status_code == 202  # no reference: never limited
        release.set()
        assert first.result().status_code == 202
        assert stored_jobs(client) == 2  # the refused one left nothing behind
        assert submit(client, reference=png(64, seed=2)).status_code == 202  # a slot is free


# -- pixel limits -------------------------------------------------------------------------------


def write_manifest(weights: Path, resolution: int) -> None:
    weights.mkdir(parents=True, exist_ok=True)
    entry = {
        "name": "g",
        "kind": "generator",
        "default": True,
        "file": "g.pt",
        "sha256": "0" * 64,
        "config": {"resolution": resolution},
    }
    (weights / "manifest.json").write_text(json.dumps({"models": [entry]}))


def test_thumbnail_limit_is_eight_times_the_default_generators_side(tmp_path: Path) -> None:
    base = make_settings("sqlite", tmp_path, "")
    assert thumbnail_max_pixels(base) == 1024 * 1024  # no manifest: the bundled 128 px
    write_manifest(tmp_path / "weights", 32)
    assert thumbnail_max_pixels(base) == 256 * 256
    assert thumbnail_max_pixels(base.model_copy(update={"thumbnail_max_pixels": 5000})) == 5000
    capped = base.model_copy(update={"thumbnail_max_pixels": 10**9})
    assert thumbnail_max_pixels(capped) == base.max_pixels


def large_face_photo() -> bytes:
    from skimage import data

    buf = io.BytesIO()
    face = Image.fromarray(data.astronaut()[20:260, 110:350]).resize((600, 600))
    face.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def test_thumbnails_over_the_limit_are_refused_from_the_header(tmp_path: Path) -> None:
    write_manifest(tmp_path / "weights", 16)  # thumbnails up to 128 x 128
    thumbnail = {"mode": "thumbnail"}  # auto takes an image this large for a photo
    with TestClient(create_app(make_settings("sqlite", tmp_path, ""))) as client:
        assert submit(client, png(128), data=thumbnail).status_code == 202
        r = submit(client, png_header_bomb(129, 128), data=thumbnail)
        assert (r.status_code, r.json()["code"]) == (413, "image_too_large")
        assert "thumbnail" in r.json()["message"]
        # A reference photo is not a thumbnail: it keeps max_pixels and is shrunk to check it.
        r = submit(client, THUMB, reference=large_face_photo())
        assert r.status_code == 202, r.text
        assert stored_jobs(client) == 2


def test_the_face_check_sees_a_shrunk_photo(tmp_path: Path) -> None:
    from app.main import reference_checker

    settings = Settings(
        data_dir=tmp_path, weights_dir=tmp_path / "w", reference_check_max_side=100
    ).model_copy(update={"reference_face_check": True})
    checker = reference_checker(settings)
    seen: list[tuple[int, ...]] = []

    class Detector:
        def detect(self, pixels: Any, max_side: int | None = None) -> Any:
            seen.append(pixels.shape)
            raise RuntimeError("stop here")

    checker.shared._detector = Detector()  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError):
        checker(png(400, seed=6))
    assert seen == [(100, 100, 3)]
