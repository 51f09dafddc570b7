"""What routes receive by injection: settings, the job store, the caller, label names.

Each is read from ``app.state`` (set by ``create_app``) so tests can build an
app around any settings and store, and can override any of these with
``app.dependency_overrides``. All are ``async def`` and cheap: resolving them
never hands work to a thread.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, ParamSpec, Protocol, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.errors import Unauthorized
from app.labels import Labels, load_labels
from likeness.errors import LikenessError
from likeness.face_detect import MIN_FACE_SIZE, OnnxMTCNN, SharedDetector
from likeness.images import DecodedImage, decode_image
from likeness.jobs import ANONYMOUS, AsyncJobStore
from likeness.photo import PhotoPlan, plan_with_settings
from likeness.settings import Settings


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> AsyncJobStore:
    store: AsyncJobStore | None = request.app.state.async_store
    if store is None:
        # Only when the app runs without its lifespan (e.g. TestClient used without `with`).
        raise RuntimeError("the job store is not open; run the app with its lifespan")
    return store


P = ParamSpec("P")
T = TypeVar("T")

SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[AsyncJobStore, Depends(get_store)]

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key from LIKENESS_API_KEYS, as 'Authorization: Bearer <key>'. "
    "Not needed when the server runs without keys.",
)


def owner_of_key(key: str) -> str:
    """Jobs are filed under a hash of the key, so the store never holds a usable key."""
    return hashlib.sha256(key.encode()).hexdigest()


async def get_owner(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    if not settings.api_keys:
        return ANONYMOUS
    if credentials is None:
        raise Unauthorized("unauthorized", "Send your API key as 'Authorization: Bearer <key>'.")
    given = credentials.credentials.encode()
    # Compare against every key in constant time, so timing reveals nothing about the keys.
    matched = [hmac.compare_digest(given, key.encode()) for key in settings.api_keys]
    if not any(matched):
        raise Unauthorized("unauthorized", "The API key is not valid.")
    return owner_of_key(credentials.credentials)


OwnerDep = Annotated[str, Depends(get_owner)]


async def get_labels(settings: SettingsDep) -> Labels:
    return load_labels(settings.manifest_path)


LabelsDep = Annotated[Labels, Depends(get_labels)]


class ReferenceChecker(Protocol):
    def __call__(self, data: bytes) -> DecodedImage:
        """Return the decoded reference photo, or raise a ``LikenessError`` saying why not."""
        ...


class DecodeOnlyReferenceChecker:
    """Accepts any reference photo that decodes within the pixel limit (tests, and
    deployments that opt out with ``LIKENESS_REFERENCE_FACE_CHECK=false``)."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels

    def __call__(self, data: bytes) -> DecodedImage:
        return decode_image(data, max_pixels=self.max_pixels)


class FaceReferenceChecker:
    """Accepts a reference photo only if the ONNX MTCNN finds a face in it.

    The detector loads on first use, so building the app stays cheap; the
    worker later aligns the same photo with the torch MTCNN, which finds the
    same boxes (tests/face/test_onnx_detector.py).
    """

    def __init__(
        self, max_pixels: int, detector: SharedDetector, min_prob: float, max_side: int
    ) -> None:
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.min_prob = min_prob
        self.shared = detector

    def detector(self) -> OnnxMTCNN:
        return self.shared.get()

    def __call__(self, data: bytes) -> DecodedImage:
        # Shrunk while decoding: the detector never sees (or allocates) the full photo.
        image = decode_image(data, max_pixels=self.max_pixels, max_side=self.max_side)
        found = self.detector().detect(image.pixels, max_side=self.max_side)
        if not (found.probs >= self.min_prob).any():
            best = f" (best candidate {found.probs.max():.2f})" if len(found) else ""
            raise LikenessError(
                "no_face",
                f"no face was found in the photo{best}; send a photo where one face is "
                f"clearly visible and at least {MIN_FACE_SIZE} pixels wide.",
                status=422,
            )
        return image


class ReferenceChecksBusy(LikenessError):
    status = 429
    retry_after_seconds = 2
    headers = {"Retry-After": str(retry_after_seconds)}


class ReferenceGate:
    """At most ``limit`` checks of uploaded photos at once in this process; one more is
    refused at once (429) rather than queued, so a flood of large photos cannot pile up.

    The checks run on the gate's own ``limit`` threads: the memory a large photo takes
    is reused by the next check on the same thread instead of being held by every
    thread of the request pool. Reference photos and photo-mode photos have a gate each.
    """

    def __init__(
        self, limit: int, what: str = "reference photo", code: str = "reference_checks_busy"
    ) -> None:
        self.limit = limit
        self.what, self.code = what, code
        self._slots = threading.BoundedSemaphore(limit)
        self._threads = ThreadPoolExecutor(limit, thread_name_prefix="likeness-check")

    def guard(self, check: Callable[P, T]) -> Callable[P, T]:
        def checked(*args: P.args, **kwargs: P.kwargs) -> T:
            if not self._slots.acquire(blocking=False):
                raise ReferenceChecksBusy(
                    self.code,
                    f"{self.limit} {self.what}(s) are being checked already; retry in "
                    f"{ReferenceChecksBusy.retry_after_seconds} s.",
                )
            try:
                return self._threads.submit(check, *args, **kwargs).result()
            finally:
                self._slots.release()

        return checked

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


class PhotoPlanner:
    """Finds the faces of a photo (the ONNX MTCNN) and chooses them as the worker will:
    ``likeness.photo.plan_with_settings`` with the generator side the API serves."""

    def __init__(self, detector: SharedDetector, settings: Settings, resolution: int) -> None:
        self.detector, self.settings, self.resolution = detector, settings, resolution

    def __call__(self, image: DecodedImage, faces: str, listing: bool = False) -> PhotoPlan:
        return plan_with_settings(
            image.pixels,
            self.detector,
            self.resolution,
            faces,
            self.settings,
            listing=listing,
        )


async def get_reference_checker(request: Request) -> Callable[[bytes], DecodedImage]:
    gate: ReferenceGate = request.app.state.reference_gate
    return gate.guard(request.app.state.reference_checker)


ReferenceCheckerDep = Annotated[Callable[[bytes], DecodedImage], Depends(get_reference_checker)]


async def get_photo_planner(request: Request) -> Callable[..., PhotoPlan]:
    gate: ReferenceGate = request.app.state.photo_gate
    return gate.guard(request.app.state.photo_planner)


PhotoPlannerDep = Annotated[Callable[..., PhotoPlan], Depends(get_photo_planner)]
