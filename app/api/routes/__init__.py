"""One router per resource; ``api_router`` gathers them."""

from fastapi import APIRouter

from app.api.routes import health, jobs, labels, upscale, web

api_router = APIRouter()
api_router.include_router(upscale.router)
api_router.include_router(jobs.router)
api_router.include_router(health.router)
api_router.include_router(labels.router)
api_router.include_router(web.router)
