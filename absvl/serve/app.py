"""The HTTP service: ``create_app(model, index=None, limits=Limits(), retrieval_model=None)`` → a FastAPI application.

Endpoints: ``POST /vqa`` (answers + bottom-up/top-down attention overlays), ``GET /search``
(text → ranked indexed images), ``GET /images/{id}`` (indexed images only, by id), ``GET /health``,
``GET /metrics`` (Prometheus), ``GET /`` (the web page), ``/docs`` and ``/openapi.json``.

Two models may serve the two halves side by side: ``model`` answers /vqa, ``retrieval_model`` (default:
``model``) searches the index it built. /vqa is served only by a model whose VQA head fits its weights
(:func:`vqa_unavailable`); /health says what is served and, for what is not, why.

The models are shared by all requests and are not thread-safe, so every model call runs on one
dedicated worker thread (calls are serialised, the event loop stays free). Faults are contained:

* **memory**: an upload waits in Starlette's spooled temporary file (in memory up to 1 MiB, on disk
  beyond) and is read and decoded on the model thread only, so at most one decoded upload exists at a
  time; past ``max_pending`` queued requests the answer is 503 with ``Retry-After``;
* **time**: a request gets 504 once it has waited for and used the model ``request_timeout_s``; its
  queued work is dropped when the deadline passes or the client disconnects; re-ranking runs in
  chunks of ``rerank_chunk`` candidates, one model call each, so that other requests run in between;
* **hosts**: only requests whose ``Host`` is an allowed name are served (DNS rebinding);
* **content types**: every response carries ``X-Content-Type-Options: nosniff``, the page a
  Content-Security-Policy, ``/images/{id}`` the media type of the format the file decodes as, from
  :data:`IMAGE_TYPES` (the formats uploads are accepted in); request paths are never file paths:
  ``/images/{id}`` looks the integer id up in the index;
* **metrics** labels are bounded: route templates, and methods outside :data:`HTTP_METHODS` count as
  ``other``.
"""
from __future__ import annotations

import asyncio
import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import IO, Any, AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

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
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException

from ..io import __version__
from ..data.images import BadImageError, open_image
from ..models.vl import AbsVLModel
from ..pipelines import pipeline
from ..visualize import overlay, png_bytes
from .limits import Limits

STATIC_DIR = Path(__file__).parent / "static"
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries, headers and the text fields around the image
OVERLAY_SIDE = 320  # longest side of the attention overlays sent back (pixels)
#: The page loads /static/app.js and /static/style.css (no inline script or style), fetches the API on
#: its own origin and shows /images/*, the overlays (data: URLs) and the chosen upload (a blob: URL).
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: The image formats accepted as uploads and served by /images/{id} (PIL format → media type).
IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif",
               "BMP": "image/bmp", "TIFF": "image/tiff"}
FORMAT_LIST = ", ".join(IMAGE_TYPES)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  #: Host names served by default
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  #: metric labels; others: "other"


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
    model: str = Field(description="the model answering /vqa (--model)")
    retrieval_model: str | None = Field(description="the model searching the index (--retrieval-model); None without one")
    vqa: bool = Field(description="whether POST /vqa is available (the model has a VQA head trained for its weights)")
    search: bool = Field(description="whether GET /search is available (an index was given)")
    unavailable: dict[str, str] = Field(description="why each unavailable endpoint ('vqa', 'search') answers 503")
    index_size: int | None
    index_device: str | None = Field(description="where FAISS searches the index: cuda or cpu; None without one")
    limits: dict[str, int]


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
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.metrics.requests.labels(endpoint, method, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


class NoSniffMiddleware:
    """``X-Content-Type-Options: nosniff`` on every response: browsers never guess a content type."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Content-Type-Options"] = "nosniff"
            await send(message)

        await self.app(scope, receive, send_with_header if scope["type"] == "http" else send)


class AllowedHostsMiddleware:
    """Serves only requests whose ``Host`` header names one of ``hosts`` (``"*"``: any), against DNS
    rebinding; others get a JSON 400 naming the host and the flag that allows it.

    Like Starlette's ``TrustedHostMiddleware``, whose plain-text "Invalid host header" says neither.
    """

    def __init__(self, app: Any, hosts: tuple[str, ...]) -> None:
        self.app, self.hosts = app, frozenset(host.lower().strip("[]") for host in hosts)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and "*" not in self.hosts:
            header = Headers(scope=scope).get("host", "")
            name = urlsplit(f"//{header}").hostname if header else None
            if name not in self.hosts:
                shown = repr(header) if header else "missing"
                detail = (f"Host: {shown} is not served here (served: {', '.join(sorted(self.hosts))}); "
                          f"start the server with --allowed-host NAME to serve another host name")
                await JSONResponse({"detail": detail, "field": "Host"}, 400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
def vqa_unavailable(model: AbsVLModel, name: str) -> str | None:
    """Why ``model`` cannot answer /vqa; None when it can.

    It cannot without an answer vocabulary, nor when its config's ``trained_tasks`` (recorded at export
    by the trainer) leave out ``"vqa"``: retrieval finetuning keeps the VQA head frozen while the
    features it reads change, so its answers no longer fit. Without the record (older exports, models
    built in code) a VQA head counts as trained.
    """
    if not model.answers:
        return (f"/vqa is unavailable: model {name} has no VQA head (no answer vocabulary); "
                "serve a VQA model with --model")
    tasks = model.config.trained_tasks
    if tasks is not None and "vqa" not in tasks:
        return (f"/vqa is unavailable: model {name} was last finetuned for {', '.join(tasks) or 'another task'} "
                "with its VQA head frozen, so its answers no longer fit; serve a VQA model with --model and this "
                "one with --retrieval-model")
    return None


class ModelService:
    """The VQA model with its pipelines and the optional retriever, called one at a time on one thread."""

    def __init__(self, model: AbsVLModel, index: Any, limits: Limits, metrics: Metrics, name: str,
                 retrieval_model: AbsVLModel | None = None) -> None:
        if index is None and retrieval_model is not None:
            raise ValueError("retrieval_model needs the index it built (index=...; --index)")
        self.limits, self.metrics = limits, metrics
        self.unavailable: dict[str, str] = {}  # endpoint → why it answers 503
        self.vqa = self.attention = None
        refusal = vqa_unavailable(model, name)
        if refusal:
            self.unavailable["vqa"] = refusal
        else:
            self.vqa, self.attention = pipeline("vqa", model), pipeline("attention", model)
        self.index = index
        self.retriever = None
        self.image_ids: frozenset[int] = frozenset()
        if index is None:
            self.unavailable["search"] = ("search is unavailable: no image index is loaded "
                                          "(start the server with --index)")
        else:
            from ..retrieval import IndexMismatchError, Retriever

            try:
                self.retriever = Retriever(model if retrieval_model is None else retrieval_model, index)
            except IndexMismatchError as err:
                raise IndexMismatchError(f"{err}; or serve the model that built it with --retrieval-model") from None
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

    @asynccontextmanager
    async def queued(self, request: Request) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
        """A place in the model queue for ``request`` (503 when ``max_pending`` requests hold one).

        Yields ``call(task, fn, *args, **kwargs)``: ``fn`` run on the model thread. A call still waiting
        when the client disconnects or the request's deadline (``request_timeout_s`` from here) passes
        is dropped before it runs; the request then ends with 499 or 504.
        """
        if self.pending >= self.limits.max_pending:
            raise ApiError(503, f"server busy: {self.pending} requests are queued for the model (limit "
                           f"{self.limits.max_pending}); retry shortly", headers={"Retry-After": "1"})
        self.pending += 1
        self.metrics.pending.inc()
        deadline = asyncio.get_running_loop().time() + self.limits.request_timeout_s
        gone = asyncio.ensure_future(_client_gone(request.receive))
        try:
            yield partial(self._call, deadline, gone)
        finally:
            gone.cancel()
            self.pending -= 1
            self.metrics.pending.dec()

    async def _call(self, deadline: float, gone: asyncio.Future, task: str, fn: Callable, *args: Any,
                    **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self.executor, partial(self._timed, task, fn, *args, **kwargs))
        await asyncio.wait((work, gone), timeout=max(0.0, deadline - loop.time()),
                           return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()  # not started yet: it never runs (once running, its result is dropped)
        if gone.done():
            raise ApiError(499, "the client disconnected: its queued model work was dropped")
        raise ApiError(504, f"request timed out: no answer within request_timeout_s={self.limits.request_timeout_s} s "
                       f"({self.pending} requests are queued for the model); retry later or ask for less work "
                       "(a smaller rerank)")

    def _timed(self, task: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        with self.metrics.model_seconds.labels(task).time():
            return fn(*args, **kwargs)

    def answer_upload(
        self, upload: IO[bytes], question: str, top_k: int
    ) -> tuple[tuple[int, int], Image.Image, list[dict], dict[str, np.ndarray]]:
        """Decode ``upload`` and answer ``question``: (image size, the image shrunk for overlays,
        top-k answers, bottom-up / top-down maps). Runs on the model thread, the one place where an
        upload's pixels are decoded."""
        upload.seek(0)
        image = decode_upload(upload.read(), self.limits.max_pixels)
        size = image.size
        answers, maps = self.vqa(image, question, top_k=top_k), self.attention(image, question)
        image.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE), Image.Resampling.BICUBIC)
        return size, image, answers, maps

    async def search(self, call: Callable[..., Awaitable[Any]], query: str, k: int, rerank: int) -> list:
        """The ``k`` best indexed images for ``query``: FAISS, then (``rerank``) the top candidates
        re-scored top-down ``rerank_chunk`` at a time, one model call each, best first."""
        hits = await call("search", self.retriever.search, query, k=rerank or k)
        if not rerank:
            return hits
        chunk = self.limits.rerank_chunk
        scored = []
        for i in range(0, len(hits), chunk):
            scored += (await call("rerank", self.retriever.rerank, [query], [hits[i : i + chunk]], chunk))[0]
        scored.sort(key=lambda hit: (-hit.rerank_score, -hit.score))
        for rank, hit in enumerate(scored[:k], 1):
            hit.rank = rank
        return scored[:k]

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


async def _client_gone(receive: Callable) -> None:
    """Returns once the client has disconnected (called after the request body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def stored_image_type(path: Path) -> str:
    """The media type of the format ``path`` decodes as; 415 unless it is one of :data:`IMAGE_TYPES`."""
    try:
        with Image.open(path, formats=tuple(IMAGE_TYPES)) as image:  # reads the header only
            image_format = "JPEG" if image.format == "MPO" else image.format  # PIL's name for multi-picture JPEG
    except Exception:  # PIL raises several types for files that are not an image it may open
        raise ApiError(415, f"image_id: the file of this image is not a {FORMAT_LIST} image, so it is not "
                       "served; rebuild the index from image files", "image_id") from None
    return IMAGE_TYPES[image_format]


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
        raise ApiError(413, f"image: {width}x{height} = {width * height:,} pixels is over the limit of "
                       f"{max_pixels:,} pixels", "image")
    try:
        return open_image(data, max_pixels=max_pixels, name="the uploaded image")
    except BadImageError as err:
        raise ApiError(422, f"image: {err.reason}", "image") from None


def _data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def attention_payload(shown: Image.Image, maps: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Each map as a PNG overlay on ``shown`` (the image shrunk to ``OVERLAY_SIDE``) plus its raw grid."""
    return {
        name: {"overlay": _data_url(overlay(shown, values)), "grid": np.asarray(values, dtype=float).tolist()}
        for name, values in maps.items()
    }


def _checked_text(field: str, value: str) -> str:
    text = value.strip()
    if not text:
        raise ApiError(422, f"{field}: must not be empty or only whitespace", field)
    return text


def _check_upload_size(upload: UploadFile, max_bytes: int) -> None:
    if upload.size is not None and upload.size > max_bytes:
        raise ApiError(413, f"image: upload is larger than the limit of {_megabytes(max_bytes)}", "image")


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


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Unexpected failures; Starlette answers them outside the middleware stack, hence the header here."""
    return JSONResponse({"detail": f"internal server error ({type(exc).__name__}); see the server log", "field": None},
                        500, headers={"X-Content-Type-Options": "nosniff"})


def create_app(model: AbsVLModel, index: Any = None, limits: Limits | None = None, model_name: str | None = None,
               allowed_hosts: tuple[str, ...] = LOCAL_HOSTS, retrieval_model: AbsVLModel | None = None,
               retrieval_model_name: str | None = None) -> FastAPI:
    """The service answering requests whose ``Host`` is one of ``allowed_hosts`` (``("*",)``: any):
    /vqa by ``model``; /search and /images over an ``absvl.retrieval.ImageIndex`` by ``retrieval_model``
    (None: ``model``), which must have built it. Names default to the models' backbones."""
    limits = limits or Limits()
    metrics = Metrics()
    name = model_name or model.config.backbone
    service = ModelService(model, index, limits, metrics, name, retrieval_model)
    retrieval_name = None
    if index is not None:
        retrieval_name = name if retrieval_model is None else retrieval_model_name or retrieval_model.config.backbone

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
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=limits.max_upload_bytes + FORM_OVERHEAD_BYTES,
                       max_upload_bytes=limits.max_upload_bytes)
    app.add_middleware(AllowedHostsMiddleware, hosts=tuple(allowed_hosts))
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # counts the 400s and 413s above too
    app.add_middleware(NoSniffMiddleware)  # outermost: on every response

    @app.post("/vqa", response_model=VQAResponse, responses=ERRORS, summary="Answer a question about an image")
    async def vqa(
        request: Request,
        image: UploadFile = File(description=f"the image (at most {limits.max_upload_bytes:,} bytes and "
                                 f"{limits.max_pixels:,} pixels)"),
        question: str = Form(min_length=1, max_length=limits.max_question_chars),
        top_k: int = Form(5, ge=1, le=limits.max_top_k, description="how many answers"),
    ) -> dict[str, Any]:
        if service.vqa is None:
            raise ApiError(503, service.unavailable["vqa"])
        question = _checked_text("question", question)
        _check_upload_size(image, limits.max_upload_bytes)
        async with service.queued(request) as call:
            size, shown, answers, maps = await call("vqa", service.answer_upload, image.file, question, top_k)
        attention = await run_in_threadpool(attention_payload, shown, maps)
        return {"question": question, "answers": answers, "image_size": size, **attention}

    @app.get("/search", response_model=SearchResponse, responses=ERRORS, summary="Search the indexed images by text")
    async def search(
        request: Request,
        q: str = Query(min_length=1, max_length=limits.max_query_chars, description="the text query"),
        k: int = Query(10, ge=1, le=limits.max_k, description="how many results"),
        rerank: int = Query(0, ge=0, le=limits.max_rerank,
                            description="re-score this many top candidates with the query steering the vision encoder "
                            "(0: none; otherwise at least k)"),
    ) -> dict[str, Any]:
        if service.retriever is None:
            raise ApiError(503, service.unavailable["search"])
        query = _checked_text("q", q)
        if 0 < rerank < k:
            raise ApiError(422, f"rerank: must be 0 (no re-ranking) or at least k={k}: re-ranking keeps only the "
                           f"re-scored candidates", "rerank")
        async with service.queued(request) as call:
            hits = await service.search(call, query, k, rerank)
        results = [
            {"rank": hit.rank, "id": int(hit.id), "score": float(hit.score),
             "rerank_score": None if hit.rerank_score is None else float(hit.rerank_score),
             "url": app.url_path_for("image", image_id=int(hit.id))}
            for hit in hits
        ]
        return {"query": query, "k": k, "rerank": rerank, "results": results}

    @app.get("/images/{image_id}", name="image", response_class=FileResponse,
             responses={code: ERRORS[code] for code in (404, 415)}, summary="An indexed image, by id")
    async def image(image_id: int) -> FileResponse:
        path = service.image_path(image_id)
        media_type = await run_in_threadpool(stored_image_type, path)
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/health", response_model=Health, summary="Service status")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "model": name, "retrieval_model": retrieval_name,
                "vqa": service.vqa is not None, "search": service.retriever is not None,
                "unavailable": service.unavailable, "index_size": len(index) if index is not None else None,
                "index_device": index.device if index is not None else None, "limits": limits.as_dict()}

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics (text format)")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_CSP})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
