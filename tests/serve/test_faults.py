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


@pytest.mark.parametrize(
    "host",
    [
        "evil.com:80@127.0.0.1",  # user info: a URL parser finds the host 127.0.0.1 in it
        "127.0.0.1:abc",
        "localhost:99999",
        "localhost:80:80",
        "127.0.0.1/evil",
        "[::1",
        "local host",
    ],
)
def test_hosts_that_are_not_a_host_and_port_are_refused(app, model, host):
    response = local_client(app).get("/health", headers={"host": host})
    assert_refused(response, 400, "Host", "is not a host name with an optional :port", repr(host))
    any_host = local_client(create_app(model, allowed_hosts=("*",)))
    assert any_host.get("/health", headers={"host": host}).status_code == 400  # "*" allows any name, not any text


def test_allowed_hosts_are_configurable(model):
    client = local_client(create_app(model, allowed_hosts=(*LOCAL_HOSTS, "vqa.example")))
    assert client.get("/health", headers={"host": "VQA.example:443"}).status_code == 200
    assert client.get("/health", headers={"host": "other.example"}).status_code == 400
    assert (
        local_client(create_app(model, allowed_hosts=("*",))).get("/health", headers={"host": "x.y"}).status_code == 200
    )


# --- nosniff and the page's CSP -----------------------------------------------------------------
def test_every_response_says_nosniff(model, index, limits, retrieval_model):
    app = create_app(model, index, limits, retrieval_model=retrieval_model)

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
def odd_files_app(model, tmp_path_factory, retrieval_model):
    """An index of a PNG named evil.html, a PPM (decodes, not an allowed format) and a JPEG; the
    fourth file is replaced by HTML after indexing."""
    folder = tmp_path_factory.mktemp("odd-files")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    files = {"evil.html": "PNG", "plain.ppm": "PPM", "photo.jpg": "JPEG", "swapped.png": "PNG"}
    for name, image_format in files.items():
        picture.save(folder / name, format=image_format)
    build_index(retrieval_model, [folder / name for name in files], folder / "index", progress=False)
    (folder / "swapped.png").write_text("<html><script>alert(1)</script></html>")
    index = ImageIndex.load(folder / "index")
    return local_client(create_app(model, index, retrieval_model=retrieval_model)), {
        index.path_of(i).name: i for i in index.ids
    }


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
def test_a_request_past_its_deadline_gets_504_and_its_work_is_dropped(model, index, retrieval_model):
    app = create_app(model, index, Limits(request_timeout_s=1), retrieval_model=retrieval_model)
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
def test_work_of_a_client_that_went_away_is_dropped(model, index, retrieval_model):
    app = create_app(model, index, retrieval_model=retrieval_model)
    with LiveServer(app) as server, BlockedModelThread(app) as blocked:
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(server.url + "/search", params={"q": "a red circle"}, timeout=0.5)
        blocked.wait_pending(0, seconds=5)  # the server noticed the disconnect while the model was busy
        blocked.release()
        assert httpx.get(server.url + "/health").status_code == 200
        assert model_calls(app, "search") == 0
        metrics = httpx.get(server.url + "/metrics").text
    assert 'absvl_http_requests_total{endpoint="/search",method="GET",status="499"} 1.0' in metrics


def test_chunked_reranking_ranks_as_the_retriever_does(model, index, retrieval_model):
    client = local_client(create_app(model, index, Limits(rerank_chunk=3), retrieval_model=retrieval_model))
    body = client.get("/search", params={"q": "a blue square", "k": 7, "rerank": 20}).json()
    expected = Retriever(retrieval_model, index).search("a blue square", k=7, rerank=20)
    assert [r["id"] for r in body["results"]] == [hit.id for hit in expected]
    assert [r["rank"] for r in body["results"]] == list(range(1, 8))
    np.testing.assert_allclose(
        [r["rerank_score"] for r in body["results"]], [h.rerank_score for h in expected], rtol=1e-4, atol=1e-5
    )


@pytest.mark.timeout(120)
def test_a_cheap_request_runs_between_the_chunks_of_a_big_rerank(model, index, retrieval_model):
    app = create_app(model, index, Limits(rerank_chunk=4), retrieval_model=retrieval_model)
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


# --- what a refusal echoes and how it is shaped (issue 22, items 11-12) ---------------------------
def test_a_long_field_is_not_echoed_whole(client, png_bytes):
    response = ask(client, png_bytes, "x" * 60_000)  # under the 64 KiB field limit: pydantic refuses it
    assert_refused(response, 422, "question", "at most 80 characters")
    assert len(response.content) < 1_000
    error = response.json()["errors"][0]
    assert error["input"] == "x" * 80 + "…" and error["input_length"] == 60_000
    response = client.get("/search", params={"q": "y" * 5_000})
    assert_refused(response, 422, "q", "at most 80 characters")
    assert len(response.content) < 1_000 and response.json()["errors"][0]["input_length"] == 5_000
    short = ask(client, png_bytes, top_k="many").json()["errors"][0]  # short inputs are echoed as they are
    assert short["input"] == "many" and "input_length" not in short


def test_a_form_field_over_its_size_limit_is_refused_by_name(client, png_bytes):
    response = ask(client, png_bytes, "x" * 100_000)  # under the body limit (image + 64 KiB) of this app
    assert_refused(response, 413, "question", "larger than the limit of 65,536 bytes")
    assert len(response.content) < 1_000


def multipart(*parts: tuple[str, bytes, str | None]) -> bytes:
    """A multipart/form-data body (boundary ``x``) of (name, value, filename) parts, bytes as given."""
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--x\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return body + b"--x--\r\n"


def post_form(client, body: bytes, content_type: str = "multipart/form-data; boundary=x"):
    return client.post("/vqa", content=body, headers={"content-type": content_type})


def test_invalid_utf8_in_a_form_field_is_refused_by_name(client, png_bytes):
    body = multipart(("question", b"what \xff\xfe color?", None), ("image", png_bytes, "a.png"))
    assert_refused(post_form(client, body), 400, "question", "not valid utf-8 text", "byte 0xff at offset 5")
    body = multipart(("question", "what colour is the café?".encode(), None), ("image", png_bytes, "a.png"))
    response = post_form(client, body)
    assert response.status_code == 200 and response.json()["question"] == "what colour is the café?"


@pytest.mark.parametrize(
    "body, content_type, words",
    [
        (b"not multipart at all", "multipart/form-data; boundary=x", ["Invalid multipart data"]),
        (b"--x\r\n", "multipart/form-data", ["Missing boundary"]),
        (b"--x\r\nContent-Disposition: form-data\r\n\r\nv\r\n--x--\r\n", None, ['"name" must be provided']),
    ],
)
def test_malformed_multipart_is_a_json_refusal(client, body, content_type, words):
    response = post_form(client, body, content_type or "multipart/form-data; boundary=x")
    assert_refused(response, 400, None, "request body: not valid multipart/form-data", *words)


def test_the_frameworks_own_refusals_carry_field(client):
    response = client.put("/health")
    assert response.status_code == 405 and response.json() == {"detail": "Method Not Allowed", "field": None}
    assert response.headers["allow"] == "GET"
    assert client.get("/nowhere").json() == {"detail": "Not Found", "field": None}


@pytest.mark.parametrize("text", ["\u200b", "\u200b\u200c\u200d\u2060\ufeff", " \u200b\t\u3000\u00ad ", "\u200e\u200f"])
def test_invisible_text_is_refused_like_empty_text(client, png_bytes, text):
    assert_refused(ask(client, png_bytes, text), 422, "question", "must not be empty or only whitespace")
    assert_refused(client.get("/search", params={"q": text}), 422, "q", "must not be empty or only whitespace")
    assert ask(client, png_bytes, text + "red?").status_code == 200  # visible text around them is kept
