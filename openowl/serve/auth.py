"""Who may use the server: the API key (`Authorization: Bearer <key>`, compared in constant time) on the routes that
need it, the Host-header allow-list that stops a web page from reaching a loopback server by DNS rebinding, and the
browser origins allowed to call the API (CORS, off unless asked for)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence

from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from openowl.serve.errors import APIError


def api_key_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that refuses (401) a request without the bearer `api_key`; with None, it lets all in."""
    expected = None if api_key is None else api_key.encode()

    async def authorize(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)", "invalid_api_key",
                           kind="authentication_error")  # fmt: skip

    return authorize


def add_host_check(app: FastAPI, allowed_hosts: Sequence[str] | None) -> None:
    """Refuse (400) requests whose Host header is not in `allowed_hosts`; with None, accept any."""
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))


def add_cors(app: FastAPI, origins: Sequence[str]) -> None:
    """Let web pages from `origins` call the API from a browser (CORS: preflights answered, `Access-Control-*`
    headers); with none, add nothing, so browsers keep other origins out. Add it last: it wraps everything, so
    that refusals (401, 429) reach the page too."""
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)  # fmt: skip
