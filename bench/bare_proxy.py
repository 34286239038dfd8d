"""The baseline of bench/long_streams.py: the least a Litestar + aiohttp proxy can do.

One route, a master key compared, the body relayed to the upstream and its answer streamed back
byte for byte: no keys, billing, limits, storage or translation. Its connection pool has no cap,
so it measures what the machine carries. Run by the benchmark as
``uvicorn bare_proxy:app --app-dir bench``; ``UPSTREAM_BASE``, ``UPSTREAM_KEY`` and
``MASTER_KEY`` configure it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from litestar import Litestar, Request, post
from litestar.response import Response, Stream

UPSTREAM = os.environ.get("UPSTREAM_BASE", "http://127.0.0.1:9100") + "/chat/completions"
HEADERS = {
    "Authorization": f"Bearer {os.environ.get('UPSTREAM_KEY', '')}",
    "Content-Type": "application/json",
}
MASTER = f"Bearer {os.environ.get('MASTER_KEY', 'sk-bare')}"
session: aiohttp.ClientSession | None = None


async def open_session() -> None:
    global session
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def close_session() -> None:
    if session is not None:
        await session.close()


@post("/v1/chat/completions", status_code=200)
async def relay(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    if request.headers.get("authorization") != MASTER:
        return Response(b'{"error":{"message":"bad key"}}', status_code=401, media_type="application/json")
    assert session is not None
    upstream = await session.post(UPSTREAM, data=await request.body(), headers=HEADERS)

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for data in upstream.content.iter_any():
                yield data
        finally:
            upstream.release()

    return Stream(chunks(), status_code=upstream.status, media_type=upstream.headers.get("content-type"))


app = Litestar([relay], on_startup=[open_session], on_shutdown=[close_session])
