"""The models behind the service, called one at a time on one worker thread (they are not
thread-safe; the event loop stays free). Past ``max_pending`` queued requests the answer is 503;
a request's queued work is dropped once its deadline passes (504) or its client disconnects (499)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np
from fastapi import Request
from PIL import Image

from ..models.vl import AbsVLForQuestionAnswering, AbsVLModel
from ..pipelines import pipeline
from ..visualize import overlay, png_bytes
from .errors import ApiError
from .limits import Limits
from .metrics import Metrics
from .uploads import decode_upload

OVERLAY_SIDE = 320  # longest side of the attention overlays sent back (pixels)


def vqa_unavailable(model: AbsVLModel, name: str) -> str | None:
    """Why ``model`` cannot answer /vqa (it is no VQA model: an encoder or a retrieval model, whose folder holds
    no trained VQA head); None when it can."""
    if isinstance(model, AbsVLForQuestionAnswering):
        return None
    return (
        f"/vqa is unavailable: model {name} is an {type(model).__name__}, not a VQA model; serve a VQA model "
        "(absvl train vqa) with --model and this one with --retrieval-model"
    )


class ModelService:
    """The VQA model with its pipelines and the optional retriever, called one at a time on one thread."""

    def __init__(
        self,
        model: AbsVLModel,
        index: Any,
        limits: Limits,
        metrics: Metrics,
        name: str,
        retrieval_model: AbsVLModel | None = None,
    ) -> None:
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
            self.unavailable["search"] = (
                "search is unavailable: no image index is loaded (start the server with --index)"
            )
        else:
            from ..retrieval import IndexMismatchError, Retriever  # FAISS loads only when an index is served

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
            raise ApiError(
                503,
                f"server busy: {self.pending} requests are queued for the model (limit "
                f"{self.limits.max_pending}); retry shortly",
                headers={"Retry-After": "1"},
            )
        self.pending += 1
        self.metrics.pending.inc()
        deadline = asyncio.get_running_loop().time() + self.limits.request_timeout_s
        gone = asyncio.ensure_future(_client_gone(request.receive))
        try:
            yield partial(self._call, deadline, gone)
        finally:
            gone.cancel()
            if gone.done() and not gone.cancelled():
                gone.exception()  # retrieved: no "exception was never retrieved" warning
            self.pending -= 1
            self.metrics.pending.dec()

    async def _call(
        self, deadline: float, gone: asyncio.Future, task: str, fn: Callable, *args: Any, **kwargs: Any
    ) -> Any:
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self.executor, partial(self._timed, task, fn, *args, **kwargs))
        await asyncio.wait((work, gone), timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()  # not started yet: it never runs (once running, its result is dropped)
        if gone.done() and isinstance(gone.exception(), ApiError):  # e.g. its body never came (408)
            raise gone.exception()
        if gone.done():
            raise ApiError(499, "the client disconnected: its queued model work was dropped")
        raise ApiError(
            504,
            f"request timed out: no answer within request_timeout_s={self.limits.request_timeout_s} s "
            f"({self.pending} requests are queued for the model); retry later or ask for less work "
            "(a smaller rerank)",
        )

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
        re-scored top-down ``rerank_chunk`` at a time, one model call each (other requests run in
        between), best first."""
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


def attention_payload(shown: Image.Image, maps: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Each map as a PNG overlay on ``shown`` (the image shrunk to ``OVERLAY_SIDE``) plus its raw grid."""
    return {
        name: {"overlay": _data_url(overlay(shown, values)), "grid": np.asarray(values, dtype=float).tolist()}
        for name, values in maps.items()
    }


def _data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
