"""The application factory."""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast

from litestar import Litestar, Request, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.enums import ScopeType
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.response import Response
from litestar.types import (
    ASGIApp,
    HTTPScope,
    LifeSpanReceive,
    LifeSpanScope,
    LifeSpanSend,
    Receive,
    Scope,
    Send,
)

from . import __version__
from .bodies import nested_too_deeply
from .config import Config, load_config
from .cors import Cors
from .credentials import bearer_matches
from .hosts import HostCheck
from .plugins import Plugins
from .services import Services
from .services.accounts import Accounts
from .services.billing import Billing
from .services.catalog import Catalog
from .services.completions import Completions
from .services.conversations import Conversations
from .services.generations import Generations
from .services.memory import Memory

log = logging.getLogger("chatgate")


class Gateway(Litestar):
    """The Litestar app with a front door for hot paths.

    Promises: an HTTP request whose path is exactly a key of ``direct`` goes
    straight to that ASGI app (see :meth:`~core.surface.Surface.direct_routes`);
    everything else, lifespan included, is Litestar's. Its routing and
    middleware took ~6% of the CPU of a proxied completion, the request that
    carries nearly all the traffic (bench/README.md). Before either, an HTTP
    request whose ``Host`` the server does not answer to (see
    :class:`~core.hosts.HostCheck`) gets 400, whatever its path.
    """

    direct: Mapping[str, ASGIApp]
    hosts: HostCheck | None = None
    cors: Cors | None = None

    async def __call__(
        self, scope: Scope | LifeSpanScope, receive: Receive | LifeSpanReceive, send: Send | LifeSpanSend
    ) -> None:
        if scope["type"] == ScopeType.HTTP:
            if self.hosts is not None and not self.hosts.admits(cast("HTTPScope", scope)):
                return await self.hosts.refuse(cast("HTTPScope", scope), send)  # type: ignore[arg-type]
            if self.cors is not None:
                origin = self.cors.origin_of(cast("HTTPScope", scope))
                if origin is not None and self.cors.is_preflight(cast("HTTPScope", scope)):
                    return await self.cors.preflight(cast("HTTPScope", scope), origin, send)  # type: ignore[arg-type]
                send = self.cors.answering(origin, send)  # type: ignore[arg-type]
            app = self.direct.get(cast("HTTPScope", scope)["path"])
            if app is not None:
                return await app(scope, receive, send)  # type: ignore[arg-type]  # http: not lifespan
        await super().__call__(scope, receive, send)


def create_app(
    config: Config, *, extra_plugins: Sequence[object] = (), installed: bool = True, host: str | None = None
) -> Gateway:
    """Build the gateway for ``config``, served on ``host`` (default: ``[server] host``).

    Builds a fresh plugin manager (every installed plugin, plus
    ``extra_plugins``), instantiates what the configuration selects and
    mounts the enabled surfaces. The store, providers and surfaces are opened
    and closed by the app's lifespan. The address decides which ``Host``
    names are answered (:meth:`~core.hosts.HostCheck.for_server`).

    Raises:
        PluginError: a plugin failed to load, or two claim one name.
        ConfigError: the configuration names unknown plugins or bad options.
    """
    plugins = Plugins.load(extra_plugins, installed=installed)
    setup = plugins.configure(config)
    store = setup.store.registered.cls(setup.store.registered.cls.name, setup.store.options)
    providers = {name: c.registered.cls(name, c.options) for name, c in setup.providers.items()}
    web_search = (
        setup.web_search.registered.cls(setup.web_search.registered.cls.name, setup.web_search.options)
        if setup.web_search
        else None
    )
    billing = Billing(store, config.models)
    generations = Generations(
        store,
        billing,
        flush_interval=config.generation.flush_interval,
        stale_after=config.generation.stale_after,
    )
    memory = Memory(store, billing)
    services = Services(
        config=config,
        catalog=Catalog(config.models, providers, {n: t.fallbacks for n, t in config.providers.items()}),
        accounts=Accounts(store),
        billing=billing,
        completions=Completions(billing),
        generations=generations,
        conversations=Conversations(store, generations, billing, memory),
        web_search=web_search,
    )
    surfaces = [c.registered.cls(name, c.options) for name, c in setup.surfaces.items()]

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            await store.open()
            stack.push_async_callback(store.aclose)
            for provider in providers.values():
                await provider.open()
                stack.push_async_callback(provider.aclose)
            if web_search is not None:
                await web_search.open()
                stack.push_async_callback(web_search.aclose)
            await generations.start()
            stack.push_async_callback(generations.aclose)
            # Runs after completions.aclose: once every completion has settled, the charges of
            # those admitted under leases are posted and the leases released.
            stack.push_async_callback(billing.aclose)
            stack.push_async_callback(services.completions.aclose)
            for surface in surfaces:
                await surface.open()
                stack.push_async_callback(surface.aclose)
            log.info(
                "chatgate %s ready: store %s, providers %s, surfaces %s",
                __version__,
                store.name,
                ", ".join(providers) or "none",
                ", ".join(s.name for s in surfaces) or "none",
            )
            yield

    admin_token = config.server.admin_token

    @get("/healthz", summary="Liveness and readiness", tags=["health"])
    async def healthz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        """Whether the store answers (503 when not). Which store, providers and surfaces are
        configured only with the admin token (``Authorization: Bearer <admin_token>``): base
        URLs and models are for the operator, not for anyone who can reach the port."""
        store_health: dict[str, Any] = {**store.describe(), "ok": True}
        try:
            await store.ping()
        except Exception as exc:
            # The detail (paths, hosts) is for the operator's log, not for anonymous callers.
            log.warning("health check: the store did not answer: %s: %s", type(exc).__name__, exc)
            store_health.update(ok=False, error=f"{type(exc).__name__}; see the server log")
        generations = services.generations
        if generations.cluster is not None and generations.instance is not None:
            store_health["instance"] = generations.instance
            if store_health["ok"] and (standing := generations.cluster.standing()) is not None:
                # Fail closed, and say so: the proxy stops sending requests here meanwhile.
                store_health.update(ok=False, error=f"out of standing: {standing}")
        body: dict[str, Any] = {
            "status": "ok" if store_health["ok"] else "unavailable",
            "version": __version__,
        }
        if admin_token and bearer_matches(request.headers.get("authorization"), admin_token):
            body.update(
                store=store_health,
                providers={name: p.describe() for name, p in services.catalog.routing.items()},
                surfaces=[s.name for s in surfaces],
            )
        return Response(body, status_code=200 if store_health["ok"] else 503)

    handlers: list[Any] = [healthz]
    direct: dict[str, ASGIApp] = {}
    for surface in surfaces:
        handlers.extend(surface.route_handlers(services))
        direct.update(surface.direct_routes(services))
    app = Gateway(
        route_handlers=handlers,
        lifespan=[lifespan],
        state=State({"services": services}),
        # Any handler of any surface receives the services by declaring a ``services`` parameter.
        dependencies={"services": Provide(lambda: services, use_cache=True, sync_to_thread=False)},
        # The schema as JSON only, at /schema and /schema/openapi.json: Litestar's documentation
        # pages (Scalar, Swagger, Redoc...) load their scripts from CDNs, which no page on the
        # gateway's origin may do (a compromised CDN would run code next to the admin page).
        openapi_config=OpenAPIConfig(
            title="chatgate",
            version=__version__,
            path="/schema",
            render_plugins=[JsonRenderPlugin(path=["/", "/openapi.json"])],
        ),
        # Litestar's own body decoding lets a deeply nested body escape as a 500 (core.bodies).
        exception_handlers={RecursionError: nested_too_deeply},
        request_max_body_size=config.server.max_body_bytes,
    )
    app.direct = direct
    app.hosts = HostCheck.for_server(host or config.server.host, config.server.allowed_hosts)
    app.cors = Cors(config.server.cors_origins) if config.server.cors_origins else None
    return app


def app_from_environment() -> Gateway:
    """The app for ``$CHATGATE_CONFIG`` (default ``./plugins.toml``) served on ``$CHATGATE_HOST``
    (default its ``[server] host``); what ``chatgate serve`` runs in each worker, having set both.

    The worker is a server process and nothing else, so once the app has started this also
    tunes the process (:func:`tune_server_process`); an app embedded elsewhere
    (:func:`create_app`) leaves its host process's settings alone.
    """
    app = create_app(
        load_config(os.environ.get("CHATGATE_CONFIG", "plugins.toml")), host=os.environ.get("CHATGATE_HOST")
    )
    app.on_startup.append(tune_server_process)  # runs after the lifespan has opened everything
    return app


def tune_server_process() -> None:
    """Process-wide settings for a process that only serves chatgate (measured in bench/README.md)."""
    # What start-up built lives as long as the server: keep it out of every
    # garbage collection (their pauses were the slowest requests' latency).
    gc.collect()
    gc.freeze()
    # Store calls hop to a thread and back; while the event loop is busy, such a thread
    # waited out the whole 5 ms GIL switch interval before its turn. 1 ms bounds the wait.
    sys.setswitchinterval(0.001)
