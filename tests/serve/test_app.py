"""The HTTP service through FastAPI's TestClient: every endpoint, every refusal."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import absvl
from absvl import AbsVLForQuestionAnswering, AbsVLModel
from absvl.retrieval import IndexMismatchError, Retriever
from absvl.retrieval.faiss_backend import gpu_available
from absvl.serve import Limits, create_app

from .conftest import ANSWERS, local_client, png_of, tiny_config

QUESTION = "what color is the circle?"


@pytest.fixture(scope="module")
def client(app):
    return local_client(app)


@pytest.fixture(scope="module")
def bare_client(model):
    """A service without an index."""
    return local_client(create_app(model))


def ask(client, image: bytes | None, question: str | None = QUESTION, **fields):
    files = {"image": ("upload.png", image, "image/png")} if image is not None else None
    data = {k: str(v) for k, v in {"question": question, **fields}.items() if v is not None}
    return client.post("/vqa", files=files, data=data)


def assert_refused(response, status: int, field: str | None, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field
    assert isinstance(body["detail"], str)
    if field is not None:
        assert body["detail"].startswith(f"{field}: ")
    for word in words:
        assert word in body["detail"], body["detail"]


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


def metric_samples(text: str) -> dict[tuple, float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# --- /health, /, /docs, /openapi.json ----------------------------------------------------------
def test_health_reports_model_index_and_limits(client, limits):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["version"] == absvl.__version__
    assert (body["model"], body["retrieval_model"]) == ("tiny-absvit", "retrieval")
    assert body["vqa"] is True and body["search"] is True and body["unavailable"] == {}
    assert body["index_size"] == 40 and body["index_device"] == "cpu"
    assert body["limits"] == limits.as_dict()


def test_health_without_an_index(bare_client):
    body = bare_client.get("/health").json()
    assert body["search"] is False and body["index_size"] is None and body["index_device"] is None
    assert body["model"] == "absvit_test_patch8"  # no name given: the backbone
    assert body["retrieval_model"] is None and list(body["unavailable"]) == ["search"]
    assert "--index" in body["unavailable"]["search"]


def test_openapi_lists_every_endpoint_and_docs_are_served(client):
    schema = client.get("/openapi.json").json()
    assert {"/vqa", "/search", "/images/{image_id}", "/health", "/metrics"} <= set(schema["paths"])
    assert "post" in schema["paths"]["/vqa"] and "get" in schema["paths"]["/search"]
    params = {p["name"]: p["schema"] for p in schema["paths"]["/search"]["get"]["parameters"]}
    assert params["k"]["maximum"] == 20 and params["rerank"]["maximum"] == 20 and params["q"]["maxLength"] == 80
    assert {"413", "415", "422"} <= set(schema["paths"]["/vqa"]["post"]["responses"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_web_page_and_its_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for needle in ('id="search-form"', 'id="vqa-form"', 'for="vqa-question"', 'role="alert"', "/static/app.js"):
        assert needle in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200


# --- POST /vqa -------------------------------------------------------------------------------
def test_vqa_answers_with_bottom_up_and_top_down_overlays(client, model, png_bytes):
    response = ask(client, png_bytes, top_k=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["question"] == QUESTION and body["image_size"] == [48, 40]
    image = Image.open(io.BytesIO(png_bytes)).convert("RGB")
    assert body["answers"] == absvl.pipeline("vqa", model)(image, QUESTION, top_k=3)
    assert all(a["answer"] in ANSWERS for a in body["answers"])
    maps = absvl.pipeline("attention", model)(image, QUESTION)
    grid = model.image_size // 8
    for name in ("bottom_up", "top_down"):
        assert np.asarray(body[name]["grid"]).shape == (grid, grid)
        np.testing.assert_allclose(body[name]["grid"], maps[name], rtol=1e-5, atol=1e-6)
        picture = decode_data_url(body[name]["overlay"])
        assert picture.format == "PNG" and picture.size == (48, 40)


def test_vqa_question_steers_only_the_top_down_map(client, png_bytes):
    a = ask(client, png_bytes, "what color is the circle?").json()
    b = ask(client, png_bytes, "how many yellow objects are there?").json()
    assert a["bottom_up"]["grid"] == b["bottom_up"]["grid"]
    assert np.abs(np.subtract(a["top_down"]["grid"], b["top_down"]["grid"])).max() > 1e-4


def test_vqa_large_images_get_small_overlays(client):
    picture = Image.new("RGB", (500, 250), "teal")
    picture.paste((200, 30, 30), (100, 50, 180, 130))
    encoded = io.BytesIO()
    picture.save(encoded, "PNG")
    body = ask(client, encoded.getvalue()).json()
    assert body["image_size"] == [500, 250]
    assert decode_data_url(body["top_down"]["overlay"]).size == (320, 160)


def test_vqa_missing_fields(client, png_bytes):
    assert_refused(ask(client, None), 422, "image", "Field required")
    assert_refused(ask(client, png_bytes, question=None), 422, "question", "Field required")


@pytest.mark.parametrize(
    "question, words", [("", []), ("   ", ["must not be empty"]), ("x" * 81, ["at most 80 characters"])]
)
def test_vqa_empty_or_too_long_question(client, png_bytes, question, words):
    assert_refused(ask(client, png_bytes, question), 422, "question", *words)


@pytest.mark.parametrize(
    "top_k, words", [(0, ["greater than or equal to 1"]), (6, ["less than or equal to 5"]), ("many", ["valid integer"])]
)
def test_vqa_top_k_out_of_bounds(client, png_bytes, top_k, words):
    assert_refused(ask(client, png_bytes, top_k=top_k), 422, "top_k", *words)


def test_vqa_refuses_content_that_is_not_an_image(client):
    assert_refused(ask(client, b"%PDF-1.4 not an image at all"), 415, "image", "not a recognised image format")
    assert_refused(ask(client, b""), 422, "image", "empty")


def test_vqa_refuses_a_truncated_image(client):
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    assert_refused(ask(client, jpeg.getvalue()[: len(jpeg.getvalue()) // 2]), 422, "image", "cannot be decoded")


def test_vqa_refuses_too_many_pixels(client):
    flat = io.BytesIO()
    Image.new("RGB", (600, 600), "white").save(flat, "PNG")  # small file, 360,000 pixels > 262,144
    assert len(flat.getvalue()) < 200_000
    assert_refused(ask(client, flat.getvalue()), 413, "image", "600x600", "262,144 pixels")


def test_vqa_refuses_too_large_uploads(client):
    big = b"\x89PNG" + bytes(300_000)
    assert_refused(ask(client, big), 413, "image", "0.190735 MB", "200,000 bytes")  # Content-Length check
    chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))  # no Content-Length: counted as it arrives
    response = client.post("/vqa", content=chunks, headers={"content-type": "multipart/form-data; boundary=x"})
    assert_refused(response, 413, "image", "200,000 bytes")
    # just over the image limit but under the body limit: refused by the upload check itself
    assert_refused(ask(client, b"\x89PNG" + bytes(200_000)), 413, "image", "200,000 bytes")


def test_vqa_without_a_vqa_head_answers_503(shapes_root, retrieval_model, png_bytes):
    torch.manual_seed(0)
    for no_head in (AbsVLModel(tiny_config(shapes_root)).eval(), retrieval_model):
        client = local_client(create_app(no_head, model_name="no-head"))
        health = client.get("/health").json()
        assert health["vqa"] is False
        words = ("no-head", f"is an {type(no_head).__name__}, not a VQA model", "--retrieval-model")
        assert all(word in health["unavailable"]["vqa"] for word in words)
        assert_refused(ask(client, png_bytes), 503, None, *words)


def test_an_index_of_another_model_is_refused(vqa_model, index):
    with pytest.raises(IndexMismatchError, match="--retrieval-model"):
        create_app(vqa_model, index)
    with pytest.raises(IndexMismatchError):
        create_app(vqa_model, index, retrieval_model=vqa_model)
    with pytest.raises(ValueError, match="retrieval_model needs the index"):
        create_app(vqa_model, retrieval_model=vqa_model)


# --- two models side by side -----------------------------------------------------------------
@pytest.fixture(scope="module")
def vqa_model(shapes_root):
    """A VQA model other than the one that built the index (other weights, another answer order)."""
    torch.manual_seed(1)
    return AbsVLForQuestionAnswering(tiny_config(shapes_root), answers=ANSWERS[::-1]).eval()


@pytest.fixture(scope="module")
def vqa_dir(vqa_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqa") / "vqa-model"
    vqa_model.save_pretrained(folder)
    return folder


def test_each_half_is_served_by_its_own_model(vqa_model, model, index, png_bytes, retrieval_model):
    client = local_client(
        create_app(
            vqa_model, index, model_name="vqa", retrieval_model=retrieval_model, retrieval_model_name="retrieval"
        )
    )
    health = client.get("/health").json()
    assert (health["model"], health["retrieval_model"]) == ("vqa", "retrieval")
    assert health["vqa"] and health["search"] and health["unavailable"] == {}
    image = Image.open(io.BytesIO(png_bytes)).convert("RGB")
    answers = ask(client, png_bytes, top_k=3).json()["answers"]
    assert answers == absvl.pipeline("vqa", vqa_model)(image, QUESTION, top_k=3)
    assert answers != absvl.pipeline("vqa", model)(image, QUESTION, top_k=3)
    results = client.get("/search", params={"q": "a red circle", "k": 5}).json()["results"]
    assert [r["id"] for r in results] == [
        hit.id for hit in Retriever(retrieval_model, index).search("a red circle", k=5)
    ]


def test_busy_service_answers_503(model, png_bytes):
    app = create_app(model, limits=Limits(max_pending=1))
    app.state.service.pending = 1  # as if one model call were running
    response = ask(local_client(app), png_bytes)
    assert_refused(response, 503, None, "server busy")
    assert response.headers["retry-after"] == "1"


# --- GET /search and /images -----------------------------------------------------------------
def test_search_ranks_indexed_images_and_links_them(client, index, index_dir):
    response = client.get("/search", params={"q": "a red circle", "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == "a red circle" and body["k"] == 5 and body["rerank"] == 0
    results = body["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    for r in results:
        assert set(r) == {"rank", "id", "score", "rerank_score", "url"}
        assert r["url"] == f"/images/{r['id']}" and r["rerank_score"] is None
    assert str(index_dir.parent) not in response.text and "path" not in response.text  # never a filesystem path
    assert str(index.path_of(0).parent) not in response.text


def test_search_with_reranking(client):
    results = client.get("/search", params={"q": "a blue square", "k": 4, "rerank": 8}).json()["results"]
    assert len(results) == 4
    scores = [r["rerank_score"] for r in results]
    assert all(isinstance(s, float) for s in scores) and scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    "params, field, words",
    [
        ({}, "q", ["Field required"]),
        ({"q": ""}, "q", ["at least 1 character"]),
        ({"q": "  \t "}, "q", ["must not be empty"]),
        ({"q": "y" * 81}, "q", ["at most 80 characters"]),
        ({"q": "red", "k": 0}, "k", ["greater than or equal to 1"]),
        ({"q": "red", "k": 21}, "k", ["less than or equal to 20"]),
        ({"q": "red", "k": "ten"}, "k", ["valid integer"]),
        ({"q": "red", "rerank": -1}, "rerank", ["greater than or equal to 0"]),
        ({"q": "red", "rerank": 21}, "rerank", ["less than or equal to 20"]),
        ({"q": "red", "k": 10, "rerank": 5}, "rerank", ["at least k=10"]),
    ],
)
def test_search_refusals(client, params, field, words):
    assert_refused(client.get("/search", params=params), 422, field, *words)


def test_search_without_an_index_answers_503(bare_client):
    assert_refused(bare_client.get("/search", params={"q": "red"}), 503, None, "no image index", "--index")
    assert_refused(bare_client.get("/images/0"), 404, "image_id", "no image index")


def test_images_serves_exactly_the_indexed_bytes(client, index):
    for image_id in (0, 17, len(index) - 1):
        response = client.get(f"/images/{image_id}")
        assert response.status_code == 200
        assert response.content == index.path_of(image_id).read_bytes()
        assert response.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("image_id", ["40", "-1", "999999"])
def test_images_unknown_ids_are_404(client, image_id):
    assert_refused(client.get(f"/images/{image_id}"), 404, "image_id", f"no indexed image has id {image_id}")


@pytest.mark.parametrize(
    "path", ["/images/abc", "/images/..%2F..%2Fetc%2Fpasswd", "/images/%2Fetc%2Fpasswd", "/images/0.jpg"]
)
def test_images_never_take_a_path(client, path):
    response = client.get(path)
    assert response.status_code in (404, 422)
    assert "root:" not in response.text


# --- GET /metrics ----------------------------------------------------------------------------
def test_metrics_count_requests_by_endpoint_and_status(model, index, png_bytes, retrieval_model):
    client = local_client(create_app(model, index, Limits(max_k=5), retrieval_model=retrieval_model))
    for _ in range(3):
        client.get("/health")
    client.get("/search", params={"q": "red", "k": 2})
    client.get("/search", params={"q": "red", "k": 99})
    client.get("/images/12345")
    ask(client, png_bytes)
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)

    def count(endpoint, method, status):
        key = ("absvl_http_requests_total", (("endpoint", endpoint), ("method", method), ("status", status)))
        return samples.get(key, 0)

    assert count("/health", "GET", "200") == 3
    assert count("/search", "GET", "200") == 1 and count("/search", "GET", "422") == 1
    assert count("/images/{image_id}", "GET", "404") == 1
    assert count("/vqa", "POST", "200") == 1
    assert samples[("absvl_http_request_duration_seconds_count", (("endpoint", "/health"),))] == 3
    assert samples[("absvl_model_call_duration_seconds_count", (("task", "search"),))] == 1
    assert samples[("absvl_model_call_duration_seconds_count", (("task", "vqa"),))] == 1
    assert samples[("absvl_index_size", ())] == len(index)
    assert samples[("absvl_model_calls_pending", ())] == 0


def test_unknown_routes_are_404(client):
    assert client.get("/nowhere").status_code == 404
    assert client.get("/vqa").status_code == 405


# --- absvl serve -----------------------------------------------------------------------------
def serve(monkeypatch, *argv: str) -> dict:
    """``absvl serve ARGV`` with uvicorn.run caught: {"app": the app, **uvicorn's options}."""
    import uvicorn

    from absvl.cli import main

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    assert main(["serve", *argv]) == 0
    return served


def test_serve_command_builds_the_app_and_runs_uvicorn(model_dir, retrieval_dir, index_dir, monkeypatch, capsys):
    served = serve(
        monkeypatch,
        "--model",
        str(model_dir),
        "--index",
        str(index_dir),
        "--port",
        "8123",
        "--max-upload-mb",
        "0.5",
        "--max-pixels",
        "1000",
        "--max-pending",
        "5",
        "--request-timeout",
        "7",
        "--allowed-host",
        "vqa.example",
        "--allowed-host",
        "vqa.internal",
        "--header-timeout",
        "3",
        "--body-timeout",
        "4",
        "--max-connections",
        "9",
    )
    assert served["host"] == "127.0.0.1" and served["port"] == 8123
    assert served["http"].limits == served["app"].state.service.limits  # the slow-client guard (connections.py)
    assert (served["timeout_keep_alive"], served["h11_max_incomplete_event_size"]) == (5, 16 * 1024)
    name = f"{model_dir.parent.name}/tiny-absvit"  # the folder's last two parts: never the server's full path
    index_model = f"{retrieval_dir.parent.name}/tiny-absvit-retrieval"  # the model the index records
    out = capsys.readouterr().out
    assert f"/vqa: model {name}\n" in out and f"/search: model {index_model}, 40 indexed images (FAISS on cpu)" in out
    client = local_client(served["app"])
    health = client.get("/health").json()
    assert (health["model"], health["retrieval_model"], health["index_size"]) == (name, index_model, 40)
    assert health["limits"]["max_upload_bytes"] == 524_288 and health["limits"]["max_pixels"] == 1000
    assert health["limits"]["max_pending"] == 5 and health["limits"]["request_timeout_s"] == 7
    assert health["limits"]["header_timeout_s"] == 3 and health["limits"]["body_timeout_s"] == 4
    assert health["limits"]["max_connections"] == 9
    for host, status in [("vqa.example", 200), ("vqa.internal:8123", 200), ("127.0.0.1", 200), ("evil.example", 400)]:
        assert client.get("/health", headers={"host": host}).status_code == status, host
    assert_refused(ask(client, png_of(48, 40)), 413, "image", "1,000 pixels")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-upload-mb", "0"], "--max-upload-mb must be positive"),
        (["--max-pixels", "0"], "max_pixels must be a positive integer"),
        (["--max-pending", "0"], "max_pending must be a positive integer"),
        (["--request-timeout", "-1"], "request_timeout_s must be a positive integer"),
        (["--header-timeout", "0"], "header_timeout_s must be a positive integer"),
        (["--body-timeout", "0"], "body_timeout_s must be a positive integer"),
        (["--max-connections", "0"], "max_connections must be a positive integer"),
    ],
)
def test_serve_command_refuses_bad_limits(model_dir, capsys, extra, message):
    from absvl.cli import main

    assert main(["serve", "--model", str(model_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("absvl: error: ") and message in err and err.count("\n") == 1


def test_serve_command_serves_a_vqa_model_beside_the_index_model(
    vqa_dir, retrieval_dir, index_dir, monkeypatch, capsys
):
    """--retrieval-model defaults to the model the index records; --model answers the questions."""
    for extra in ([], ["--retrieval-model", str(retrieval_dir)]):
        health = (
            local_client(serve(monkeypatch, "--model", str(vqa_dir), "--index", str(index_dir), *extra)["app"])
            .get("/health")
            .json()
        )
        index_model = f"{retrieval_dir.parent.name}/tiny-absvit-retrieval"
        assert (health["model"], health["retrieval_model"]) == (f"{vqa_dir.parent.name}/vqa-model", index_model)
        assert health["vqa"] and health["search"]
        assert f"/search: model {index_model}, 40 indexed images" in capsys.readouterr().out


def test_serve_command_refuses_a_retrieval_model_that_did_not_build_the_index(vqa_dir, model_dir, index_dir, capsys):
    from absvl.cli import main

    assert main(["serve", "--model", str(model_dir), "--index", str(index_dir), "--retrieval-model", str(vqa_dir)]) == 2
    err = capsys.readouterr().err
    assert "was built by a different model" in err and "--retrieval-model" in err
    assert main(["serve", "--model", str(model_dir), "--retrieval-model", str(vqa_dir)]) == 2
    assert "give that index with --index" in capsys.readouterr().err


def test_serve_command_places_the_index(model_dir, index_dir, monkeypatch, capsys):
    """--index-device auto takes the GPU when FAISS can use one; cuda without one is refused, saying why
    (the placement itself: tests/retrieval/test_index.py, with stand-ins for FAISS's GPU functions)."""
    from absvl.cli import main

    health = (
        local_client(serve(monkeypatch, "--model", str(model_dir), "--index", str(index_dir))["app"])
        .get("/health")
        .json()
    )
    assert health["index_device"] == ("cuda" if gpu_available() else "cpu")
    health = (
        local_client(
            serve(monkeypatch, "--model", str(model_dir), "--index", str(index_dir), "--index-device", "cpu")["app"]
        )
        .get("/health")
        .json()
    )
    assert health["index_device"] == "cpu"
    if not gpu_available():
        capsys.readouterr()
        assert main(["serve", "--model", str(model_dir), "--index", str(index_dir), "--index-device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("absvl: error: --index-device cuda: index ") and "use --index-device auto or cpu" in err


def test_serve_command_refuses_a_missing_model_or_index(model_dir, tmp_path, capsys):
    from absvl.cli import main

    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("absvl: error: ") and str(tmp_path / "nope") in err and err.count("\n") == 1
    assert main(["serve", "--model", str(model_dir), "--index", str(tmp_path / "no-index")]) == 2
    assert "does not exist" in capsys.readouterr().err
