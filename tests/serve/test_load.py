"""A bounded concurrent load test against the real server: 200 requests, 8 at a time, no errors."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from absvl.serve.loadtest import run_load


@pytest.mark.slow
def test_200_requests_8_at_a_time_without_errors(live_server, png_bytes):
    report = run_load(live_server.url, requests=200, concurrency=8, image=png_bytes, vqa_every=10)
    print(f"\nload: {report.requests} requests ({report.by_endpoint}), 8 concurrent, {report.seconds:.1f} s, "
          f"{report.requests_per_second:.0f} req/s, p50 {report.p50_ms:.1f} ms, p99 {report.p99_ms:.1f} ms")
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
