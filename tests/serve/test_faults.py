"""The service under faults: hostile hosts and files, content sniffing, slow or vanished clients,
expensive searches, junk methods, uploads decoded only inside the bounded model queue."""

from __future__ import annotations

import io
import re
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from absvl.retrieval import ImageIndex, Retriever, build_index
from absvl.serve import Limits, create_app
from absvl.serve import service as service_module
from absvl.serve.app import STATIC_DIR
from absvl.serve.hardening import LOCAL_HOSTS, PAGE_CSP
from absvl.serve.uploads import FORMAT_LIST, IMAGE_TYPES

from .conftest import LiveServer, local_client, png_of
from .test_app import ask, assert_refused, metric_samples


@pytest.fixture(scope="module")
def client(app):
    return local_client(app)


class BlockedModelThread:
    """Holds the model thread busy until :meth:`release` (at the latest after ``seconds``)."""

    def __init__(self, app, seconds: float = 10.0) -> None:
        self.service = app.state.service
        self.event = threading.Event()
        self.timer = threading.Timer(seconds, self.event.set)

    def __enter__(self) -> BlockedModelThread:
        self.timer.start()
        self.service.executor.submit(self.event.wait)
        return self

    def release(self) -> None:
        self.event.set()
        self.timer.cancel()

    def __exit__(self, *exc) -> None:
        self.release()

    def wait_pending(self, count: int, seconds: float = 10.0) -> None:
        deadline = time.monotonic() + seconds
        while self.service.pending != count:
            assert time.monotonic() < deadline, f"pending stayed {self.service.pending}, expected {count}"
            time.sleep(0.01)


def model_calls(app, task: str) -> float:
    samples = metric_samples(local_client(app).get("/metrics").text)
    return samples.get(("absvl_model_call_duration_seconds_count", (("task", task),)), 0)


# --- memory: uploads are decoded inside the model queue ---------------------------------------
def test_uploads_are_decoded_on_the_model_thread_only(client, png_bytes, monkeypatch):
    threads = []
    decode = service_module.decode_upload
    monkeypatch.setattr(
        service_module, "decode_upload", lambda *a: threads.append(threading.current_thread().name) or decode(*a)
    )
    assert ask(client, png_bytes).status_code == 200
    assert len(threads) == 1 and threads[0].startswith("absvl-model")


def test_a_full_queue_refuses_uploads_before_reading_them(model, png_bytes, monkeypatch):
    app = create_app(model, limits=Limits(max_pending=2))
    app.state.service.pending = 2
    monkeypatch.setattr(service_module, "decode_upload", lambda *a: pytest.fail("a refused upload was decoded"))
    response = ask(local_client(app), png_bytes)
    assert_refused(response, 503, None, "server busy", "limit 2")
    assert response.headers["retry-after"] == "1"


# --- hosts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"])
def test_local_hosts_are_served(app, host):
    assert local_client(app).get("/health", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["testserver", "evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""])
def test_other_hosts_are_refused(app, host):
    response = local_client(app).get("/health", headers={"host": host})
    assert_refused(response, 400, "Host", "is not served here", "--allowed-host")
    assert (repr(host) if host else "missing") in response.json()["detail"]


def test_allowed_hosts_are_configurable(model):
    client = local_client(create_app(model, allowed_hosts=(*LOCAL_HOSTS, "vqa.example")))
    assert client.get("/health", headers={"host": "VQA.example:443"}).status_code == 200
    assert client.get("/health", headers={"host": "other.example"}).status_code == 400
    assert (
        local_client(create_app(model, allowed_hosts=("*",))).get("/health", headers={"host": "x.y"}).status_code == 200
    )


# --- nosniff and the page's CSP -----------------------------------------------------------------
def test_every_response_says_nosniff(model, index, limits):
    app = create_app(model, index, limits)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    client = local_client(app, raise_server_exceptions=False)
    responses = {
        "page": client.get("/"),
        "static": client.get("/static/app.js"),
        "health": client.get("/health"),
        "metrics": client.get("/metrics"),
        "image": client.get("/images/0"),
        "docs": client.get("/docs"),
        "404": client.get("/nowhere"),
        "405": client.get("/vqa"),
        "422": client.get("/search"),
        "413": client.post("/vqa", content=b"x" * 300_000, headers={"content-type": "multipart/form-data; boundary=x"}),
        "415": ask(client, b"not an image"),
        "400": client.get("/health", headers={"host": "evil.example"}),
        "500": client.get("/boom"),
    }
    assert {name: r.status_code for name, r in responses.items()}["500"] == 500
    assert responses["500"].json()["detail"] == "internal server error (RuntimeError); see the server log"
    for name, response in responses.items():
        assert response.headers.get("x-content-type-options") == "nosniff", name


def test_page_csp_allows_only_its_own_files():
    page = (STATIC_DIR / "index.html").read_text()
    assert re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.S) == [(' src="/static/app.js" defer', "")]
    assert "<style" not in page and not re.search(r"\s(style|on[a-z]+)=", page)
    csp = PAGE_CSP
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    directives = dict(part.strip().split(" ", 1) for part in csp.split(";"))
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["img-src"] == "'self' data: blob:"  # /images/*, the overlays, the chosen upload
    assert directives["frame-ancestors"] == "'none'" and directives["object-src"] == "'none'"


def test_page_is_sent_with_its_csp(client):
    assert client.get("/").headers["content-security-policy"] == PAGE_CSP


# --- /images/{id}: the decoded format's type, never the file name's ----------------------------
@pytest.fixture(scope="module")
def odd_files_app(model, tmp_path_factory):
    """An index of a PNG named evil.html, a PPM (decodes, not an allowed format) and a JPEG; the
    fourth file is replaced by HTML after indexing."""
    folder = tmp_path_factory.mktemp("odd-files")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    files = {"evil.html": "PNG", "plain.ppm": "PPM", "photo.jpg": "JPEG", "swapped.png": "PNG"}
    for name, image_format in files.items():
        picture.save(folder / name, format=image_format)
    build_index(model, [folder / name for name in files], folder / "index", progress=False)
    (folder / "swapped.png").write_text("<html><script>alert(1)</script></html>")
    index = ImageIndex.load(folder / "index")
    return local_client(create_app(model, index)), {index.path_of(i).name: i for i in index.ids}


def test_images_are_served_as_their_decoded_format(odd_files_app):
    client, ids = odd_files_app
    png = client.get(f"/images/{ids['evil.html']}")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    assert client.get(f"/images/{ids['photo.jpg']}").headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("name", ["plain.ppm", "swapped.png"])
def test_images_in_other_formats_are_refused(odd_files_app, name):
    client, ids = odd_files_app
    response = client.get(f"/images/{ids[name]}")
    assert_refused(response, 415, "image_id", f"not a {FORMAT_LIST} image", "not served")
    assert response.headers["content-type"] == "application/json"


# --- uploads: one allow-list for the check and the message -------------------------------------
def test_uploads_outside_the_allow_list_are_refused_by_name(client):
    ppm = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(ppm, format="PPM")  # PIL decodes it, but it is not on the list
    response = ask(client, ppm.getvalue())
    assert_refused(response, 415, "image", f"send {FORMAT_LIST}")
    assert all(name in response.json()["detail"] for name in IMAGE_TYPES)


@pytest.mark.parametrize("image_format", list(IMAGE_TYPES))
def test_uploads_in_each_allowed_format_are_answered(client, image_format):
    data = io.BytesIO()
    Image.open(io.BytesIO(png_of())).save(data, format=image_format)
    assert ask(client, data.getvalue()).status_code == 200


# --- deadlines, vanished clients, big searches --------------------------------------------------
@pytest.mark.timeout(60)
def test_a_request_past_its_deadline_gets_504_and_its_work_is_dropped(model, index):
    app = create_app(model, index, Limits(request_timeout_s=1))
    client = local_client(app)
    with BlockedModelThread(app):
        start = time.monotonic()
        response = client.get("/search", params={"q": "a red circle"})
        assert 0.9 < time.monotonic() - start < 5
    assert_refused(response, 504, None, "request_timeout_s=1 s", "retry later")
    assert app.state.service.pending == 0
    assert model_calls(app, "search") == 0  # cancelled while queued: it never ran
    assert client.get("/search", params={"q": "a red circle"}).status_code == 200


@pytest.mark.timeout(60)
def test_work_of_a_client_that_went_away_is_dropped(model, index):
    app = create_app(model, index)
    with LiveServer(app) as server, BlockedModelThread(app) as blocked:
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(server.url + "/search", params={"q": "a red circle"}, timeout=0.5)
        blocked.wait_pending(0, seconds=5)  # the server noticed the disconnect while the model was busy
        blocked.release()
        assert httpx.get(server.url + "/health").status_code == 200
        assert model_calls(app, "search") == 0
        metrics = httpx.get(server.url + "/metrics").text
    assert 'absvl_http_requests_total{endpoint="/search",method="GET",status="499"} 1.0' in metrics


def test_chunked_reranking_ranks_as_the_retriever_does(model, index):
    client = local_client(create_app(model, index, Limits(rerank_chunk=3)))
    body = client.get("/search", params={"q": "a blue square", "k": 7, "rerank": 20}).json()
    expected = Retriever(model, index).search("a blue square", k=7, rerank=20)
    assert [r["id"] for r in body["results"]] == [hit.id for hit in expected]
    assert [r["rank"] for r in body["results"]] == list(range(1, 8))
    np.testing.assert_allclose(
        [r["rerank_score"] for r in body["results"]], [h.rerank_score for h in expected], rtol=1e-4, atol=1e-5
    )


@pytest.mark.timeout(120)
def test_a_cheap_request_runs_between_the_chunks_of_a_big_rerank(model, index):
    app = create_app(model, index, Limits(rerank_chunk=4))
    finished = {}

    def get(name: str, params: dict) -> None:
        assert httpx.get(server.url + "/search", params=params, timeout=60).status_code == 200
        finished[name] = time.monotonic()

    with LiveServer(app) as server, BlockedModelThread(app) as blocked:
        big = threading.Thread(target=get, args=("big", {"q": "a red circle", "k": 10, "rerank": 40}))
        big.start()
        blocked.wait_pending(1)
        cheap = threading.Thread(target=get, args=("cheap", {"q": "a blue square", "k": 5}))
        cheap.start()
        blocked.wait_pending(2)
        blocked.release()
        big.join()
        cheap.join()
    assert finished["cheap"] < finished["big"]
    assert model_calls(app, "rerank") == 10  # 40 candidates, 4 per model call


# --- metrics labels -------------------------------------------------------------------------------
def test_metric_labels_stay_bounded(model):
    app = create_app(model)
    client = local_client(app)
    for method in ("BREW", "PROPFIND", "X" * 50):
        assert client.request(method, "/health").status_code == 405
    client.get("/static/../../etc/passwd")
    client.get("/some/random/path/123")
    samples = metric_samples(client.get("/metrics").text)
    labels = [dict(key[1]) for key in samples if key[0] == "absvl_http_requests_total"]
    assert {label["method"] for label in labels} == {"GET", "other"}
    assert {label["endpoint"] for label in labels} <= {"/health", "/static", "unmatched"}
    assert (
        samples[("absvl_http_requests_total", (("endpoint", "/health"), ("method", "other"), ("status", "405")))] == 3
    )
