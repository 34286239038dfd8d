"""A real gateway on loopback, for testing a plugin the way a client meets it.

Surfaces and web-search plugins have no conformance suite of their own: what they
promise is HTTP behaviour. Test them over real HTTP against a gateway that loads
them next to the built-in plugins::

    from core.testing.gateway import running_gateway

    async def test_my_surface(tmp_path):
        config = tmp_path / "plugins.toml"
        config.write_text(MY_CONFIG)
        async with running_gateway(config, extra_plugins=[my_plugin_module]) as gateway:
            answer = await gateway.client.post("/my/path", json={...})
            assert answer.status_code == 200

``extra_plugins`` registers modules (or objects) with ``@hookimpl`` functions as
if they were installed; an installed package needs nothing extra.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from litestar import Litestar

from core import Services
from core.app import create_app
from core.config import ServerConfig, load_config
from core.http_server import uvicorn_options


@asynccontextmanager
async def serving(app: Litestar, server_config: ServerConfig | None = None) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in this event loop; yield its base URL.

    The server runs ``chatgate serve``'s settings (:func:`core.http_server.uvicorn_options`) for
    ``server_config``, by default the app's own ``[server]`` table; its lifespan opens and
    closes the store, providers and surfaces as in production.
    """
    if server_config is None:
        services = app.state.get("services")
        server_config = services.config.server if services is not None else ServerConfig()
    options = uvicorn_options(server_config, host="127.0.0.1", port=0)
    server = uvicorn.Server(uvicorn.Config(app, **options, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # uvicorn offers no event for it
        if task.done():
            task.result()  # start-up failed: raise its error here
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


class RunningGateway:
    """A gateway served on loopback: its URL, an HTTP client on it and (for white-box checks) its services."""

    def __init__(self, url: str, app: Litestar, client: httpx.AsyncClient) -> None:
        self.url = url
        self.app = app
        self.client = client
        self.services: Services = app.state.services


@asynccontextmanager
async def running_gateway(
    config: Path | str, *, extra_plugins: Sequence[object] = (), client_timeout: float = 10
) -> AsyncIterator[RunningGateway]:
    """The gateway ``config`` (a plugins.toml) describes, with ``extra_plugins`` registered,
    served on loopback until the block ends."""
    app = create_app(load_config(config), extra_plugins=extra_plugins)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=client_timeout) as client:
        yield RunningGateway(url, app, client)
