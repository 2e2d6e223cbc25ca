#!/usr/bin/env python
"""A bounded concurrent load test of a running ``absvl serve`` (used by tests/serve/test_load.py).

    python scripts/loadtest.py http://127.0.0.1:8000 --requests 200 --concurrency 8 --image some.jpg

Needs ``httpx`` (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

QUERIES = ("a red circle", "a blue square left of a green triangle", "two yellow objects", "a purple shape")


@dataclass
class LoadReport:
    """Outcome of :func:`run_load`; latencies in milliseconds."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    by_endpoint: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # the first few "METHOD path -> status/error"

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_load(
    base_url: str,
    requests: int = 200,
    concurrency: int = 8,
    image: bytes | None = None,
    vqa_every: int = 10,
    queries: tuple[str, ...] = QUERIES,
    timeout: float = 60.0,
) -> LoadReport:
    """``requests`` calls, ``concurrency`` at a time: every ``vqa_every``-th a /vqa upload of ``image``
    (when given), the others alternately /search and /health. Any status but 200 counts as an error."""
    import httpx

    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must be positive")

    def one(i: int, client: httpx.Client) -> tuple[str, float, str | None]:
        start = time.perf_counter()
        try:
            if image is not None and i % vqa_every == 0:
                endpoint = "/vqa"
                response = client.post(
                    endpoint,
                    files={"image": ("load.png", image)},
                    data={"question": queries[i % len(queries)], "top_k": "3"},
                )
            elif i % 2:
                endpoint = "/search"
                response = client.get(endpoint, params={"q": queries[i % len(queries)], "k": 10})
            else:
                endpoint = "/health"
                response = client.get(endpoint)
            error = (
                None if response.status_code == 200 else f"{endpoint} -> {response.status_code} {response.text[:200]}"
            )
        except httpx.HTTPError as exc:
            error = f"{endpoint} -> {type(exc).__name__}: {exc}"
        return endpoint, (time.perf_counter() - start) * 1000, error

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    with (
        httpx.Client(base_url=base_url, timeout=timeout, limits=limits) as client,
        ThreadPoolExecutor(max_workers=concurrency) as pool,
    ):
        outcomes = list(pool.map(lambda i: one(i, client), range(requests)))
    seconds = time.perf_counter() - start
    latencies = np.array([ms for _, ms, _ in outcomes])
    failures = [error for _, _, error in outcomes if error]
    by_endpoint: dict[str, int] = {}
    for endpoint, _, _ in outcomes:
        by_endpoint[endpoint] = by_endpoint.get(endpoint, 0) + 1
    return LoadReport(
        requests=requests,
        errors=len(failures),
        seconds=seconds,
        p50_ms=float(np.percentile(latencies, 50)),
        p99_ms=float(np.percentile(latencies, 99)),
        by_endpoint=by_endpoint,
        failures=failures[:5],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--image", type=Path, help="an image to upload to /vqa (without it: /search and /health only)")
    parser.add_argument("--vqa-every", type=int, default=10, help="every N-th request is a /vqa upload (default 10)")
    args = parser.parse_args(argv)
    report = run_load(
        args.url, args.requests, args.concurrency, args.image.read_bytes() if args.image else None, args.vqa_every
    )
    print(json.dumps({**asdict(report), "requests_per_second": round(report.requests_per_second, 1)}, indent=2))
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
