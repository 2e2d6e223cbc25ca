"""Refused requests: :class:`ApiError` and the JSON bodies of every error (``{"detail", "field"}``)."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
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


ECHO_CHARS = 80  #: the most characters of a request's value an error sends back


def bounded(text: str, limit: int = ECHO_CHARS) -> str:
    """``text``, or its first ``limit`` characters and its length: what an error may echo of the input."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


#: Unicode categories that show nothing: controls, format characters (zero-width spaces and joiners,
#: the BOM, direction marks, soft hyphen) and separators.
INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def checked_text(field: str, value: str) -> str:
    """``value`` stripped; 422 when nothing visible is left (only whitespace, zero-width or other
    invisible characters)."""
    text = value.strip()
    if all(unicodedata.category(char) in INVISIBLE for char in text):
        raise ApiError(422, f"{field}: must not be empty or only whitespace or invisible characters", field)
    return text


def _bounded_error(error: dict[str, Any]) -> dict[str, Any]:
    """A pydantic error with its ``input`` (and any long ``ctx`` value) cut to :data:`ECHO_CHARS`
    characters, adding ``input_length``: a 1 MB field is not sent back."""
    error = dict(error)
    value = error.get("input")
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) > ECHO_CHARS:
        error["input"], error["input_length"] = text[:ECHO_CHARS] + "…", len(text)
    if isinstance(error.get("ctx"), dict):
        error["ctx"] = {key: bounded(v) if isinstance(v, str) else v for key, v in error["ctx"].items()}
    return error


def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 with a readable ``detail`` ("top_k: Input should be ... 20") and ``field`` added;
    the input is echoed at most :data:`ECHO_CHARS` characters long."""
    errors = [_bounded_error(error) for error in jsonable_encoder(exc.errors())]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    location = [bounded(str(part)) for part in first.get("loc") or []]  # e.g. ["query", "k"], ["body", "question"]
    field = location[-1] if len(location) > 1 else None
    detail = f"{field}: {first['msg']}" if field else f"{'/'.join(location) or 'request'}: {first['msg']}"
    return JSONResponse({"detail": detail, "field": field, "errors": errors}, 422)


def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own refusals (404, 405, a body that cannot be parsed) in the service's
    shape, with ``field``."""
    if exc.status_code in (204, 304):  # no body allowed
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"detail": exc.detail, "field": None}, exc.status_code, headers=exc.headers)


def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Unexpected failures; Starlette answers them outside the middleware stack, hence the header here."""
    return JSONResponse(
        {"detail": f"internal server error ({type(exc).__name__}); see the server log", "field": None},
        500,
        headers={"X-Content-Type-Options": "nosniff"},
    )
