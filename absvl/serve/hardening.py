"""HTTP hardening: only allowed ``Host`` names are served (against DNS rebinding), every response
says ``nosniff``, and the page's Content-Security-Policy."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders

from .errors import bounded

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  #: Host names served by default
#: The page loads /static/app.js and /static/style.css (no inline script or style), fetches the API on
#: its own origin and shows /images/*, the overlays (data: URLs) and the chosen upload (a blob: URL).
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class NoSniffMiddleware:
    """``X-Content-Type-Options: nosniff`` on every response: browsers never guess a content type."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Content-Type-Options"] = "nosniff"
            await send(message)

        await self.app(scope, receive, send_with_header if scope["type"] == "http" else send)


#: A ``Host`` header (RFC 9110 §7.2): a host name or IPv4 address (letters, digits, ``.``, ``-``, ``_``)
#: or an IPv6 address in brackets, then an optional ``:port`` of digits; nothing else (no ``user@``,
#: path or second colon).
HOST_HEADER = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>[0-9]*))?")


def host_name(header: str) -> str | None:
    """The host name of a ``Host`` header, lower case and without brackets; None unless the header is
    exactly a host and an optional port of at most 65535."""
    match = HOST_HEADER.fullmatch(header)
    if match is None or (match["port"] and int(match["port"]) > 65535):
        return None
    return (match["ipv6"] or match["name"]).lower()


class AllowedHostsMiddleware:
    """Serves only requests whose ``Host`` header names one of ``hosts`` (``"*"``: any); others, and a
    ``Host`` that is not a host and port (:func:`host_name`), get a JSON 400 naming the host and the
    flag that allows it.

    Like Starlette's ``TrustedHostMiddleware``, whose plain-text "Invalid host header" says neither.
    """

    def __init__(self, app: Any, hosts: tuple[str, ...]) -> None:
        self.app, self.hosts = app, frozenset(host.lower().strip("[]") for host in hosts)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            header = Headers(scope=scope).get("host", "")
            name = host_name(header)
            shown = repr(bounded(header)) if header else "missing"
            detail = None
            if header and name is None:  # checked under "*" too
                detail = f"Host: {shown} is not a host name with an optional :port"
            elif "*" not in self.hosts and name not in self.hosts:
                detail = (
                    f"Host: {shown} is not served here (served: {', '.join(sorted(self.hosts))}); "
                    f"start the server with --allowed-host NAME to serve another host name"
                )
            if detail is not None:
                await JSONResponse({"detail": detail, "field": "Host"}, 400)(scope, receive, send)
                return
        await self.app(scope, receive, send)
