"""The topic-chat surface (seed 002): per-user topics, each its own context, replies streamed as text."""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, Router, delete, get, patch, post
from litestar.exceptions import HTTPException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.response import Response
from litestar.types import ControllerRouterHandler

from core import (
    PACE,
    Caller,
    ConfigError,
    Conflict,
    ContentDelta,
    ContextTooLong,
    Conversation,
    ConversationPatch,
    Finish,
    Generation,
    InsufficientBalance,
    InvalidBody,
    Message,
    NotFound,
    Payer,
    Problem,
    ProviderError,
    ProviderEvent,
    RateLimitExceeded,
    ReplyStream,
    Route,
    Services,
    Superseded,
    Surface,
    Unauthenticated,
    decode_body,
    hookimpl,
    web_page,
)

KIND = "topic"
SEPARATOR = "¦"
STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"chat.css": "text/css; charset=utf-8", "chat.js": "text/javascript; charset=utf-8"}
log = logging.getLogger("chatgate.topic_chat")


class CatalogModel(msgspec.Struct, forbid_unknown_fields=True):
    """One model of a series: the ``modelId`` clients send, and the model of ``[models]`` it means."""

    id: int
    model: str
    name: str = ""
    """What pickers show; empty: the model's name."""
    provider: str | None = None
    """A provider instance to use instead of the model's own."""


class Series(msgspec.Struct, forbid_unknown_fields=True):
    """A ``seriesId`` and its models."""

    id: int
    name: str
    models: list[CatalogModel]


def default_series() -> list[Series]:
    return [Series(1, "Mock", [CatalogModel(1, "mock-chat"), CatalogModel(2, "mock-reasoner")])]


class Options(msgspec.Struct, forbid_unknown_fields=True):
    """``[surfaces.topic_chat]`` options."""

    series: list[Series] = msgspec.field(default_factory=default_series)
    """The catalog clients pick from with ``seriesId`` and ``modelId``."""
    max_message_chars: int = 20_000
    """Longer messages answer 400."""
    system_prompt: str = ""
    """Sent first in every topic; empty: none."""
    summarize: bool = True
    """With ``enableMemory``, fold what no longer fits the context into a rolling summary."""
    web_results: int = 5
    """How many web results go into the context with ``enableGoogleResults``."""
    first_text_wait: float = 10.0
    """Seconds a reply waits for its first text before its headers go out anyway (after that,
    an upstream refusal can only be told in the metadata)."""

    def __post_init__(self) -> None:
        if self.max_message_chars < 1:
            raise ValueError("max_message_chars to be >= 1")
        if not 1 <= self.web_results <= 20:
            raise ValueError("web_results to be between 1 and 20")


def timestamp(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds and ``Z``, as the seed shows: ``2023-04-03T06:07:55.371Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def topic(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": conversation.id,
        "userId": conversation.user_id,
        "name": conversation.name,
        "seriesId": conversation.series_id,
        "favorite": conversation.favorite,
        "createdAt": timestamp(conversation.created_at),
        "updatedAt": timestamp(conversation.updated_at),
    }


def message_entry(message: Message, conversation: Conversation, live: Generation | None) -> dict[str, Any]:
    """A message in the seed's shape; ``status`` only on replies that did not complete."""
    content = message.content
    status = message.status
    if live is not None and live.message_id == message.id:
        content, status = live.content, "generating"
    entry: dict[str, Any] = {
        "id": message.id,
        "userId": conversation.user_id,
        "topicId": conversation.id,
        "type": 0 if message.role == "user" else 1,
        "message": content,
        "seriesId": conversation.series_id,
        "images": [],
        "createdAt": timestamp(message.created_at),
        "updatedAt": timestamp(message.updated_at),
    }
    if message.role == "assistant" and status != "complete":
        entry["status"] = status
    return entry


def failure(status: int, message: str, **extra: Any) -> Response[Any]:
    """The seed's error shape (NestJS's): ``{"statusCode", "message"}``."""
    return Response({"statusCode": status, "message": message, **extra}, status_code=status)


class Invalid(Exception):
    """Bad input; ``str()`` names the field and what is wrong."""


def json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = decode_body(raw)
    except InvalidBody as exc:
        raise Invalid(str(exc)) from None
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object")
    return body


def integer(value: Any, field: str, *, required: bool = True) -> int | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"field '{field}' must be an integer, got {value!r}")
    return value


def flag(value: Any, field: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise Invalid(f"field '{field}' must be true or false, got {value!r}")
    return value


MAX_ID = 2**63 - 1  # SQLite's largest integer


def path_id(raw: str, field: str, where: str = "path parameter") -> int:
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_ID:
        raise Invalid(f"{where} '{field}' must be a positive integer, got {raw!r}")
    return int(raw)


class TopicChatSurface(Surface):
    """Topics with their own context, for the seed's chat clients.

    Promises: every endpoint needs an API key and shows only the caller's
    own topics (anyone else's id is 404, like a missing one); a reply is
    streamed as plain text while it is generated, then ``¦`` and its
    metadata JSON, and is stored however the client fares; bad input is 400
    naming the field, with nothing written.
    """

    name = "topic_chat"
    Options = Options

    def _check(self, services: Services) -> None:
        """Every catalog entry names a configured model and provider (ConfigError otherwise)."""
        options: Options = self.options
        problems = []
        config = services.config

        def problem(key: str, expected: str, found: str) -> None:
            problems.append(Problem(str(config.path), f"surfaces.topic_chat.{key}", expected, found))

        seen_series: set[int] = set()
        for i, series in enumerate(options.series):
            if series.id in seen_series:
                problem(f"series.{i}.id", "a series id used once", str(series.id))
            seen_series.add(series.id)
            seen_models: set[int] = set()
            for j, entry in enumerate(series.models):
                if entry.id in seen_models:
                    problem(f"series.{i}.models.{j}.id", "a model id used once in its series", str(entry.id))
                seen_models.add(entry.id)
                if entry.model not in config.models:
                    known = ", ".join(sorted(config.models)) or "none configured"
                    problem(
                        f"series.{i}.models.{j}.model", f"a model of [models] ({known})", repr(entry.model)
                    )
                if entry.provider is not None and entry.provider not in services.catalog.providers:
                    known = ", ".join(sorted(services.catalog.providers))
                    problem(
                        f"series.{i}.models.{j}.provider",
                        f"a provider instance ({known})",
                        repr(entry.provider),
                    )
        if problems:
            raise ConfigError(problems)
        self.catalog = {series.id: {entry.id: entry for entry in series.models} for series in options.series}

    def route(self, series_id: Any, model_id: Any) -> Route:
        """The route of a catalog entry; :class:`Invalid` naming an unknown series or model."""
        series_id = integer(series_id, "seriesId")
        model_id = integer(model_id, "modelId")
        models = self.catalog.get(series_id)  # type: ignore[arg-type]
        if models is None:
            known = ", ".join(str(s) for s in self.catalog) or "none"
            raise Invalid(f"field 'seriesId': there is no series {series_id} (known: {known})")
        entry = models.get(model_id)  # type: ignore[arg-type]
        if entry is None:
            known = ", ".join(str(m) for m in models)
            raise Invalid(f"field 'modelId': series {series_id} has no model {model_id} (known: {known})")
        return self.services.catalog.route(entry.model, entry.provider)

    def route_handlers(self, services: Services) -> Sequence[ControllerRouterHandler]:
        self._check(services)
        self.services = services
        options: Options = self.options
        surface = self
        conversations = services.conversations
        listed: OrderedDict[int, tuple[int, bytes]] = OrderedDict()  # topic id: revision, rendered list

        async def caller_of(request: Request[Any, Any, Any]) -> Caller:
            return await services.accounts.authenticate_headers(request.headers)

        def payer_of(caller: Caller) -> Payer:
            # A key's requests here count against its limits together with its /v1 requests.
            key = caller.key
            if key is None:
                return Payer(balance=caller.user.balance)
            limits = services.accounts.limits_for(key)
            return Payer(key_id=key.id, limits=limits, balance=caller.user.balance)

        async def own_topic(caller: Caller, raw_id: str, field: str = "id") -> Conversation:
            topic_id = path_id(raw_id, field)
            try:
                found = await conversations.get(caller.user.id, topic_id)  # NotFound for anyone else's
            except NotFound:
                found = None
            if found is None or found.kind != KIND:
                raise NotFound(f"topic {topic_id} not found")
            return found

        def text_of(body: dict[str, Any]) -> str:
            text = body.get("message")
            if not isinstance(text, str) or not text.strip():
                raise Invalid("field 'message' is missing or empty")
            if len(text) > options.max_message_chars:
                raise Invalid(f"field 'message' is longer than {options.max_message_chars} characters")
            return text

        async def system_for(body: dict[str, Any], query: str) -> tuple[str | None, str | None]:
            """The system prompt, with web results when asked for; and what to say about the search."""
            system = options.system_prompt or None
            if not flag(body.get("enableGoogleResults"), "enableGoogleResults", False):
                return system, None
            if services.web_search is None:
                return system, "unavailable"
            try:
                results = await services.web_search.search(query, options.web_results)
            except Exception as exc:  # a failed search never fails the reply
                log.warning("web search %r failed: %s: %s", services.web_search.name, type(exc).__name__, exc)
                return system, "failed"
            if not results:
                return system, "no_results"
            lines = [f"{i}. {r.title} ({r.url})\n{r.snippet}" for i, r in enumerate(results, 1)]
            found = "Web search results for the user's message; use them where they help:\n\n" + "\n\n".join(
                lines
            )
            return f"{system}\n\n{found}" if system else found, "used"

        async def reply_stream(
            topic_: Conversation, generation: Generation, web: str | None
        ) -> Response[Any]:
            meta: dict[str, Any] = {
                "userMsgId": generation.question_id,
                "assistantMsgId": generation.message_id,
                "topicId": topic_.id,
            }
            if web is not None:
                meta["webSearch"] = web
            batches = generation.batches(PACE)

            async def first_text() -> str:
                async for batch in batches:
                    text = _text(batch)
                    if text or any(isinstance(e, Finish) for e in batch):
                        return text
                return ""

            # Wait for the first text, so a reply the upstream refuses gets a real status code;
            # but not for long (a reasoning model thinks first): then the headers go out anyway.
            opening = asyncio.ensure_future(first_text())
            await asyncio.wait({opening}, timeout=options.first_text_wait)
            if opening.done() and not opening.result():
                try:
                    outcome = await generation.wait()
                except Exception:
                    outcome = None
                if (
                    outcome is not None
                    and outcome.status == "error"
                    and outcome.error
                    and not generation.content
                ):
                    return failure(_status(outcome.error), outcome.error.message, **meta)

            async def body() -> AsyncIterator[bytes]:
                if first := await opening:
                    yield first.encode()
                async for batch in batches:
                    if text := _text(batch):
                        yield text.encode()
                try:
                    outcome = await generation.wait()
                except Exception:  # the reply could not be saved; the log has why
                    meta.update(status="error", error="the reply could not be saved")
                else:
                    if outcome.status != "complete":
                        meta["status"] = outcome.status
                        if outcome.error is not None:
                            meta["error"] = outcome.error.message
                # A ¦ in the metadata (an error message) is escaped: clients split at the last one.
                yield (SEPARATOR + msgspec.json.encode(meta).decode().replace(SEPARATOR, "\\u00a6")).encode()

            return ReplyStream(body(), "text/plain; charset=utf-8")

        @post("/chat/topic", tags=["topic-chat"], summary="Create a topic", status_code=200)
        async def create_topic(request: Request[Any, Any, Any]) -> Response[Any]:
            caller = await caller_of(request)
            body = json_object(await request.body())
            name = body.get("name")
            if not isinstance(name, str) or not name.strip():
                raise Invalid("field 'name' is missing or empty")
            if len(name) > 200:
                raise Invalid("field 'name' is longer than 200 characters")
            series_id = integer(body.get("seriesId"), "seriesId")
            if series_id not in surface.catalog:
                raise Invalid(f"field 'seriesId': there is no series {series_id}")
            created = await conversations.create(caller.user.id, KIND, name, series_id)
            return Response(topic(created))

        @get("/chat/topic", tags=["topic-chat"], summary="List the caller's topics")
        async def list_topics(request: Request[Any, Any, Any]) -> Response[Any]:
            caller = await caller_of(request)
            raw = request.query_params.get("seriesId")
            series_id = path_id(raw, "seriesId", "query parameter") if raw is not None else None
            found = await conversations.list(caller.user.id, KIND, series_id)
            return Response([topic(t) for t in found])

        @get("/chat/topic/{topic_id:str}", tags=["topic-chat"], summary="One topic")
        async def get_topic(request: Request[Any, Any, Any], topic_id: str) -> Response[Any]:
            return Response(topic(await own_topic(await caller_of(request), topic_id)))

        @patch("/chat/topic/{topic_id:str}", tags=["topic-chat"], summary="Rename or (un)favourite a topic")
        async def update_topic(request: Request[Any, Any, Any], topic_id: str) -> Response[Any]:
            caller = await caller_of(request)
            found = await own_topic(caller, topic_id)
            body = json_object(await request.body())
            changes: dict[str, Any] = {}
            if "name" in body:
                name = body["name"]
                if not isinstance(name, str) or not name.strip() or len(name) > 200:
                    raise Invalid("field 'name' must be a non-empty string of at most 200 characters")
                changes["name"] = name
            if "favorite" in body:
                changes["favorite"] = flag(body["favorite"], "favorite", False)
            if not changes:  # a client that sent neither meant to change something: say so
                raise Invalid("nothing to change: send field 'name', 'favorite' or both")
            updated = await conversations.update(caller.user.id, found.id, ConversationPatch(**changes))
            return Response(topic(updated))

        @delete("/chat/topic/{topic_id:str}", tags=["topic-chat"], summary="Delete a topic", status_code=200)
        async def delete_topic(request: Request[Any, Any, Any], topic_id: str) -> Response[Any]:
            caller = await caller_of(request)
            found = await own_topic(caller, topic_id)
            return Response(topic(await conversations.delete(caller.user.id, found.id)))

        @post(
            "/chat/topic/{topic_id:str}/message",
            tags=["topic-chat"],
            summary="Send a message; the reply streams as plain text, then ¦ and its ids",
            status_code=200,
        )
        async def send(request: Request[Any, Any, Any], topic_id: str) -> Response[Any]:
            caller = await caller_of(request)
            found = await own_topic(caller, topic_id, "topic_id")
            body = json_object(await request.body())
            route = surface.route(body.get("seriesId"), body.get("modelId"))
            text = text_of(body)
            memory = flag(body.get("enableMemory"), "enableMemory", True)
            system, web = await system_for(body, text)
            generation = await conversations.ask(
                found,
                route,
                text,
                system=system,
                memory=memory,
                summarize=options.summarize,
                payer=payer_of(caller),
            )
            return await reply_stream(found, generation, web)

        @get("/chat/topic/{topic_id:str}/message", tags=["topic-chat"], summary="A topic's messages")
        async def list_messages(request: Request[Any, Any, Any], topic_id: str) -> Response[Any]:
            found = await own_topic(await caller_of(request), topic_id, "topic_id")
            live = services.generations.current(found.id)
            cached = listed.get(found.id)
            if live is None and cached is not None and cached[0] == found.revision:
                listed.move_to_end(found.id)
                return Response(cached[1], media_type="application/json")
            transcript = await conversations.transcript(found)
            body = msgspec.json.encode([message_entry(m, found, live) for m in transcript.messages])
            if live is None and not transcript.generating:
                # Rendered once per change: a long topic reloaded again and again costs two small reads.
                listed[found.id] = (found.revision, body)
                while len(listed) > conversations.cached_conversations:
                    listed.popitem(last=False)
            return Response(body, media_type="application/json")

        @patch(
            "/chat/topic/{topic_id:str}/message/{message_id:str}",
            tags=["topic-chat"],
            summary="Edit a message",
        )
        async def edit(request: Request[Any, Any, Any], topic_id: str, message_id: str) -> Response[Any]:
            found = await own_topic(await caller_of(request), topic_id)
            number = path_id(message_id, "messageId")
            text = text_of(json_object(await request.body()))
            edited = await conversations.edit_message(found, number, text)
            return Response(message_entry(edited, await conversations.get(found.user_id, found.id), None))

        @post(
            "/chat/topic/{topic_id:str}/message/{message_id:str}/regenerate",
            tags=["topic-chat"],
            summary="Answer again, replacing the reply in place",
            status_code=200,
        )
        async def regenerate(
            request: Request[Any, Any, Any], topic_id: str, message_id: str
        ) -> Response[Any]:
            caller = await caller_of(request)
            found = await own_topic(caller, topic_id)
            number = path_id(message_id, "messageId")
            body = json_object(await request.body())
            route = surface.route(body.get("seriesId"), body.get("modelId"))
            memory = flag(body.get("enableMemory"), "enableMemory", True)
            question = await conversations.question_of(found, number)  # what a web search looks for
            system, web = await system_for(body, question.content)
            generation = await conversations.regenerate(
                found,
                route,
                number,
                system=system,
                memory=memory,
                payer=payer_of(caller),
            )
            return await reply_stream(found, generation, web)

        @get("/chat/series", tags=["topic-chat"], summary="The series and models clients may pick")
        async def series(request: Request[Any, Any, Any]) -> Response[Any]:
            await caller_of(request)
            listed = []
            for entry in options.series:
                models = []
                for model in entry.models:
                    config = services.config.models[model.model]
                    models.append(
                        {
                            "id": model.id,
                            "name": model.name or model.model,
                            "model": model.model,
                            "description": config.description,
                            "contextTokens": config.context_tokens,
                        }
                    )
                listed.append({"id": entry.id, "name": entry.name, "models": models})
            return Response(listed)

        limit = services.config.server.max_body_bytes

        def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
            match exc:
                case Invalid() | ContextTooLong():
                    return failure(400, str(exc))
                case Unauthenticated():
                    return failure(401, str(exc))
                case InsufficientBalance():
                    return failure(403, "your balance is used up; ask the operator to top it up")
                case RateLimitExceeded():
                    response = failure(429, str(exc))
                    response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
                    return response
                case NotFound():
                    return failure(404, str(exc))
                case Conflict() | Superseded():
                    return failure(409, str(exc))
                case ProviderError():
                    return failure(_status(exc), exc.message)
                case RequestEntityTooLarge():
                    return failure(
                        413, f"the request body is larger than this server's limit of {limit} bytes"
                    )
                case HTTPException():
                    return failure(exc.status_code, exc.detail)
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
            return failure(500, f"internal error ({type(exc).__name__}); the server log has the details")

        handlers = [
            create_topic,
            list_topics,
            get_topic,
            update_topic,
            delete_topic,
            send,
            list_messages,
            edit,
            regenerate,
            series,
        ]
        return [
            Router("/", route_handlers=handlers, exception_handlers={Exception: handle}),
            web_page("/chat", STATIC, "chat.html", PAGE_FILES, "The chat page"),
        ]


def _text(batch: list[ProviderEvent]) -> str:
    return "".join(e.text for e in batch if isinstance(e, ContentDelta))


def _status(error: ProviderError) -> int:
    return error.status if error.status >= 400 else 502


@hookimpl
def register_surfaces() -> list[type[Surface]]:
    return [TopicChatSurface]
