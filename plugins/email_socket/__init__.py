"""The email-socket surface (seed 000): per-email conversations, polled with ``/api/record``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from litestar import Request, post
from litestar.response import Response
from litestar.types import ControllerRouterHandler

from core.hookspecs import hookimpl
from core.services.accounts import email_allowed, normalize_email
from core.surface import Surface

KIND = "email"


class Options(msgspec.Struct, forbid_unknown_fields=True):
    """``[surfaces.email_socket]`` options."""

    allow: list[str] = msgspec.field(default_factory=lambda: ["*"])
    """Who may chat: exact addresses, ``*@domain`` patterns, or ``*`` for everyone."""
    show_think: bool = True
    """Whether ``/api/record`` shows the model's reasoning as ``think``."""


def failure(status: int, message: str) -> Response[Any]:
    return Response({"status": False, "code": status, "error": message}, status_code=status)


class EmailSocketSurface(Surface):
    """Conversations keyed by email address, as the seed's clients expect."""

    name = "email_socket"
    Options = Options

    def route_handlers(self) -> Sequence[ControllerRouterHandler]:
        services = self.services
        options = self.options

        @post("/api/record", tags=["email-socket"], summary="The conversation of an email", status_code=200)
        async def record(request: Request[Any, Any, Any]) -> Response[Any]:
            try:
                body = msgspec.json.decode(await request.body())
            except msgspec.DecodeError:
                return failure(400, 'the body must be a JSON object like {"email": "you@example.com"}')
            email = body.get("email") if isinstance(body, dict) else None
            if not isinstance(email, str) or "@" not in email:
                return failure(400, "field 'email' is missing or not an email address")
            if not email_allowed(email, options.allow):
                return failure(403, f"{normalize_email(email)} is not allowed to use this service")
            user = await services.accounts.find_user(email)
            conversation = await services.conversations.latest(user.id, KIND) if user else None
            if conversation is None:
                return Response({"text": [], "code": 200})
            transcript = await services.conversations.transcript(conversation.id)
            text = []
            for message in transcript.messages:
                entry: dict[str, str] = {
                    "role": "user" if message.role == "user" else "ai",
                    "content": message.content,
                }
                if message.role == "assistant" and message.reasoning and options.show_think:
                    entry["think"] = message.reasoning
                if message.role == "assistant" and message.status in ("interrupted", "error"):
                    entry["status"] = message.status
                text.append(entry)
            return Response({"text": text, "code": 201 if transcript.generating else 200})

        return [record]


@hookimpl
def register_surfaces() -> list[type[Surface]]:
    return [EmailSocketSurface]
