"""A bounded concurrent load test against the real server: 200 requests, 8 at a time, no errors;
200 requests 16 at a time while 50 slow clients hold connections open, no errors."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "loadtest.py"
LOADTEST = runpy.run_path(str(SCRIPT))


@pytest.mark.slow
def test_200_requests_8_at_a_time_without_errors(live_server, png_bytes):
    report = LOADTEST["run_load"](live_server.url, requests=200, concurrency=8, image=png_bytes, vqa_every=10)
    print(
        f"\nload: {report.requests} requests ({report.by_endpoint}), 8 concurrent, {report.seconds:.1f} s, "
        f"{report.requests_per_second:.0f} req/s, p50 {report.p50_ms:.1f} ms, p99 {report.p99_ms:.1f} ms"
    )
    assert report.errors == 0, report.failures
    assert report.by_endpoint == {"/vqa": 20, "/search": 100, "/health": 80}
    assert 0 < report.p50_ms <= report.p99_ms

    import httpx

    metrics = httpx.get(live_server.url + "/metrics").text
    served = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "absvl_http_requests_total"
    }
    assert served[("/vqa", "200")] >= 20 and served[("/search", "200")] >= 100 and served[("/health", "200")] >= 80
    assert not any(status.startswith("5") for _, status in served)


@pytest.mark.slow
def test_200_requests_16_at_a_time_while_50_slow_clients_hold_connections(live_server, png_bytes):
    """The load test with 50 slow connections held open throughout (issue 22): none of the 200 fails."""
    report = LOADTEST["run_load"](
        live_server.url, requests=200, concurrency=16, image=png_bytes, vqa_every=10, slow_clients=50
    )
    print(
        f"\nload with 50 slow clients: {report.requests} requests, 16 concurrent, {report.seconds:.1f} s, "
        f"{report.requests_per_second:.0f} req/s, p50 {report.p50_ms:.1f} ms, p99 {report.p99_ms:.1f} ms; "
        f"slow: {report.slow_clients}"
    )
    assert report.errors == 0, report.failures
    assert report.slow_clients["held"] == report.slow_clients["held_at_end"] == 50


BIG_CLIENTS = 4  # enough to keep the model thread busy


@pytest.mark.slow
def test_cheap_searches_run_between_the_chunks_of_big_reranks(model, retrieval_model, index):
    """A cheap search's latency while big re-rankings (rerank=40, the whole index) run back to back,
    re-ranked in one model call (rerank_chunk=100) and in chunks of 8 (the default is 32)."""
    import threading
    import time

    import httpx

    from absvl.serve import Limits, create_app

    from .conftest import LiveServer

    def timed(client: httpx.Client, params: dict) -> float:
        start = time.perf_counter()
        assert client.get("/search", params=params).status_code == 200
        return (time.perf_counter() - start) * 1000

    figures = {}
    for chunk in (100, 8):
        with LiveServer(
            create_app(model, index, Limits(rerank_chunk=chunk), retrieval_model=retrieval_model)
        ) as server:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                idle = [timed(client, {"q": "a blue square", "k": 5}) for _ in range(20)]
            stop, big = threading.Event(), []

            def rerank_loop(stop: threading.Event = stop, big: list = big) -> None:
                with httpx.Client(base_url=server.url, timeout=60) as client:
                    while not stop.is_set():
                        big.append(timed(client, {"q": "a red circle", "k": 10, "rerank": 40}))

            loops = [threading.Thread(target=rerank_loop) for _ in range(BIG_CLIENTS)]
            for loop in loops:
                loop.start()
            time.sleep(0.3)
            start = time.perf_counter()
            with httpx.Client(base_url=server.url, timeout=60) as client:
                cheap = [timed(client, {"q": "a blue square", "k": 5}) for _ in range(40)]
            seconds = time.perf_counter() - start
            stop.set()
            for loop in loops:
                loop.join()
        figures[chunk] = {
            "idle": np.median(idle),
            "cheap": np.median(cheap),
            "cheap_p90": np.percentile(cheap, 90),
            "big": np.median(big),
            "big_per_s": len(big) / seconds,
        }
        f = figures[chunk]
        print(
            f"\nrerank_chunk={chunk}: cheap /search p50 {f['cheap']:.0f} ms, p90 {f['cheap_p90']:.0f} ms (idle "
            f"{f['idle']:.0f} ms) while {BIG_CLIENTS} clients run rerank=40 searches back to back "
            f"(p50 {f['big']:.0f} ms, {f['big_per_s']:.1f}/s)"
        )
    assert figures[8]["cheap"] < figures[8]["big"]
