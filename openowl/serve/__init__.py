"""Serving: an OpenAI-compatible HTTP API (`api.py`) over a continuous-batching scheduler (`scheduler.py`,
`batch.py`), with the wire format (`protocol.py`), request media (`media.py`), settings (`config.py`) and a small
web demo (`static/`)."""
