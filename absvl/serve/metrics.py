"""Prometheus metrics of the service (``GET /metrics``). Labels are bounded: route templates, and
methods outside :data:`HTTP_METHODS` count as ``other``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    """Prometheus metrics of one app, in a registry of its own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # CPU time, memory, open files (Linux)
        self.requests = Counter(
            "absvl_http_requests",
            "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "absvl_http_request_duration_seconds",
            "HTTP request latency by endpoint",
            ["endpoint"],
            registry=self.registry,
        )
        self.model_seconds = Histogram(
            "absvl_model_call_duration_seconds",
            "Model call time by task (excluding queueing)",
            ["task"],
            registry=self.registry,
        )
        self.pending = Gauge("absvl_model_calls_pending", "Model calls queued or running", registry=self.registry)
        self.index_size = Gauge(
            "absvl_index_size", "Images in the search index (0 without one)", registry=self.registry
        )


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
