"""The chat page at ``/chat``: topics and streamed replies in the browser, from files shipped here."""

from __future__ import annotations

from pathlib import Path

from litestar import Router

from core import web_page

STATIC = Path(__file__).parent / "static"
ASSETS = {"chat.css": "text/css; charset=utf-8", "chat.js": "text/javascript; charset=utf-8"}


def chat_page() -> Router:
    """``/chat`` and its two assets."""
    return web_page("/chat", STATIC, "chat.html", ASSETS, "The chat page")
