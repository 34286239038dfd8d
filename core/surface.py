"""The surface interface: an HTTP dialect mounted on the gateway."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from litestar.types import ASGIApp, ControllerRouterHandler

from .plugin import Plugin

if TYPE_CHECKING:
    from .services import Services


class Surface(Plugin, abc.ABC):
    """Base class of API surfaces.

    A surface plugin subclasses this, sets ``name`` and ``Options`` and
    returns the class from the ``register_surfaces`` hook. chatgate creates
    it only when ``[surfaces.<name>]`` is enabled, then mounts what
    :meth:`route_handlers` returns. A surface is a thin adapter: it converts
    its wire format to calls on :class:`~core.services.Services` and never
    talks to a provider or the store directly. Its handlers receive the
    services by Litestar's dependency injection (a parameter named
    ``services``), or take them from the argument of :meth:`route_handlers`.
    """

    @abc.abstractmethod
    def route_handlers(self, services: Services) -> Sequence[ControllerRouterHandler]:
        """The Litestar handlers, controllers or routers this surface mounts."""

    def direct_routes(self, services: Services) -> Mapping[str, ASGIApp]:
        """Exact paths answered by a raw ASGI app before Litestar routes the request.

        For a hot path only: such a request skips routing, middleware and exception
        handlers, so its app must answer every method and every failure itself. Mount
        the same app in :meth:`route_handlers` too, so a path that differs (a trailing
        slash, say) gets the same answer through the router.
        """
        return {}
