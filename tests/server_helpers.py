"""Runs an openowl server under uvicorn in a background thread, on a free loopback port, for the serving tests."""

from __future__ import annotations

import base64
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from openowl.infer.engine import Engine
from openowl.serve.app import create_app
from openowl.serve.config import ServeConfig


class RunningServer:
    def __init__(self, app, url: str):
        self.app, self.url = app, url

    @property
    def scheduler(self):
        return self.app.state.scheduler


@contextmanager
def serve(engine: Engine, config: ServeConfig):
    """Yield a `RunningServer` (its base URL and app); the server and its scheduler stop on exit."""
    with serve_app(create_app(engine, config)) as running:
        yield running


@contextmanager
def serve_app(app):
    """Run an ASGI app under uvicorn in a background thread on a free loopback port; it stops on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(app, f"http://127.0.0.1:{sock.getsockname()[1]}")
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def data_uri(path: Path | bytes, mime: str = "image/jpeg") -> str:
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
