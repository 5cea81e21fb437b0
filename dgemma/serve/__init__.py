"""Serving DiffusionGemma: an OpenAI-compatible HTTP server with a browser playground (`app.py`, `scheduler.py`,
`text.py`, `static/`) and a terminal chat (`chat.py`).

The HTTP parts need the `serve` extra (fastapi, uvicorn); `dgemma serve` and `dgemma chat` are the entry points.
"""
