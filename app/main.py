"""The likeness HTTP API: ``create_app(settings)`` builds it; ``app`` is the default one.

Run with ``uvicorn app.main:app`` (or ``likeness serve``). Importing this module
touches nothing on disk and never imports torch; the store opens on startup.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.api.body_limit import BodySizeLimit
from app.api.deps import (
    DecodeOnlyReferenceChecker,
    FaceReferenceChecker,
    PhotoPlanner,
    ReferenceChecker,
    ReferenceGate,
)
from app.api.errors import install_exception_handlers
from app.api.routes import api_router
from app.api.routes.web import STATIC_DIR
from app.limits import FALLBACK_GENERATOR_SIDE, default_generator_side, thumbnail_max_pixels
from likeness.face_detect import SharedDetector
from likeness.jobs import JobStore, async_store, open_store_from_settings
from likeness.manifest import BUNDLED_MANIFEST_PATH
from likeness.settings import Settings, get_settings

# Room for the form fields and multipart framing beside two files at the size limit.
FORM_OVERHEAD_BYTES = 64 * 1024

DESCRIPTION = """
Upscale a face thumbnail by searching a generator's latent space for faces
that downscale to it, optionally steered by race, attributes and the identity
of a reference photo. Submissions are jobs: `POST /upscale` answers 202 with
links to poll and to fetch the result. Errors are JSON `{code, message}`.

A photo with small faces anywhere in it works too (mode `photo`, or `auto` for an
image larger than a thumbnail): its faces are detected, aligned, upscaled and pasted
back into an enlarged copy; `POST /faces` lists the faces first, and
`GET /jobs/{id}/faces/{n}` returns each upscaled face.
"""


def _version() -> str:
    try:
        return version("likeness")
    except PackageNotFoundError:
        return "0+unknown"


def face_detector(settings: Settings) -> SharedDetector:
    # The detector ships with the project, so it is found beside the bundled
    # manifest even when LIKENESS_WEIGHTS_DIR points at a folder of other weights.
    return SharedDetector((settings.manifest_path, BUNDLED_MANIFEST_PATH))


def reference_checker(
    settings: Settings, detector: SharedDetector | None = None
) -> ReferenceChecker:
    if not settings.reference_face_check:
        return DecodeOnlyReferenceChecker(settings.max_pixels)
    return FaceReferenceChecker(
        settings.max_pixels,
        detector or face_detector(settings),
        settings.reference_min_face_prob,
        settings.reference_check_max_side,
    )


def create_app(settings: Settings | None = None, *, store: JobStore | None = None) -> FastAPI:
    """Build the API. Pass ``store`` to use an already open one (it is not closed here)."""
    settings = settings if settings is not None else get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = app.state.store is None
        if owned:
            app.state.store = open_store_from_settings(settings)
        # Routes use the awaitable view; the synchronous store stays on app.state for tools.
        app.state.async_store = async_store(
            app.state.store,
            url=settings.store if owned else None,
            timeout=settings.store_timeout_seconds,
        )
        try:
            yield
        finally:
            app.state.reference_gate.close()
            app.state.photo_gate.close()
            await app.state.async_store.aclose()
            app.state.async_store = None
            if owned:
                app.state.store.close()
                app.state.store = None

    app = FastAPI(
        title="likeness",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    # Refuse oversized bodies while they stream in, before anything is spooled to disk.
    app.add_middleware(
        BodySizeLimit, max_body_size=2 * settings.max_upload_bytes + FORM_OVERHEAD_BYTES
    )
    app.state.settings = settings
    app.state.store = store
    app.state.async_store = None
    detector = face_detector(settings)
    app.state.reference_checker = reference_checker(settings, detector)
    app.state.reference_gate = ReferenceGate(settings.reference_checks_max)
    side = default_generator_side(settings.manifest_path) or FALLBACK_GENERATOR_SIDE
    app.state.photo_planner = PhotoPlanner(detector, settings, side)
    app.state.photo_gate = ReferenceGate(
        settings.reference_checks_max, "photo", "photo_checks_busy"
    )
    app.state.thumbnail_max_pixels = thumbnail_max_pixels(settings)
    install_exception_handlers(app)
    app.include_router(api_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


app = create_app()
