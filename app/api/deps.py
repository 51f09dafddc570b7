"""What routes receive by injection: settings, the job store, the caller, label names.

Each is read from ``app.state`` (set by ``create_app``) so tests can build an
app around any settings and store, and can override any of these with
``app.dependency_overrides``.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Protocol

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.errors import Unauthorized
from app.labels import Labels, load_labels
from likeness.images import DecodedImage, decode_image
from likeness.jobs import ANONYMOUS, JobStore
from likeness.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> JobStore:
    store: JobStore | None = request.app.state.store
    if store is None:
        # Only when the app runs without its lifespan (e.g. TestClient used without `with`).
        raise RuntimeError("the job store is not open; run the app with its lifespan")
    return store


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key from LIKENESS_API_KEYS, as 'Authorization: Bearer <key>'. "
    "Not needed when the server runs without keys.",
)


def owner_of_key(key: str) -> str:
    """Jobs are filed under a hash of the key, so the store never holds a usable key."""
    return hashlib.sha256(key.encode()).hexdigest()


def get_owner(
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


def get_labels(settings: SettingsDep) -> Labels:
    return load_labels(settings.manifest_path)


LabelsDep = Annotated[Labels, Depends(get_labels)]


class ReferenceChecker(Protocol):
    def __call__(self, data: bytes) -> DecodedImage:
        """Return the decoded reference photo, or raise a ``LikenessError`` saying why not."""
        ...


class DecodeOnlyReferenceChecker:
    """Accepts any reference photo that decodes within the pixel limit.

    A placeholder: the ONNX MTCNN face detector replaces it in a later step,
    rejecting photos without exactly one usable face (code ``no_face`` and
    friends) before a job is created. Swap it in through
    ``app.state.reference_checker`` (or ``app.dependency_overrides``).
    """

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels

    def __call__(self, data: bytes) -> DecodedImage:
        return decode_image(data, max_pixels=self.max_pixels)


def get_reference_checker(request: Request) -> ReferenceChecker:
    checker: ReferenceChecker = request.app.state.reference_checker
    return checker


ReferenceCheckerDep = Annotated[ReferenceChecker, Depends(get_reference_checker)]
