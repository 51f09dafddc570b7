"""Refuse request bodies over a size limit before they are read, with a JSON 413.

A declared Content-Length over the limit is answered before the app runs; a
body without one (chunked) is counted as it streams in and stopped at the
limit. Either way nothing past the limit is buffered or spooled to disk.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.app = app
        self.max_body_size = max_body_size

    def _message(self) -> str:
        return f"The request body is larger than the limit of {self.max_body_size} bytes."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_size:
            response = error_response(413, "request_too_large", self._message())
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_size:
                    # Raised inside body parsing; FastAPI re-raises HTTPExceptions as they are,
                    # so the app's handler turns it into the JSON 413.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)
