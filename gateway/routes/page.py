"""The web page at ``/``."""

from __future__ import annotations

import html
from pathlib import Path

import anyio
from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from gateway.deps import SettingsDep

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_TOKEN_SLOT = "<!-- clipchat-token -->"

router = APIRouter(tags=["page"])


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(settings: SettingsDep) -> HTMLResponse:
    """The page; with ``page_token`` set it carries that token so the embedded demo needs no sign-in."""
    page = await anyio.Path(STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if settings.page_token:
        page = page.replace(_TOKEN_SLOT, f'<meta name="clipchat-token" '
                                         f'content="{html.escape(settings.page_token, quote=True)}">')
    return HTMLResponse(page, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                                       "X-Content-Type-Options": "nosniff"})
