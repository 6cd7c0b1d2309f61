"""Serving: an OpenAI-compatible HTTP API over a continuous-batching scheduler (`scheduler.py`, `batch.py`).

`app.py` holds the FastAPI app and its thin routes, `handler.py` the chat-completions handler, `protocol.py` the typed
request, `render.py` the responses and streams, `errors.py` the error shape, `auth.py` the API key and Host checks,
`metrics.py` the Prometheus counters, `media.py` request images and videos, `config.py` the settings, `launch.py`
the command line's server start, and `demo.py` the web chat on Gradio (`openowl demo`).
"""
