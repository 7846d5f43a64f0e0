"""GET /: the demo page (app/static/index.html), or a minimal page pointing at the API docs."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
router = APIRouter(include_in_schema=False)

FALLBACK = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Robust SSL classifier</title></head>
<body><h1>Robust SSL classifier</h1>
<p>The demo page is not installed. The API is documented at <a href="/docs">/docs</a>.</p></body></html>
"""


@router.get("/", response_class=HTMLResponse, response_model=None)
def index() -> FileResponse | HTMLResponse:
    """The demo page."""
    page = STATIC_DIR / "index.html"
    return FileResponse(page, media_type="text/html") if page.is_file() else HTMLResponse(FALLBACK)
