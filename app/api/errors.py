"""Every error leaves the API as JSON ``{code, message}`` with a 4xx/5xx status.

Clients branch on ``code``; ``message`` is one sentence for a person. Stack
traces go to the server log, never to the client.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from likeness.errors import LikenessError

log = logging.getLogger("likeness.app")

_HTTP_CODES = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


class ErrorBody(BaseModel):
    code: str = Field(..., description="Machine-readable reason, e.g. 'not_an_image'.")
    message: str = Field(..., description="What went wrong and what to do, in one sentence.")


class Unauthorized(LikenessError):
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(ErrorBody(code=code, message=message).model_dump(), status, headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        # ('body', 'steps') -> 'steps'; the input itself is left out (it may be a file).
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "header"))
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts) + "."


async def _likeness_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LikenessError)
    return error_response(exc.status, exc.code, exc.message, getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "invalid_request", _validation_message(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _HTTP_CODES.get(status, f"http_{status}")
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else None
    if status == 404:
        message = detail or f"Nothing at {request.url.path}."
    elif status == 405:
        message = f"{request.method} is not allowed on {request.url.path}."
    else:
        message = detail or f"{phrase}."
    return error_response(status, code, message, dict(exc.headers or {}))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "An internal error occurred; please retry later.")


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LikenessError, _likeness_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        401: "Missing or unknown API key (code unauthorized).",
        404: "No such job for this caller (code not_found).",
        422: "Invalid input; see code and message.",
    }.items()
}
