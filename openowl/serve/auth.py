"""Who may use the server: the API key (`Authorization: Bearer <key>`, compared in constant time) on the routes that
need it, and the Host-header allow-list that stops a web page from reaching a loopback server by DNS rebinding."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence

from fastapi import FastAPI, Request
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
