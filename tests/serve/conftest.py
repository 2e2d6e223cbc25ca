"""Shared fixtures: a tiny saved model, an index of the Shapes images, and a live uvicorn server."""

from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from absvl import AbsVLConfig, AbsVLForQuestionAnswering, AbsVLForRetrieval
from absvl.retrieval import ImageIndex, build_index
from absvl.serve import Limits, create_app
from absvl.serve.connections import uvicorn_options

ANSWERS = ["yes", "no", "red", "blue", "green", "circle", "square", "triangle", "1", "2"]


def tiny_config(shapes_root) -> AbsVLConfig:
    """The tests' tiny architecture (32-pixel AbSViT, one fusion layer, the Shapes text encoder)."""
    return AbsVLConfig(
        backbone="absvit_test_patch8",
        backbone_kwargs={"img_size": 32},
        text_encoder=str(shapes_root / "text_encoder"),
        fusion_hidden_size=32,
        fusion_layers=1,
        fusion_heads=2,
        max_text_len=16,
    )


def _saved(model, folder):
    with torch.no_grad():  # a feedback path strong enough for visible top-down effects
        for p in model.backbone.decoders.parameters():
            p.mul_(10.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def model_dir(shapes_root, tmp_path_factory):
    """A tiny VQA model written with save_pretrained (as `absvl serve --model` gets it)."""
    torch.manual_seed(0)
    model = AbsVLForQuestionAnswering(tiny_config(shapes_root), answers=ANSWERS)
    return _saved(model, tmp_path_factory.mktemp("model") / "tiny-absvit")


@pytest.fixture(scope="session")
def model(model_dir):
    return AbsVLForQuestionAnswering.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def retrieval_dir(shapes_root, tmp_path_factory):
    """A tiny retrieval model (the index's: `absvl serve --retrieval-model`, or the model the index records)."""
    torch.manual_seed(0)
    model = AbsVLForRetrieval(tiny_config(shapes_root))
    return _saved(model, tmp_path_factory.mktemp("retrieval") / "tiny-absvit-retrieval")


@pytest.fixture(scope="session")
def retrieval_model(retrieval_dir):
    return AbsVLForRetrieval.from_pretrained(retrieval_dir)


@pytest.fixture(scope="session")
def index_dir(retrieval_model, retrieval_dir, shapes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "shapes-index"
    build_index(
        retrieval_model, shapes_root / "images", out, batch_size=16, progress=False, model_source=str(retrieval_dir)
    )
    return out


@pytest.fixture(scope="session")
def index(index_dir):
    return ImageIndex.load(index_dir)


@pytest.fixture(scope="session")
def limits():
    """Small limits so that the 4xx cases are cheap to provoke."""
    return Limits(
        max_upload_bytes=200_000,
        max_pixels=512 * 512,
        max_question_chars=80,
        max_query_chars=80,
        max_top_k=5,
        max_k=20,
        max_rerank=20,
    )


@pytest.fixture(scope="session")
def app(model, retrieval_model, index, limits):
    return create_app(
        model,
        index,
        limits,
        model_name="tiny-absvit",
        retrieval_model=retrieval_model,
        retrieval_model_name="retrieval",
    )


def local_client(app, **options) -> TestClient:
    """A TestClient sending ``Host: localhost`` (its default ``testserver`` is not an allowed host)."""
    return TestClient(app, base_url="http://localhost", **options)


def png_of(width: int = 48, height: int = 40, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def png_bytes():
    return png_of()


class LiveServer:
    """uvicorn serving ``app`` on a free localhost port, in a background thread, as ``absvl serve``
    runs it (:func:`~absvl.serve.connections.uvicorn_options` of the app's limits)."""

    def __init__(self, app) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        options = uvicorn_options(app.state.service.limits)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


@pytest.fixture(scope="session")
def live_server(model, retrieval_model, index_dir):
    """A real server with default limits (its own app: the TestClient app's metrics stay separate)."""
    app = create_app(model, ImageIndex.load(index_dir), model_name="tiny-absvit", retrieval_model=retrieval_model)
    with LiveServer(app) as server:
        yield server
