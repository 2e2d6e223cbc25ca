"""Images in and out: upload size limits, the strict parsing of a form, decoding an upload, the media
type of an indexed image.

An upload waits in Starlette's spooled temporary file (in memory up to 1 MiB, on disk beyond) until
the model thread decodes it (:class:`~.service.ModelService`), so at most one decoded upload exists.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from pathlib import Path
from typing import Any

from fastapi import Request, Response, UploadFile
from fastapi.routing import APIRoute
from PIL import Image
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser

from ..images import BadImageError, open_image
from .errors import ApiError, bounded

FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries, headers and the text fields around the image
MAX_FIELD_BYTES = FORM_OVERHEAD_BYTES  #: largest text field of a form (Starlette's default: 1 MiB)
#: The image formats accepted as uploads and served by /images/{id} (PIL format → media type).
IMAGE_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
FORMAT_LIST = ", ".join(IMAGE_TYPES)


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB ({n:,} bytes)"


def too_large(max_upload_bytes: int) -> ApiError:
    return ApiError(413, f"image: upload is larger than the limit of {_megabytes(max_upload_bytes)}", "image")


class BodySizeLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413 before they are parsed or spooled to disk.

    A ``Content-Length`` over the limit is answered at once; a chunked body is counted as it
    arrives and refused when it passes the limit.
    """

    def __init__(self, app: Any, max_bytes: int, max_upload_bytes: int) -> None:
        self.app, self.max_bytes, self.max_upload_bytes = app, max_bytes, max_upload_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await too_large(self.max_upload_bytes).response()(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large(self.max_upload_bytes)
            return message

        await self.app(scope, counted_receive, send)


class StrictMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, refusing by name a text field that is not valid text in the
    request's charset (UTF-8 unless it names another; Starlette would read it as Latin-1, turning the
    bytes into other characters) or is over ``max_part_size`` bytes (413)."""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is None and len(part.data) + end - start > self.max_part_size:
            name = bounded(part.field_name)
            raise ApiError(413, f"{name}: form field is larger than the limit of {self.max_part_size:,} bytes", name)
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset)
            except UnicodeDecodeError as err:
                name = bounded(part.field_name)
                raise ApiError(
                    400,
                    f"{name}: not valid {self._charset} text (byte 0x{part.data[err.start]:02x} at offset "
                    f"{err.start}); send form fields as UTF-8",
                    name,
                ) from None
        super().on_part_end()


class FormRequest(Request):
    """A request whose multipart form is read by :class:`StrictMultiPartParser`, text fields bounded by
    :data:`MAX_FIELD_BYTES`, and whose malformed multipart bodies are JSON 400s (Starlette's carry
    only a ``detail``)."""

    async def _get_form(self, **limits: Any) -> FormData:
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if self._form is None and content_type == b"multipart/form-data":
            limits["max_part_size"] = min(limits.get("max_part_size", MAX_FIELD_BYTES), MAX_FIELD_BYTES)
            try:
                async with aclosing(self.stream()) as stream:
                    self._form = await StrictMultiPartParser(self.headers, stream, **limits).parse()
            except MultiPartException as err:
                raise ApiError(400, f"request body: not valid multipart/form-data: {err.message}") from None
        return await super()._get_form(**limits)


class FormRoute(APIRoute):
    """Routes whose requests are :class:`FormRequest` (FastAPI's documented custom-request hook)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def form_request_handler(request: Request) -> Response:
            return await handler(FormRequest(request.scope, request.receive))

        return form_request_handler


def check_upload_size(upload: UploadFile, max_bytes: int) -> None:
    if upload.size is not None and upload.size > max_bytes:
        raise too_large(max_bytes)


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Uploaded bytes → RGB image: 415 if not an image, 413 if over ``max_pixels``, 422 if corrupt."""
    if not data:
        raise ApiError(422, "image: the uploaded file is empty", "image")
    try:
        with Image.open(io.BytesIO(data), formats=tuple(IMAGE_TYPES)) as probe:  # reads the header only
            width, height = probe.size
    except Image.DecompressionBombError:
        raise ApiError(413, f"image: over the limit of {max_pixels:,} pixels", "image") from None
    except Exception:  # PIL raises several types for data that is not an image it may open
        raise ApiError(415, f"image: not a recognised image format (send {FORMAT_LIST})", "image") from None
    if width * height > max_pixels:
        raise ApiError(
            413,
            f"image: {width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} pixels",
            "image",
        )
    try:
        return open_image(data, max_pixels=max_pixels, name="the uploaded image")
    except BadImageError as err:
        raise ApiError(422, f"image: {err.reason}", "image") from None


def stored_image_type(path: Path) -> str:
    """The media type of the format ``path`` decodes as; 415 unless it is one of :data:`IMAGE_TYPES`
    (request paths are never file paths: ``/images/{id}`` looks the integer id up in the index)."""
    try:
        with Image.open(path, formats=tuple(IMAGE_TYPES)) as image:  # reads the header only
            image_format = "JPEG" if image.format == "MPO" else image.format  # PIL's name for multi-picture JPEG
    except Exception:  # PIL raises several types for files that are not an image it may open
        raise ApiError(
            415,
            f"image_id: the file of this image is not a {FORMAT_LIST} image, so it is not "
            "served; rebuild the index from image files",
            "image_id",
        ) from None
    return IMAGE_TYPES[image_format]
