"""An example chatgate provider: it streams the last user message back, word by word.

Install it (``pip install ./examples/chatgate-echo``), then use it by name::

    [providers.parrot]
    plugin = "echo"
    prefix = "you said: "

    [models.parrot]
    provider = "parrot"
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

import msgspec

from core import (
    BadRequest,
    ChatRequest,
    ContentDelta,
    Finish,
    Provider,
    ProviderEvent,
    Usage,
    estimate_prompt_tokens,
    hookimpl,
)


class EchoOptions(msgspec.Struct, forbid_unknown_fields=True):
    """``[providers.<name>]`` options of the echo provider."""

    prefix: str = "echo: "
    delay: float = 0.0
    """Seconds between words, to watch streaming happen."""


class EchoProvider(Provider):
    """Replies with ``prefix`` followed by the last user message."""

    name = "echo"
    Options = EchoOptions

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        said = next((m.content for m in reversed(request.messages) if m.role == "user"), None)
        if not isinstance(said, str):
            raise BadRequest("the echo provider needs a user message with text content")
        words = re.findall(r"\s*\S+", self.options.prefix + said)
        # One word is one token here; the caller reserved credit for at most this many.
        limit = request.output_limit
        cut = limit is not None and len(words) > limit
        if cut:
            words = words[:limit]
        for word in words:
            if self.options.delay:
                await asyncio.sleep(self.options.delay)
            yield ContentDelta(word)
        usage = Usage(prompt_tokens=estimate_prompt_tokens(request.messages), completion_tokens=len(words))
        yield Finish("length" if cut else "stop", usage)


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [EchoProvider]
