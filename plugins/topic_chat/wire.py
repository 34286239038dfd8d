"""The topic-chat wire format (seed 002): request bodies, topics and messages as clients see
them, the catalog listing, and the ``¦`` + metadata tail of a streamed reply."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import ClassVar, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from core import Conversation, Generation, InvalidBody, Message, MessageStatus, decode_body

from .errors import Invalid

SEPARATOR = "¦"
MAX_ID = 2**63 - 1  # SQLite's largest integer

INTEGER = "field '{field}' must be an integer, got {value!r}"
FLAG = "field '{field}' must be true or false, got {value!r}"
MESSAGE_MISSING = "field 'message' is missing or empty"
NAME_MISSING = "field 'name' is missing or empty"
NAME_WRONG = "field 'name' must be a non-empty string of at most 200 characters"
NOT_AN_OBJECT = "the body must be a JSON object"


# --- requests ---


class Body(msgspec.Struct, rename="camel"):
    """Base of the request bodies.

    Unknown fields are accepted (real clients send more than they must). A field
    of the wrong type is answered with its entry of ``complaints`` (``{field}``
    and ``{value!r}`` filled in), in this surface's words rather than msgspec's.
    """

    complaints: ClassVar[Mapping[str, str]] = {}


class NewTopic(Body):
    """``POST /chat/topic``."""

    name: str | None = None
    series_id: int | None = None
    complaints = {"name": NAME_MISSING, "seriesId": INTEGER}


class TopicChange(Body):
    """``PATCH /chat/topic/{id}``: what is absent stays as it is."""

    name: str | UnsetType = UNSET
    favorite: bool | UnsetType | None = UNSET
    """``null`` means false."""
    complaints = {"name": NAME_WRONG, "favorite": FLAG}


class ReplyRequest(Body):
    """``POST .../message/{messageId}/regenerate``: which model answers, and how."""

    series_id: int | None = None
    model_id: int | None = None
    enable_memory: bool | None = None
    """Send the topic's history (the default) or the question alone."""
    enable_google_results: bool | None = None
    """Put web search results into the context (off by default)."""
    complaints = {"seriesId": INTEGER, "modelId": INTEGER, "enableMemory": FLAG, "enableGoogleResults": FLAG}


class NewMessage(ReplyRequest):
    """``POST /chat/topic/{topic_id}/message``."""

    message: str | None = None
    complaints = {**ReplyRequest.complaints, "message": MESSAGE_MISSING}


class MessageEdit(Body):
    """``PATCH /chat/topic/{id}/message/{messageId}``."""

    message: str | None = None
    complaints = {"message": MESSAGE_MISSING}


B = TypeVar("B", bound=Body)


def read(raw: bytes, kind: type[B]) -> B:
    """``raw`` decoded as ``kind``.

    Raises:
        InvalidBody: the body is empty, not JSON, or nested too deeply (core's words).
        Invalid: it is JSON, but not an object, or a field has the wrong type (this
            surface's words, naming the field and the value sent).
    """
    try:
        return decode_body(raw, kind)
    except InvalidBody as exc:
        if exc.reason != "shape":
            raise
        wrong = exc
    # A typed decode stops at the first value of the wrong type; read the whole body as JSON,
    # so what is wrong with it as a whole (broken, too deep) is said first, and the value is known.
    sent: object = decode_body(raw)
    if not isinstance(sent, dict):
        raise Invalid(NOT_AN_OBJECT)
    template = kind.complaints.get(wrong.field or "")
    if template is None:
        raise Invalid(wrong.message)
    raise Invalid(template.format(field=wrong.field, value=sent.get(wrong.field)))


def required(value: int | None, field: str) -> int:
    """``value``, which the client must send; :class:`Invalid` when it did not."""
    if value is None:
        raise Invalid(INTEGER.format(field=field, value=None))
    return value


def message_text(text: str | None, max_chars: int) -> str:
    """The text of a message to send or store; :class:`Invalid` when blank or too long."""
    if text is None or not text.strip():
        raise Invalid(MESSAGE_MISSING)
    if len(text) > max_chars:
        raise Invalid(f"field 'message' is longer than {max_chars} characters")
    return text


def path_id(raw: str, field: str, where: str = "path parameter") -> int:
    """An id in a path or query: plain ASCII digits, at most :data:`MAX_ID`."""
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_ID:
        raise Invalid(f"{where} '{field}' must be a positive integer, got {raw!r}")
    return int(raw)


# --- answers ---


def timestamp(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds and ``Z``, as the seed shows: ``2023-04-03T06:07:55.371Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class Topic(msgspec.Struct, rename="camel"):
    """A topic in the seed's shape."""

    id: int
    user_id: int
    name: str
    series_id: int | None
    favorite: bool
    created_at: str
    updated_at: str


def topic_of(conversation: Conversation) -> Topic:
    return Topic(
        id=conversation.id,
        user_id=conversation.user_id,
        name=conversation.name,
        series_id=conversation.series_id,
        favorite=conversation.favorite,
        created_at=timestamp(conversation.created_at),
        updated_at=timestamp(conversation.updated_at),
    )


class MessageEntry(msgspec.Struct, rename="camel"):
    """A message in the seed's shape; ``status`` only on replies that did not complete."""

    id: int
    user_id: int
    topic_id: int
    type: int
    """0: the user's, 1: a reply."""
    message: str
    series_id: int | None
    images: list[str]
    created_at: str
    updated_at: str
    status: MessageStatus | UnsetType = UNSET


def message_of(message: Message, conversation: Conversation, live: Generation | None) -> MessageEntry:
    """``message`` of ``conversation``; the running reply ``live`` shows its text so far."""
    content = message.content
    status = message.status
    if live is not None and live.message_id == message.id:
        content, status = live.content, "generating"
    return MessageEntry(
        id=message.id,
        user_id=conversation.user_id,
        topic_id=conversation.id,
        type=0 if message.role == "user" else 1,
        message=content,
        series_id=conversation.series_id,
        images=[],
        created_at=timestamp(message.created_at),
        updated_at=timestamp(message.updated_at),
        status=status if message.role == "assistant" and status != "complete" else UNSET,
    )


class CatalogEntry(msgspec.Struct, rename="camel"):
    """A model of a series, as ``GET /chat/series`` lists it."""

    id: int
    name: str
    model: str
    description: str
    context_tokens: int


class SeriesEntry(msgspec.Struct):
    """A series and its models, as ``GET /chat/series`` lists them."""

    id: int
    name: str
    models: list[CatalogEntry]


class ReplyMeta(msgspec.Struct, rename="camel"):
    """What follows a streamed reply's ``¦``; also the extra fields of a reply refused up front."""

    user_msg_id: int | None
    assistant_msg_id: int
    topic_id: int
    web_search: str | UnsetType = UNSET
    """How the web search went, when one was asked for: ``used``, ``no_results``, ``failed`` or
    ``unavailable``."""
    status: str | UnsetType = UNSET
    """Only when the reply did not complete."""
    error: str | UnsetType = UNSET
    """Why, when it failed."""

    def fields(self) -> dict[str, object]:
        """The set fields by their wire names, for :func:`~.errors.failure`."""
        fields: dict[str, object] = msgspec.to_builtins(self)
        return fields


def tail(meta: ReplyMeta) -> bytes:
    """``¦`` and ``meta``'s JSON, the end of every streamed reply."""
    # A ¦ in the metadata (an error message) is escaped: clients split at the last one.
    return (SEPARATOR + msgspec.json.encode(meta).decode().replace(SEPARATOR, "\\u00a6")).encode()
