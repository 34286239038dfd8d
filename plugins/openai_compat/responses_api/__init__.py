"""OpenAI's Responses API on the OpenAI surface: ``/v1/responses`` and its stored responses.

``wire`` checks a request into a chat request and renders the ``Response`` object,
``events`` streams a reply as Responses events, ``endpoint`` answers ``POST`` as a raw
ASGI app (the hot path, like the chat's), ``routes`` holds the Litestar handlers of
``GET``/``DELETE`` and ``input_items``, and ``saved`` keeps responses on the caller's
conversations for ``previous_response_id``.
"""

from __future__ import annotations

from .endpoint import Responses
from .routes import ResponsesController, responses_route

__all__ = ["Responses", "ResponsesController", "responses_route"]
