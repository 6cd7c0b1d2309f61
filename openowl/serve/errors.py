"""The server's one error shape: `APIError` (an HTTP status and OpenAI's `{"error": {...}}` body) and the exception
handlers that answer every failure in that shape — our own refusals, Starlette's 404 / 405, and unexpected errors."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def unknown_model(name: str, served: str) -> APIError:
    """The 404 for a model name other than the one this server serves."""
    return APIError(404, f"the model {name!r} does not exist; this server serves {served!r}", "model_not_found",
                    "model")  # fmt: skip


def add_error_handlers(app: FastAPI) -> None:
    """Answer `APIError`, Starlette's `HTTPException` and any other exception in OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        body = APIError(err.status_code, str(err.detail), code).body()
        return JSONResponse(body, err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, "internal server error", "internal_error", kind="server_error").body(), 500)
