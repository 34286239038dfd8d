"""Serving a surface's small web page from files shipped in its package."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from litestar import Router, get
from litestar.response import Response

HEADERS = {
    "Cache-Control": "no-cache",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # The pages handle API keys and the admin token: only their own files may run or style them
    # (no inline code, no CDN), so an injected snippet cannot, and nothing is sent to other sites.
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "Referrer-Policy": "no-referrer",
}
"""Pages hold no secret, but must not be framed, served stale after an upgrade, or run
anything but their own files (``tests/plugins/test_*_page.py`` check they work so)."""


def web_page(path: str, directory: Path, page: str, assets: Mapping[str, str], summary: str) -> Router:
    """``path`` serves ``directory/page`` (HTML); ``path/static/<name>`` each of ``assets``
    (name: media type), and 404 for any other name. The files are read once, here: no CDN,
    no disk access per request, and the page works offline."""
    files = {name: (directory / name).read_bytes() for name in (*assets, page)}

    @get(path, summary=summary, include_in_schema=False)
    async def html() -> Response[bytes]:
        return Response(files[page], media_type="text/html; charset=utf-8", headers=HEADERS)

    @get(f"{path}/static/{{name:str}}", include_in_schema=False)
    async def asset(name: str) -> Response[bytes]:
        if name not in assets:
            return Response(b"not found", status_code=404, media_type="text/plain")
        return Response(files[name], media_type=assets[name], headers=HEADERS)

    return Router("/", route_handlers=[html, asset])
