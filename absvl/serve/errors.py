"""Refused requests: :class:`ApiError` and the JSON bodies of every error (``{"detail", "field"}``)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException


class ApiError(HTTPException):
    """A refused request: ``{"detail": message, "field": field}`` with ``status_code``."""

    def __init__(self, status_code: int, detail: str, field: str | None = None, headers: dict | None = None) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.field = field

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.detail, "field": self.field}, self.status_code, headers=self.headers)


class ErrorBody(BaseModel):
    detail: str = Field(description="what is wrong, naming the field and the limit")
    field: str | None = Field(None, description="the request field at fault, if any")


#: The error responses documented in /openapi.json.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        404: "not found",
        413: "upload or image too large",
        415: "not an image in an accepted format",
        422: "invalid or missing field",
        503: "feature unavailable or server busy",
        504: "the request's deadline passed",
    }.items()
}


def checked_text(field: str, value: str) -> str:
    """``value`` stripped; 422 when nothing is left."""
    text = value.strip()
    if not text:
        raise ApiError(422, f"{field}: must not be empty or only whitespace", field)
    return text


def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 with a readable ``detail`` ("top_k: Input should be ... 20") and ``field`` added."""
    errors = jsonable_encoder(exc.errors())
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    location = list(first.get("loc") or [])  # e.g. ["query", "k"], ["body", "question"]
    field = str(location[-1]) if len(location) > 1 else None
    detail = f"{field}: {first['msg']}" if field else f"{'/'.join(map(str, location)) or 'request'}: {first['msg']}"
    return JSONResponse({"detail": detail, "field": field, "errors": errors}, 422)


def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Unexpected failures; Starlette answers them outside the middleware stack, hence the header here."""
    return JSONResponse(
        {"detail": f"internal server error ({type(exc).__name__}); see the server log", "field": None},
        500,
        headers={"X-Content-Type-Options": "nosniff"},
    )
