"""The HTTP service's routes: ``POST /vqa``, ``GET /search``, ``GET /images/{id}``, ``GET /health``,
``GET /metrics``, ``GET /`` (the web page), ``/docs``; how each is guarded is in docs/serve.md.

``model`` answers /vqa and ``retrieval_model`` (default: ``model``) searches the index it built.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .._version import __version__
from ..models.vl import AbsVLModel
from .connections import BodyTimeoutMiddleware
from .errors import ERRORS, ApiError, api_error, checked_text, http_error, internal_error, validation_error
from .hardening import LOCAL_HOSTS, PAGE_CSP, AllowedHostsMiddleware, NoSniffMiddleware
from .limits import Limits
from .metrics import Metrics, MetricsMiddleware
from .service import ModelService, attention_payload
from .uploads import FORM_OVERHEAD_BYTES, BodySizeLimitMiddleware, FormRoute, check_upload_size, stored_image_type

STATIC_DIR = Path(__file__).parent / "static"


# --- response schemas (they document the API in /openapi.json) ------------------------------
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
    retrieval_model: str | None = Field(
        description="the model searching the index (--retrieval-model); None without one"
    )
    vqa: bool = Field(description="whether POST /vqa is available (the model has a VQA head trained for its weights)")
    search: bool = Field(description="whether GET /search is available (an index was given)")
    unavailable: dict[str, str] = Field(description="why each unavailable endpoint ('vqa', 'search') answers 503")
    index_size: int | None
    index_device: str | None = Field(description="where FAISS searches the index: cuda or cpu; None without one")
    limits: dict[str, int]


def create_app(
    model: AbsVLModel,
    index: Any = None,
    limits: Limits | None = None,
    model_name: str | None = None,
    allowed_hosts: tuple[str, ...] = LOCAL_HOSTS,
    retrieval_model: AbsVLModel | None = None,
    retrieval_model_name: str | None = None,
) -> FastAPI:
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
    app.router.route_class = FormRoute  # multipart forms parsed strictly (uploads.FormRequest)
    app.state.service = service
    app.state.metrics = metrics
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=limits.max_upload_bytes + FORM_OVERHEAD_BYTES,
        max_upload_bytes=limits.max_upload_bytes,
    )
    app.add_middleware(BodyTimeoutMiddleware, seconds=limits.body_timeout_s)
    app.add_middleware(AllowedHostsMiddleware, hosts=tuple(allowed_hosts))
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # counts the 400s and 413s above too
    app.add_middleware(NoSniffMiddleware)  # outermost: on every response

    @app.post("/vqa", response_model=VQAResponse, responses=ERRORS, summary="Answer a question about an image")
    async def vqa(
        request: Request,
        image: UploadFile = File(
            description=f"the image (at most {limits.max_upload_bytes:,} bytes and {limits.max_pixels:,} pixels)"
        ),
        question: str = Form(min_length=1, max_length=limits.max_question_chars),
        top_k: int = Form(5, ge=1, le=limits.max_top_k, description="how many answers"),
    ) -> dict[str, Any]:
        if service.vqa is None:
            raise ApiError(503, service.unavailable["vqa"])
        question = checked_text("question", question)
        check_upload_size(image, limits.max_upload_bytes)
        async with service.queued(request) as call:
            size, shown, answers, maps = await call("vqa", service.answer_upload, image.file, question, top_k)
        attention = await run_in_threadpool(attention_payload, shown, maps)
        return {"question": question, "answers": answers, "image_size": size, **attention}

    @app.get("/search", response_model=SearchResponse, responses=ERRORS, summary="Search the indexed images by text")
    async def search(
        request: Request,
        q: str = Query(min_length=1, max_length=limits.max_query_chars, description="the text query"),
        k: int = Query(10, ge=1, le=limits.max_k, description="how many results"),
        rerank: int = Query(
            0,
            ge=0,
            le=limits.max_rerank,
            description="re-score this many top candidates with the query steering the vision encoder "
            "(0: none; otherwise at least k)",
        ),
    ) -> dict[str, Any]:
        if service.retriever is None:
            raise ApiError(503, service.unavailable["search"])
        query = checked_text("q", q)
        if 0 < rerank < k:
            raise ApiError(
                422,
                f"rerank: must be 0 (no re-ranking) or at least k={k}: re-ranking keeps only the re-scored candidates",
                "rerank",
            )
        async with service.queued(request) as call:
            hits = await service.search(call, query, k, rerank)
        results = [
            {
                "rank": hit.rank,
                "id": int(hit.id),
                "score": float(hit.score),
                "rerank_score": None if hit.rerank_score is None else float(hit.rerank_score),
                "url": app.url_path_for("image", image_id=int(hit.id)),
            }
            for hit in hits
        ]
        return {"query": query, "k": k, "rerank": rerank, "results": results}

    @app.get(
        "/images/{image_id}",
        name="image",
        response_class=FileResponse,
        responses={code: ERRORS[code] for code in (404, 415)},
        summary="An indexed image, by id",
    )
    async def image(image_id: int) -> FileResponse:
        path = service.image_path(image_id)
        media_type = await run_in_threadpool(stored_image_type, path)
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/health", response_model=Health, summary="Service status")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "model": name,
            "retrieval_model": retrieval_name,
            "vqa": service.vqa is not None,
            "search": service.retriever is not None,
            "unavailable": service.unavailable,
            "index_size": len(index) if index is not None else None,
            "index_device": index.device if index is not None else None,
            "limits": limits.as_dict(),
        }

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics (text format)")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html", media_type="text/html", headers={"Content-Security-Policy": PAGE_CSP}
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
