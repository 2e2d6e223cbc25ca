"""Slow and surplus clients: how long a client may take to send a request, and how many connections
may be open.

uvicorn closes idle kept-alive connections (``timeout_keep_alive``) and bounds the size of a
request's headers (h11's ``max_incomplete_event_size``), but it has no deadline for receiving a
request: a client that connects and sends nothing, part of its headers or part of its body holds its
connection, a file descriptor and (with a body) a request task for ever. Its own connection cap,
``limit_concurrency``, counts connections only once a request arrives. So ``absvl serve`` runs
uvicorn with :func:`uvicorn_options`: its h11 protocol with these bounds added
(:class:`GuardedH11Protocol`), and :class:`BodyTimeoutMiddleware` in the app:

* **headers** within ``header_timeout_s`` of the connection opening or, on a kept-alive connection,
  of the previous response: else 408 and the connection is closed (quietly when not a byte came);
* **body** within ``body_timeout_s`` of the headers: else 408, a JSON refusal through the app (the
  middleware), the connection closed; a body the app never reads is cut off
  :data:`BODY_GRACE_S` later by the protocol;
* **connections**: past ``max_connections`` open ones, a new connection is answered 503 and closed
  before anything is read from it.

Both deadlines are totals, not per read: trickling a byte at a time does not extend them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import ApiError
from .limits import Limits

MAX_HEADER_BYTES = 16 * 1024  #: request line and headers (h11's default, set explicitly); over it: 400
KEEP_ALIVE_S = 5  #: idle kept-alive connections are closed after this many seconds (uvicorn's default)
#: The protocol's own body deadline comes this much after the middleware's, which answers first
#: whenever the app reads the body.
BODY_GRACE_S = 2.0


def raw_json_response(status: int, reason: str, detail: str, headers: tuple[str, ...] = ()) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with the service's JSON error body, for the
    protocol to write where no app runs (the headers never came, or the connection is refused)."""
    body = json.dumps({"detail": detail, "field": None}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        "x-content-type-options: nosniff",
        *headers,
    )
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines for receiving a request and a cap on open connections
    (see the module's docstring); :func:`uvicorn_options` makes one subclass per :class:`Limits`."""

    limits = Limits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "headers" or "body": what the connection waits for from the client
        self._got_bytes = False  # whether any byte of the awaited request has come

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._log(f"refused: {self.limits.max_connections} connections are open (max_connections)")
            detail = (
                f"server busy: {self.limits.max_connections} connections are open (limit max_connections="
                f"{self.limits.max_connections}); retry shortly"
            )
            transport.write(raw_json_response(503, "Service Unavailable", detail, ("retry-after: 1",)))
            transport.close()
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        if self._phase == "headers":
            self._got_bytes = True
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Start the deadline of what the connection now awaits from the client (headers or body);
        one already running for the same phase goes on: deadlines are totals."""
        if self.transport.is_closing():
            self._stop()
            return
        state = self.conn.their_state
        if state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            phase = "headers"
        elif state is h11.SEND_BODY:
            phase = "body"
        else:
            phase = None  # the request is in, or the connection is ending
        if phase == self._phase:
            return
        self._stop()
        self._phase = phase
        if phase == "headers":
            self._got_bytes = False
            self._timer = self.loop.call_later(self.limits.header_timeout_s, self._expired)
        elif phase == "body":
            self._timer = self.loop.call_later(self.limits.body_timeout_s + BODY_GRACE_S, self._expired)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, None

    def _expired(self) -> None:
        phase = self._phase
        self._timer, self._phase = None, None
        if phase is None or self.transport.is_closing():
            return
        if phase == "headers":
            if self._got_bytes:
                seconds = self.limits.header_timeout_s
                self._log(f"408: request headers not received within header_timeout_s={seconds} s")
                detail = (
                    f"request timeout: the request's headers did not arrive within header_timeout_s={seconds} s "
                    "(--header-timeout)"
                )
                self.transport.write(raw_json_response(408, "Request Timeout", detail))
            # else an idle connection: closed quietly, as uvicorn's keep-alive timeout does
        else:
            seconds = self.limits.body_timeout_s
            self._log(f"closed: request body not received within body_timeout_s={seconds} s")
            if self.cycle is not None and not self.cycle.response_started:
                self.cycle.disconnected = True  # the app sees http.disconnect; whatever it sends is dropped
                self.cycle.message_event.set()
                detail = (
                    f"request timeout: the request's body did not arrive within body_timeout_s={seconds} s "
                    "(--body-timeout)"
                )
                self.transport.write(raw_json_response(408, "Request Timeout", detail))
        self.transport.close()

    def _log(self, message: str) -> None:
        client = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
        self.logger.info("%s%s", client, message)


def uvicorn_options(limits: Limits) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` enforcing ``limits``' header and
    body timeouts and connection cap (besides the app's own limits)."""
    protocol = type(GuardedH11Protocol.__name__, (GuardedH11Protocol,), {"limits": limits})
    return {
        "http": protocol,
        "timeout_keep_alive": KEEP_ALIVE_S,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    }


class BodyTimeoutMiddleware:
    """Answers 408 (and closes the connection) when a request's body has not fully arrived within
    ``seconds`` of the request reaching the app: the deadline is a total, not per read."""

    def __init__(self, app: Any, seconds: int) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_done = False

        async def timed_receive() -> dict:
            nonlocal body_done
            if body_done:  # e.g. waiting for the client to disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise ApiError(
                    408,
                    f"request timeout: the request's body did not arrive within body_timeout_s={self.seconds} s "
                    "(--body-timeout)",
                    headers={"Connection": "close"},
                ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)
