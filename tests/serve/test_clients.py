"""Slow and surplus clients against a real uvicorn server (issue 22, item 1): a request's headers and
body must arrive within their timeouts or the connection is closed (408), the number of open
connections is capped, and normal clients are answered while slow ones hold connections."""

from __future__ import annotations

import json
import runpy
import socket
import time
from pathlib import Path

import httpx
import pytest

from absvl.serve import Limits, create_app
from absvl.serve.connections import BODY_GRACE_S, KEEP_ALIVE_S, MAX_HEADER_BYTES, GuardedH11Protocol

from .conftest import LiveServer

LOADTEST = runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "loadtest.py"))
SlowClients = LOADTEST["SlowClients"]

TIMEOUT_S = 2  # header and body timeouts of the server under test
SLACK_S = 1.5  # a loaded 2-core machine may close a connection this late


@pytest.fixture(scope="module")
def server(model, index, retrieval_model):
    limits = Limits(header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S, max_connections=100)
    with LiveServer(
        create_app(model, index, limits, model_name="tiny-absvit", retrieval_model=retrieval_model)
    ) as live:
        yield live


def wait_until_closed(slow, count: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while len(slow.closed) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def test_50_slow_clients_are_cut_off_while_others_are_answered(server, png_bytes):
    kinds = tuple(LOADTEST["SLOW_KINDS"])  # nothing, partial headers, stalled body, stalled chunked body, trickled
    with SlowClients(server.url, 50, kinds, reopen=False, trickle_s=0.2) as slow:
        start = time.monotonic()
        latencies = []
        with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as client:
            for i in range(12):
                began = time.monotonic()
                if i % 4 == 0:
                    files = {"image": ("a.png", png_bytes, "image/png")}
                    response = client.post("/vqa", files=files, data={"question": "what color?"})
                else:
                    response = client.get("/search" if i % 2 else "/health", params={"q": "a red circle"})
                assert response.status_code == 200, response.text
                latencies.append(time.monotonic() - began)
        answered_within = time.monotonic() - start
        held_meanwhile = slow.held if answered_within < TIMEOUT_S - 0.2 else None
        wait_until_closed(slow, 50, TIMEOUT_S + BODY_GRACE_S + SLACK_S + 2)

    assert max(latencies) < TIMEOUT_S  # normal clients were answered within the timeout ...
    if held_meanwhile is not None:
        assert held_meanwhile == 50  # ... while all 50 slow ones were still held
    assert len(slow.closed) == 50, slow.summary()
    for closure in slow.closed:  # every slow connection closed at its deadline, neither before nor long after
        assert TIMEOUT_S - 0.1 <= closure.seconds <= TIMEOUT_S + SLACK_S, closure
    by_kind = {kind: sorted({str(c.status) for c in slow.closed if c.kind == kind}) for kind in kinds}
    assert by_kind == {
        "nothing": ["None"],  # an idle connection is closed quietly
        "partial headers": ["408"],
        "stalled body": ["408"],
        "stalled chunked body": ["408"],
        "trickled headers": ["408"],  # a byte every 0.2 s does not extend the deadline: it is a total
    }
    bodies = {c.kind: json.loads(c.body) for c in slow.closed if c.status == 408}
    assert "header_timeout_s=2 s" in bodies["partial headers"]["detail"]
    assert "body_timeout_s=2 s" in bodies["stalled body"]["detail"]
    assert bodies["stalled chunked body"]["field"] is None
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_slow_but_timely_client_is_answered(server):
    """Headers in three pieces and a body in two, each well within the deadlines."""
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=5) as sock:
        for piece in (b"GET /health HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"Content-Length: 4\r\n\r\n", b"ab", b"cd"):
            sock.sendall(piece)
            time.sleep(0.3)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


def test_a_kept_alive_connection_gets_a_new_header_deadline(server):
    with httpx.Client(base_url=server.url) as client:
        for _ in range(3):  # one connection, requests TIMEOUT_S - 0.5 apart: each within its own deadline
            assert client.get("/health").status_code == 200
            time.sleep(TIMEOUT_S - 0.5)
        assert client.get("/health").status_code == 200


def test_connections_past_the_cap_are_refused_at_once(model):
    app = create_app(model, limits=Limits(max_connections=5))
    with LiveServer(app) as server:
        address = ("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
        held = [socket.create_connection(address, timeout=5) for _ in range(5)]
        try:
            with socket.create_connection(address, timeout=5) as extra:
                answer = b""
                while chunk := extra.recv(65536):  # answered and closed without sending a byte
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head.lower()
            assert json.loads(body) == {
                "detail": "server busy: 5 connections are open (limit max_connections=5); retry shortly",
                "field": None,
            }
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 5
        while True:  # the held connections' slots free up once the server sees them closed
            try:
                assert httpx.get(server.url + "/health").status_code == 200
                break
            except (httpx.HTTPError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def test_headers_over_the_size_limit_are_refused(server):
    """Headers still incomplete after MAX_HEADER_BYTES: 400 at once, not a wait for the header deadline."""
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1024))
        began = time.monotonic()
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
        assert time.monotonic() - began < TIMEOUT_S


def test_the_options_bind_the_limits():
    from absvl.serve.connections import uvicorn_options

    limits = Limits(header_timeout_s=3, body_timeout_s=4, max_connections=7)
    options = uvicorn_options(limits)
    assert issubclass(options["http"], GuardedH11Protocol) and options["http"].limits is limits
    assert options["timeout_keep_alive"] == KEEP_ALIVE_S
    assert options["h11_max_incomplete_event_size"] == MAX_HEADER_BYTES
