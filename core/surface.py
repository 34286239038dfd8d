"""The surface interface: an HTTP dialect mounted on the gateway."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
from litestar.types import ASGIApp, ControllerRouterHandler

from .provider import NoOptions

if TYPE_CHECKING:
    from .services import Services


class Surface(abc.ABC):
    """Base class of API surfaces.

    A surface plugin subclasses this, sets ``name`` and ``Options`` and
    returns the class from the ``register_surfaces`` hook. chatgate creates
    it only when ``[surfaces.<name>]`` is enabled, then mounts what
    :meth:`route_handlers` returns. A surface is a thin adapter: it converts
    its wire format to calls on :class:`~core.services.Services` and never
    talks to a provider or the store directly.
    """

    name: ClassVar[str]
    Options: ClassVar[type[msgspec.Struct]] = NoOptions

    def __init__(self, options: Any, services: Services) -> None:
        self.options = options
        self.services = services

    @abc.abstractmethod
    def route_handlers(self) -> Sequence[ControllerRouterHandler]:
        """The Litestar handlers, controllers or routers this surface mounts."""

    def direct_routes(self) -> Mapping[str, ASGIApp]:
        """Exact paths answered by a raw ASGI app before Litestar routes the request.

        For a hot path only: such a request skips routing, middleware and exception
        handlers, so its app must answer every method and every failure itself. Mount
        the same app in :meth:`route_handlers` too, so a path that differs (a trailing
        slash, say) gets the same answer through the router.
        """
        return {}

    async def startup(self) -> None:
        """Called once after the store and providers are open."""

    async def shutdown(self) -> None:
        """Called once at shutdown, before providers and the store close."""
