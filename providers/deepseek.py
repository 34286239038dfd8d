"""DeepSeek's API: the OpenAI-compatible provider with DeepSeek's URL, key variable and dialect."""

from __future__ import annotations

from typing import ClassVar

from core import EmbeddingRequest, Embeddings, EmbeddingsUnsupported, Provider, hookimpl

from .openai_compatible import OpenAICompatibleOptions, OpenAICompatibleProvider


class DeepSeekOptions(OpenAICompatibleOptions, kw_only=True):
    """Options of a ``deepseek`` instance: DeepSeek's base URL by default.

    An empty ``api_key`` is accepted so a configuration that ships DeepSeek
    models still starts without one; their requests then fail at once,
    saying which variable to set.
    """

    base_url: str = "https://api.deepseek.com"


class DeepSeekProvider(OpenAICompatibleProvider):
    """DeepSeek's API: :class:`OpenAICompatibleProvider` with DeepSeek's URL and a required key."""

    name = "deepseek"
    Options: ClassVar[type[OpenAICompatibleOptions]] = DeepSeekOptions
    needs_key = True
    key_variable = "DEEPSEEK_API_KEY"
    sends_reasoning = True  # thinking mode refuses a tool-call turn without its reasoning
    output_limit_names = ("max_tokens",)  # DeepSeek's API documents no other name for it

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        # DeepSeek's API has no /embeddings (its documented endpoints are chat, FIM, models,
        # balance): refuse here rather than send a request that can only 404.
        raise EmbeddingsUnsupported(
            f"provider {self.instance!r} is DeepSeek, which has no embeddings API; "
            f"route model {request.model!r} to a provider that has (openai_compatible, mock)"
        )


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [DeepSeekProvider]
