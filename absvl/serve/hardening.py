"""HTTP hardening: only allowed ``Host`` names are served (against DNS rebinding), every response
says ``nosniff``, and the page's Content-Security-Policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders

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


class AllowedHostsMiddleware:
    """Serves only requests whose ``Host`` header names one of ``hosts`` (``"*"``: any); others get a
    JSON 400 naming the host and the flag that allows it.

    Like Starlette's ``TrustedHostMiddleware``, whose plain-text "Invalid host header" says neither.
    """

    def __init__(self, app: Any, hosts: tuple[str, ...]) -> None:
        self.app, self.hosts = app, frozenset(host.lower().strip("[]") for host in hosts)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and "*" not in self.hosts:
            header = Headers(scope=scope).get("host", "")
            name = urlsplit(f"//{header}").hostname if header else None
            if name not in self.hosts:
                shown = repr(header) if header else "missing"
                detail = (
                    f"Host: {shown} is not served here (served: {', '.join(sorted(self.hosts))}); "
                    f"start the server with --allowed-host NAME to serve another host name"
                )
                await JSONResponse({"detail": detail, "field": "Host"}, 400)(scope, receive, send)
                return
        await self.app(scope, receive, send)
