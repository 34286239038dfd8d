"""The email-socket surface (seed 000): interruptible per-email conversations, polled with ``/api/record``.

``callers`` decides who may use it, ``wire`` checks bodies and renders the seed's
shapes, ``chats`` keeps the conversations and ``controller`` routes the three calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from litestar import Router
from litestar.di import Provide
from litestar.types import ControllerRouterHandler

from core import ConfigError, Problem, Quota, Services, Surface, hookimpl

from .chats import Chats
from .controller import EmailController, exception_handlers

__all__ = ["EmailSocketSurface", "Options"]


class Options(msgspec.Struct, forbid_unknown_fields=True):
    """``[surfaces.email_socket]`` options."""

    model: str = "mock-chat"
    """The model of ``[models]`` that answers every email."""
    allow: list[str] | None = None
    """Who may chat: exact addresses, ``*@domain`` patterns, or ``*`` for everyone, whatever
    the caller's address. Unset: only callers on this machine, that is a loopback client
    address (or a Unix socket) and none of the proxy headers of :data:`PROXY_HEADERS`
    (``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``, ``Via``...); everyone else gets 403."""
    requests_per_minute: int = 20
    """``/api/chat`` requests each email may make in a minute (summaries count too); 0: no limit."""
    tokens_per_day: int = 200_000
    """Prompt and reply tokens each email may use in 24 hours; once they are reached, its
    chats are refused until enough are a day old; 0: no limit."""
    show_think: bool = True
    """Whether ``/api/record`` (and streamed replies) show the model's reasoning as ``think``."""
    system_prompt: str = ""
    """Sent first in every conversation; empty: none."""
    summarize: bool = True
    """Fold turns that no longer fit the model's context into a rolling summary; off: drop them."""

    def __post_init__(self) -> None:
        for field in ("requests_per_minute", "tokens_per_day"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} to be >= 0 (0: no limit)")

    def quota(self) -> Quota:
        """What each email may use."""
        return Quota(self.requests_per_minute or None, self.tokens_per_day or None)


class EmailSocketSurface(Surface):
    """Conversations keyed by email address, as the seed's clients expect.

    Promises: one conversation per email, isolated from every other; a newer
    ``/api/chat`` interrupts the running reply (its caller gets ``exit: 1``)
    and answers with the partial exchange in context; nothing stored is lost
    by a failure or an interrupt; every error is
    ``{"status": false, "code": N, "error": ...}``. Interrupts reach replies
    running in this process: run one worker per email-socket server.

    Who calls: an email is an identity by its address alone, so with ``allow``
    unset only callers on this machine are admitted (loopback client, no proxy
    header; see :func:`local_caller`), and with it set the allow-list decides
    (behind a proxy, ``[server] forwarded_allow_ips`` makes the client address
    the proxy's caller's). Bodies must be declared JSON (415 otherwise), so a web
    page cannot drive a local server. An email's usage never spends a balance: it
    is recorded under the email at its tokens with amount 0, within the per-email
    quotas ``requests_per_minute`` and ``tokens_per_day`` (429 with Retry-After
    past them). A refused request (400, 403, 415, 429) writes nothing and creates
    no user.
    """

    name = "email_socket"
    Options = Options

    def route_handlers(self, services: Services) -> Sequence[ControllerRouterHandler]:
        options: Options = self.options
        config = services.config
        if options.model not in config.models:
            known = ", ".join(sorted(config.models)) or "none configured"
            raise ConfigError(
                [
                    Problem(
                        file=str(config.path),
                        key="surfaces.email_socket.model",
                        expected=f"one of the models of [models] ({known})",
                        found=repr(options.model),
                    )
                ]
            )
        if config.models[options.model].kind != "chat":
            raise ConfigError(
                [
                    Problem(
                        file=str(config.path),
                        key="surfaces.email_socket.model",
                        expected='a chat model (its [models] table sets kind = "chat")',
                        found=f"{options.model!r}, an embedding model",
                    )
                ]
            )
        chats = Chats(services, options)
        return [
            Router(
                "/",
                route_handlers=[EmailController],
                dependencies={"chats": Provide(lambda: chats, use_cache=True, sync_to_thread=False)},
                exception_handlers=exception_handlers(config.server.max_body_bytes),
            )
        ]


@hookimpl
def register_surfaces() -> list[type[Surface]]:
    return [EmailSocketSurface]
