"""``GET /v1/models`` in one body that both official SDK families accept.

The OpenAI SDKs read a list's ``object`` and ``data`` and each model's ``id``,
``object``, ``created`` and ``owned_by``; the Anthropic SDKs read a page's
``data``, ``has_more``, ``first_id`` and ``last_id`` and each model's ``type``,
``id``, ``display_name`` and ``created_at`` (RFC 3339). Neither rejects the
other's keys (research/dialects.md A.13), so every surface that serves the
route answers this one body, whichever client asks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import ModelConfig

CREATED = 1_735_689_600
"""2025-01-01: a fixed, honest "created" for configured models (Unix seconds, OpenAI's field)."""
CREATED_AT = "2025-01-01T00:00:00Z"
"""The same instant in RFC 3339 (Anthropic's ``created_at``)."""


def model_object(name: str, config: ModelConfig, owned_by: str = "chatgate") -> dict[str, Any]:
    """One configured model in both OpenAI's and Anthropic's shapes."""
    return {
        "id": name,
        "object": "model",
        "created": CREATED,
        "owned_by": owned_by,
        "type": "model",
        "display_name": name,
        "created_at": CREATED_AT,
        "max_input_tokens": config.context_tokens,
        "max_tokens": config.max_output_tokens,
    }


def model_list(models: Mapping[str, ModelConfig], owned_by: str = "chatgate") -> dict[str, Any]:
    """Every configured model, as one page: OpenAI's list and Anthropic's page at once
    (``has_more`` is always false, so Anthropic's SDK never asks for a next page)."""
    data = [model_object(name, config, owned_by) for name, config in models.items()]
    return {
        "object": "list",
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
