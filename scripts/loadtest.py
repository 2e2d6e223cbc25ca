#!/usr/bin/env python
"""A bounded concurrent load test of a running ``absvl serve`` (used by tests/serve/test_load.py and
tests/serve/test_clients.py), optionally while slow clients hold connections open.

    python scripts/loadtest.py http://127.0.0.1:8000 --requests 200 --concurrency 8 --image some.jpg
    python scripts/loadtest.py http://127.0.0.1:8000 --requests 200 --concurrency 16 --slow-clients 50

With ``--slow-clients N``, N connections are held open during the load, the kinds of
:data:`SLOW_KINDS` in turn (nothing sent, part of the headers, a stalled body, a stalled chunked
body, headers trickled a byte at a time); each one the server closes is replaced, so N stay open,
and the report says how long the server held each kind and what it answered.

Needs ``httpx`` (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

QUERIES = ("a red circle", "a blue square left of a green triangle", "two yellow objects", "a purple shape")
_FORM = b"Content-Type: multipart/form-data; boundary=x\r\n"
#: What each kind of slow client sends, then nothing more ("trickled headers": then a byte every
#: ``trickle_s``); ``{host}`` is the server's address.
SLOW_KINDS: dict[str, bytes] = {
    "nothing": b"",
    "partial headers": b"POST /vqa HTTP/1.1\r\nHost: {host}\r\nContent-Le",
    "stalled body": b"POST /vqa HTTP/1.1\r\nHost: {host}\r\n" + _FORM + b"Content-Length: 5000\r\n\r\n--x",
    "stalled chunked body": b"POST /vqa HTTP/1.1\r\nHost: {host}\r\n"
    + _FORM
    + b"Transfer-Encoding: chunked\r\n\r\n3\r\n--x\r\n",
    "trickled headers": b"GET /health HTTP/1.1\r\nHost: {host}\r\nX-Slow: ",
}


@dataclass
class SlowClosure:
    """A slow connection the server closed: after ``seconds``, answering ``status`` (None: nothing)."""

    kind: str
    seconds: float
    status: int | None
    body: bytes = b""


class SlowClients:
    """Holds ``count`` slow connections to ``base_url`` open (the kinds of :data:`SLOW_KINDS` in
    turn) on a thread of its own, recording each one the server closes; with ``reopen`` a closed one
    is replaced at once, so ``count`` stay open until :meth:`close`."""

    def __init__(
        self,
        base_url: str,
        count: int = 50,
        kinds: tuple[str, ...] = tuple(SLOW_KINDS),
        reopen: bool = True,
        trickle_s: float = 0.5,
    ) -> None:
        url = urlsplit(base_url)
        self.address = (url.hostname, url.port or 80)
        self.host = url.netloc.encode()
        self.count, self.kinds, self.reopen, self.trickle_s = count, kinds, reopen, trickle_s
        self.open: dict[socket.socket, tuple[str, float, bytearray]] = {}  # socket -> (kind, opened at, received)
        self.closed: list[SlowClosure] = []
        self.opened = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="slow-clients", daemon=True)

    def __enter__(self) -> SlowClients:
        for i in range(self.count):
            self._connect(self.kinds[i % len(self.kinds)])
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._lock:
            for sock in self.open:
                sock.close()
            self.open.clear()

    @property
    def held(self) -> int:
        with self._lock:
            return len(self.open)

    def _connect(self, kind: str) -> None:
        sock = socket.create_connection(self.address, timeout=10)
        sock.setblocking(False)
        request = SLOW_KINDS[kind].replace(b"{host}", self.host)
        if request:
            sock.sendall(request)  # small: fits the socket buffer
        with self._lock:
            self.open[sock] = (kind, time.monotonic(), bytearray())
        self.opened += 1

    def _run(self) -> None:
        next_trickle = time.monotonic() + self.trickle_s
        while not self._stop.is_set():
            with self._lock:
                sockets = list(self.open)
            readable = select.select(sockets, [], [], 0.05)[0] if sockets else []
            for sock in readable:
                self._read(sock)
            if time.monotonic() >= next_trickle:
                next_trickle += self.trickle_s
                with self._lock:
                    trickling = [s for s, (kind, _, _) in self.open.items() if kind == "trickled headers"]
                for sock in trickling:
                    try:
                        sock.send(b"a")
                    except OSError:
                        self._closed(sock)

    def _read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:  # reset by the server
            data = b""
        if data:
            self.open[sock][2].extend(data)
        else:
            self._closed(sock)

    def _closed(self, sock: socket.socket) -> None:
        with self._lock:
            if sock not in self.open:
                return
            kind, opened, received = self.open.pop(sock)
        sock.close()
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
        self.closed.append(SlowClosure(kind, time.monotonic() - opened, status, body))
        if self.reopen and not self._stop.is_set():
            try:
                self._connect(kind)
            except OSError:
                pass

    def summary(self) -> dict[str, Any]:
        """Per kind: connections the server closed, the longest it held one (s), its answers by status."""
        kinds: dict[str, Any] = {}
        for closure in self.closed:
            entry = kinds.setdefault(closure.kind, {"closed": 0, "held_s_max": 0.0, "answers": {}})
            entry["closed"] += 1
            entry["held_s_max"] = round(max(entry["held_s_max"], closure.seconds), 2)
            answer = str(closure.status or "none")
            entry["answers"][answer] = entry["answers"].get(answer, 0) + 1
        return {"held": self.count, "opened": self.opened, "closed_by_server": len(self.closed), "by_kind": kinds}


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
    slow_clients: dict[str, Any] | None = None  # SlowClients.summary() when slow clients were held

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
    slow_clients: int = 0,
) -> LoadReport:
    """``requests`` calls, ``concurrency`` at a time: every ``vqa_every``-th a /vqa upload of ``image``
    (when given), the others alternately /search and /health, while ``slow_clients`` slow connections
    are held open (:class:`SlowClients`). Any status but 200 counts as an error."""
    if slow_clients:
        with SlowClients(base_url, slow_clients) as slow:
            report = run_load(base_url, requests, concurrency, image, vqa_every, queries, timeout)
            held = slow.held
        report.slow_clients = {**slow.summary(), "held_at_end": held}
        return report
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
    parser.add_argument(
        "--slow-clients",
        type=int,
        default=0,
        metavar="N",
        help="hold N slow connections open during the load, replacing each one the server closes (default 0)",
    )
    args = parser.parse_args(argv)
    report = run_load(
        args.url,
        args.requests,
        args.concurrency,
        args.image.read_bytes() if args.image else None,
        args.vqa_every,
        slow_clients=args.slow_clients,
    )
    print(json.dumps({**asdict(report), "requests_per_second": round(report.requests_per_second, 1)}, indent=2))
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
