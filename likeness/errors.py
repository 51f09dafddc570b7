"""Errors users can act on: a machine-readable code and one sentence."""

from __future__ import annotations


class LikenessError(Exception):
    """An error whose ``code`` and ``message`` go to the user verbatim.

    The HTTP layer maps ``status`` onto the response; the CLI prints the
    message and exits non-zero. Nothing else about the exception leaks.
    """

    status: int = 400

    def __init__(self, code: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        if status is not None:
            self.status = status

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidImage(LikenessError):
    status = 422


class NoFaceFound(LikenessError):
    """The search could not find any face that downscales to the thumbnail."""

    status = 422
