"""The HTTP service: ``create_app(model, index=None, limits=Limits())`` → a FastAPI application.

Endpoints: ``POST /vqa`` (answers + bottom-up/top-down attention overlays), ``GET /search``
(text → ranked indexed images), ``GET /images/{id}`` (indexed images only, by id), ``GET /health``,
``GET /metrics`` (Prometheus), ``GET /`` (the web page), ``/docs`` and ``/openapi.json``.

The model is shared by all requests and is not thread-safe, so every model call runs on one
dedicated worker thread (calls are serialised, the event loop stays free); decoding uploads and
drawing overlays run in Starlette's thread pool. Request paths are never used as file paths:
``/images/{id}`` looks the integer id up in the index.
"""
from __future__ import annotations

import asyncio
import base64
import io
import mimetypes
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__
from ..data.images import BadImageError, open_image
from ..models.vl import AbsVLModel
from ..pipelines import pipeline
from ..visualize import overlay, png_bytes
from .limits import Limits

STATIC_DIR = Path(__file__).parent / "static"
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries, headers and the text fields around the image
OVERLAY_SIDE = 320  # longest side of the attention overlays sent back (pixels)
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
    "style-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


class ApiError(HTTPException):
    """A refused request: ``{"detail": message, "field": field}`` with ``status_code``."""

    def __init__(self, status_code: int, detail: str, field: str | None = None, headers: dict | None = None) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.field = field


# --- response schemas (they document the API in /openapi.json) ------------------------------
class ErrorBody(BaseModel):
    detail: str = Field(description="what is wrong, naming the field and the limit")
    field: str | None = Field(None, description="the request field at fault, if any")


class Answer(BaseModel):
    answer: str
    score: float = Field(description="sigmoid score of the VQA head")


class AttentionMap(BaseModel):
    overlay: str = Field(description="the image blended with the map's heat map, a PNG data URL")
    grid: list[list[float]] = Field(description="the raw token-norm map on the patch grid (rows × columns)")


class VQAResponse(BaseModel):
    question: str
    answers: list[Answer]
    image_size: tuple[int, int] = Field(description="(width, height) of the uploaded image")
    bottom_up: AttentionMap = Field(description="feedforward attention: ignores the question")
    top_down: AttentionMap = Field(description="attention steered by the question")


class SearchResult(BaseModel):
    rank: int
    id: int
    score: float = Field(description="bottom-up embedding similarity")
    rerank_score: float | None = Field(description="top-down (query-steered) score when re-ranked")
    url: str = Field(description="where to fetch the image: /images/{id}")


class SearchResponse(BaseModel):
    query: str
    k: int
    rerank: int
    results: list[SearchResult]


class Health(BaseModel):
    status: str
    version: str
    model: str
    vqa: bool = Field(description="whether POST /vqa is available (the model has a VQA head)")
    search: bool = Field(description="whether GET /search is available (an index was given)")
    index_size: int | None
    limits: dict[str, int]


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        404: "not found",
        413: "upload or image too large",
        415: "not an image",
        422: "invalid or missing field",
        503: "feature unavailable or server busy",
    }.items()
}


# --- metrics --------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one app, in a registry of its own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # CPU time, memory, open files (Linux)
        self.requests = Counter(
            "absvl_http_requests", "HTTP requests by endpoint, method and status", ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "absvl_http_request_duration_seconds", "HTTP request latency by endpoint", ["endpoint"],
            registry=self.registry,
        )
        self.model_seconds = Histogram(
            "absvl_model_call_duration_seconds", "Model call time by task (excluding queueing)", ["task"],
            registry=self.registry,
        )
        self.pending = Gauge("absvl_model_calls_pending", "Model calls queued or running", registry=self.registry)
        self.index_size = Gauge("absvl_index_size", "Images in the search index (0 without one)", registry=self.registry)


class MetricsMiddleware:
    """Counts every HTTP request and times it, labelled by route template (not the raw path)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_and_note_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


class BodySizeLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413 before they are parsed or spooled to disk.

    A ``Content-Length`` over the limit is answered at once; a chunked body is counted as it
    arrives and refused when it passes the limit.
    """

    def __init__(self, app: Any, max_bytes: int, max_upload_bytes: int) -> None:
        self.app, self.max_bytes, self.max_upload_bytes = app, max_bytes, max_upload_bytes

    def _error(self) -> ApiError:
        return ApiError(413, f"image: upload is larger than the limit of {_megabytes(self.max_upload_bytes)}", "image")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = self._error()
            await JSONResponse({"detail": error.detail, "field": error.field}, 413)(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._error()
            return message

        await self.app(scope, counted_receive, send)


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB ({n:,} bytes)"


# --- the model service ----------------------------------------------------------------------
class ModelService:
    """The model, its pipelines and the optional retriever, called one at a time on one thread."""

    def __init__(self, model: AbsVLModel, index: Any, limits: Limits, metrics: Metrics) -> None:
        self.model = model.eval()
        self.limits, self.metrics = limits, metrics
        self.vqa = pipeline("vqa", model) if model.answers else None
        self.attention = pipeline("attention", model)
        self.index = index
        self.retriever = None
        self.image_ids: frozenset[int] = frozenset()
        if index is not None:
            from ..retrieval import Retriever

            self.retriever = Retriever(model, index)  # IndexMismatchError if built by another model
            self.image_ids = frozenset(int(i) for i in index.ids)
        metrics.index_size.set(len(index) if index is not None else 0)
        self._executor: ThreadPoolExecutor | None = None
        self.pending = 0  # touched on the event loop only

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The one thread that runs model calls (started on first use, again after :meth:`close`)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="absvl-model")
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    async def run(self, task: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the model thread; 503 when too many calls are already waiting."""
        if self.pending >= self.limits.max_pending:
            raise ApiError(503, f"server busy: {self.pending} model calls are queued (limit {self.limits.max_pending}); "
                           "retry shortly", headers={"Retry-After": "1"})
        self.pending += 1
        self.metrics.pending.inc()
        try:
            timed = partial(self._timed, task, fn, *args, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(self.executor, timed)
        finally:
            self.pending -= 1
            self.metrics.pending.dec()

    def _timed(self, task: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        with self.metrics.model_seconds.labels(task).time():
            return fn(*args, **kwargs)

    def answer(self, image: Image.Image, question: str, top_k: int) -> tuple[list[dict], dict[str, np.ndarray]]:
        """Top-k answers and the bottom-up / top-down maps of ``question`` about ``image``."""
        return self.vqa(image, question, top_k=top_k), self.attention(image, question)

    def image_path(self, image_id: int) -> Path:
        """The file of an indexed image; 404 for anything else."""
        if self.index is None:
            raise ApiError(404, "image_id: no image index is loaded (start the server with --index)", "image_id")
        if image_id not in self.image_ids:
            raise ApiError(404, f"image_id: no indexed image has id {image_id}", "image_id")
        path = Path(self.index.path_of(image_id))
        if not path.is_file():
            raise ApiError(404, f"image_id: image {image_id} is indexed but its file is gone", "image_id")
        return path


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Uploaded bytes → RGB image: 415 if not an image, 413 if over ``max_pixels``, 422 if corrupt."""
    if not data:
        raise ApiError(422, "image: the uploaded file is empty", "image")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
    except Image.DecompressionBombError:
        raise ApiError(413, f"image: over the limit of {max_pixels:,} pixels", "image") from None
    except Exception:  # PIL raises several types for data that is not an image it knows
        raise ApiError(415, "image: not a recognised image format (send JPEG, PNG, WebP, GIF, BMP or TIFF)",
                       "image") from None
    if width * height > max_pixels:
        raise ApiError(413, f"image: {width}x{height} = {width * height:,} pixels is over the limit of "
                       f"{max_pixels:,} pixels", "image")
    try:
        return open_image(data, max_pixels=max_pixels, name="the uploaded image")
    except BadImageError as err:
        raise ApiError(422, f"image: {err.reason}", "image") from None


def _data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def attention_payload(image: Image.Image, maps: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Each map as a PNG overlay on a downsized copy of ``image`` plus its raw grid."""
    shown = image.copy()
    shown.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE), Image.Resampling.BICUBIC)
    return {
        name: {"overlay": _data_url(overlay(shown, values)), "grid": np.asarray(values, dtype=float).tolist()}
        for name, values in maps.items()
    }


def _checked_text(field: str, value: str) -> str:
    text = value.strip()
    if not text:
        raise ApiError(422, f"{field}: must not be empty or only whitespace", field)
    return text


async def _read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, f"image: upload is larger than the limit of {_megabytes(max_bytes)}", "image")
    return data


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 with a readable ``detail`` ("top_k: Input should be ... 20") and ``field`` added."""
    errors = jsonable_encoder(exc.errors())
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    location = list(first.get("loc") or [])  # e.g. ["query", "k"], ["body", "question"]
    field = str(location[-1]) if len(location) > 1 else None
    detail = f"{field}: {first['msg']}" if field else f"{'/'.join(map(str, location)) or 'request'}: {first['msg']}"
    return JSONResponse({"detail": detail, "field": field, "errors": errors}, 422)


def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail, "field": exc.field}, exc.status_code, headers=exc.headers)


def create_app(model: AbsVLModel, index: Any = None, limits: Limits | None = None, model_name: str | None = None) -> FastAPI:
    """The service for ``model`` (and, for /search and /images, an ``absvl.retrieval.ImageIndex``)."""
    limits = limits or Limits()
    metrics = Metrics()
    service = ModelService(model, index, limits, metrics)
    name = model_name or model.config.backbone

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(
        title="absvl",
        version=__version__,
        description="Visual question answering with top-down (question-steered) attention maps, and text-to-image "
        "search over an indexed image collection.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=limits.max_upload_bytes + FORM_OVERHEAD_BYTES,
                       max_upload_bytes=limits.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts the 413s above too

    @app.post("/vqa", response_model=VQAResponse, responses=ERRORS, summary="Answer a question about an image")
    async def vqa(
        image: UploadFile = File(description=f"the image (at most {limits.max_upload_bytes:,} bytes and "
                                 f"{limits.max_pixels:,} pixels)"),
        question: str = Form(min_length=1, max_length=limits.max_question_chars),
        top_k: int = Form(5, ge=1, le=limits.max_top_k, description="how many answers"),
    ) -> dict[str, Any]:
        if service.vqa is None:
            raise ApiError(503, "this model has no VQA head (no answer vocabulary): /vqa is unavailable")
        question = _checked_text("question", question)
        data = await _read_upload(image, limits.max_upload_bytes)
        picture = await run_in_threadpool(decode_upload, data, limits.max_pixels)
        answers, maps = await service.run("vqa", service.answer, picture, question, top_k)
        attention = await run_in_threadpool(attention_payload, picture, maps)
        return {"question": question, "answers": answers, "image_size": picture.size, **attention}

    @app.get("/search", response_model=SearchResponse, responses=ERRORS, summary="Search the indexed images by text")
    async def search(
        q: str = Query(min_length=1, max_length=limits.max_query_chars, description="the text query"),
        k: int = Query(10, ge=1, le=limits.max_k, description="how many results"),
        rerank: int = Query(0, ge=0, le=limits.max_rerank,
                            description="re-score this many top candidates with the query steering the vision encoder "
                            "(0: none; otherwise at least k)"),
    ) -> dict[str, Any]:
        if service.retriever is None:
            raise ApiError(503, "search is unavailable: no image index is loaded (start the server with --index)")
        query = _checked_text("q", q)
        if 0 < rerank < k:
            raise ApiError(422, f"rerank: must be 0 (no re-ranking) or at least k={k}: re-ranking keeps only the "
                           f"re-scored candidates", "rerank")
        hits = await service.run("search", service.retriever.search, query, k=k, rerank=rerank)
        results = [
            {"rank": hit.rank, "id": int(hit.id), "score": float(hit.score),
             "rerank_score": None if hit.rerank_score is None else float(hit.rerank_score),
             "url": app.url_path_for("image", image_id=int(hit.id))}
            for hit in hits
        ]
        return {"query": query, "k": k, "rerank": rerank, "results": results}

    @app.get("/images/{image_id}", name="image", response_class=FileResponse, responses={404: ERRORS[404]},
             summary="An indexed image, by id")
    async def image(image_id: int) -> FileResponse:
        path = service.image_path(image_id)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type,
                            headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})

    @app.get("/health", response_model=Health, summary="Service status")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "model": name, "vqa": service.vqa is not None,
                "search": service.retriever is not None, "index_size": len(index) if index is not None else None,
                "limits": limits.as_dict()}

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics (text format)")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
