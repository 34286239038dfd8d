"""Stored responses, on chatgate's own conversations (``previous_response_id``, GET, DELETE).

Each stored response is one conversation of kind ``response`` owned by the caller's
user. Its ``name`` is the id of the response it follows ("" for none); its messages
are one ``user`` message, the JSON of the request's input items and instructions
(:class:`Input`), and one ``assistant`` message, the JSON of the ``Response`` object
as answered. A response id is ``resp_`` + a random nonce + the conversation id in
hex: the nonce, kept in the input, makes ids not enumerable, and ownership is checked
on every read (another user's response is as missing as a deleted one).

A response is kept ``responses_retention_days`` after it was answered (its
conversation's ``updated_at``): older, it is as missing as a deleted one, and
:mod:`.sweep` deletes it.
"""

from __future__ import annotations

import random
import secrets
from datetime import timedelta
from typing import Any

import msgspec

from core import (
    ChatMessage,
    ContextTooLong,
    Conversation,
    MessageDraft,
    NotFound,
    Services,
    estimate_prompt_tokens,
    utcnow,
)
from core.tokens import MESSAGE_OVERHEAD

from . import wire

KIND = "response"
PREFIX = "resp_"
NONCE = 24
"""Hex digits of the nonce that starts every stored response's id."""
MAX_CHAIN = 4096
"""How many responses a ``previous_response_id`` chain may hold; a longer one is refused.

The walk is bounded first by the model's context (:meth:`Saved.chain` stops once what
it loaded cannot fit), so this bound only matters for links that carry (next to)
nothing: 4096 is far past any agent loop that fits a context (LangChain's agents
chain one response per tool round), and walking it is at most 8192 store reads, which
only a caller who paid for 4096 requests can make happen."""

_encode = msgspec.json.Encoder().encode


class Input(msgspec.Struct, frozen=True):
    """What a stored response was asked: its input items (each with an ``id``) and instructions."""

    nonce: str
    items: list[dict[str, Any]]
    instructions: str | None = None


class Stored(msgspec.Struct, frozen=True):
    """A stored response as read back: the conversation, what it was asked, what it answered."""

    conversation: Conversation
    input: Input
    response: dict[str, Any]

    @property
    def previous(self) -> str | None:
        return self.conversation.name or None


class ChainTooLong(Exception):
    """A ``previous_response_id`` chain is longer than :data:`MAX_CHAIN`."""


class Missing(Exception):
    """A response id that is unknown, deleted, another user's, or stored with ``store: false``."""

    def __init__(self, response_id: str) -> None:
        super().__init__(response_id)
        self.response_id = response_id


def unstored_id() -> str:
    """The id of a response that is not stored (``store: false``): unique, never found later
    (too short to name a conversation), and not secret, so no system call for random bytes."""
    return f"{PREFIX}{random.getrandbits(4 * NONCE):0{NONCE}x}"


class Slot(msgspec.Struct, frozen=True):
    """A conversation made for a response being generated, and the id it will answer under."""

    conversation: Conversation
    nonce: str

    @property
    def response_id(self) -> str:
        return f"{PREFIX}{self.nonce}{self.conversation.id:x}"


def _conversation_id(response_id: str) -> tuple[str, int] | None:
    """The nonce and conversation id a response id names, or None if it names none."""
    if not response_id.startswith(PREFIX):
        return None
    rest = response_id[len(PREFIX) :]
    nonce, number = rest[:NONCE], rest[NONCE:]
    if len(nonce) != NONCE or not number or len(number) > 16:
        return None
    try:
        return nonce, int(number, 16)
    except ValueError:
        return None


class Saved:
    """Responses kept on the caller's conversations.

    Promises: :meth:`load`, :meth:`chain` and :meth:`delete` find only the caller's own
    responses that were saved whole (a response still being generated, deleted, or
    another user's raises :class:`Missing`); :meth:`chain` is bounded by
    :data:`MAX_CHAIN`.
    """

    def __init__(self, services: Services, retention_days: float = 0) -> None:
        self.conversations = services.conversations
        self.retention = timedelta(days=retention_days) if retention_days > 0 else None

    def expired(self, conversation: Conversation) -> bool:
        """Whether a stored response is past its retention (and so as missing as a deleted one)."""
        return self.retention is not None and conversation.updated_at < utcnow() - self.retention

    async def slot(self, user_id: int, previous: str | None) -> Slot:
        """A conversation for a response about to be generated (saved later by :meth:`save`)."""
        conversation = await self.conversations.create(user_id, KIND, previous or "")
        return Slot(conversation, secrets.token_hex(NONCE // 2))

    async def save(self, slot: Slot, parsed: wire.Parsed, response: dict[str, Any], model: str) -> None:
        """Keep what was asked and what was answered (``response``, the object as sent)."""
        items = [
            item if "id" in item else {**item, "id": wire.item_id(_prefix(item))} for item in parsed.items
        ]
        asked = Input(slot.nonce, [_listed(item) for item in items], parsed.instructions)
        drafts = (
            MessageDraft(role="user", content=_encode(asked).decode()),
            MessageDraft(role="assistant", content=_encode(response).decode(), model=model),
        )
        await self.conversations.append(slot.conversation, drafts)

    async def discard(self, slot: Slot) -> None:
        """Delete the conversation of a response that ended before it could be answered."""
        await self.conversations.delete(slot.conversation.user_id, slot.conversation.id)

    async def load(self, user_id: int, response_id: str) -> Stored:
        """The caller's stored response; :class:`Missing` otherwise."""
        named = _conversation_id(response_id)
        if named is None:
            raise Missing(response_id)
        nonce, conversation_id = named
        try:
            conversation = await self.conversations.get(user_id, conversation_id)
        except NotFound:
            raise Missing(response_id) from None
        if conversation.kind != KIND or self.expired(conversation):
            raise Missing(response_id)
        messages = await self.conversations.messages(conversation)
        if len(messages) < 2:  # still being generated
            raise Missing(response_id)
        try:
            asked = msgspec.json.decode(messages[0].content, type=Input)
            response = msgspec.json.decode(messages[1].content)
        except msgspec.DecodeError:
            raise Missing(response_id) from None
        if not secrets.compare_digest(asked.nonce, nonce):
            raise Missing(response_id)
        return Stored(conversation, asked, response)

    async def delete(self, user_id: int, response_id: str) -> None:
        stored = await self.load(user_id, response_id)
        await self.conversations.delete(user_id, stored.conversation.id)

    async def chain(self, user_id: int, response_id: str, budget: int, spent: int = 0) -> list[ChatMessage]:
        """The context ``previous_response_id`` stands for: every response of the chain it ends,
        oldest first, its input items then its output items (a failed response's partial output
        is left out: the model never finished that turn). Instructions are not carried over.

        The walk stops as soon as the estimated tokens of what it loaded, plus ``spent`` (the
        rest of the request), reach ``budget`` (the model's context): the request could never
        fit, so the rest of the chain is not read.

        Raises:
            Missing: a response of the chain is not found (the id named in it).
            ChainTooLong: the chain holds more than :data:`MAX_CHAIN` responses.
            ContextTooLong: the chain and ``spent`` do not fit ``budget`` (at least its tokens).
        """
        links: list[list[dict[str, Any]]] = []
        current: str | None = response_id
        while current is not None:
            if len(links) == MAX_CHAIN:
                raise ChainTooLong(response_id)
            stored = await self.load(user_id, current)
            items = _items(stored)
            links.append(items)
            # A lower bound of what this link adds to the final estimate (billing's): one
            # message's overhead less, as a turn may continue across two links.
            messages, _ = wire.to_messages(items, "previous_response_id")
            spent += max(0, estimate_prompt_tokens(messages) - MESSAGE_OVERHEAD)
            if spent >= budget:
                raise ContextTooLong(spent, budget - 1)
            current = stored.previous
        every = [item for items in reversed(links) for item in items]
        messages, _ = wire.to_messages(every, "previous_response_id")
        return list(messages)


def _items(stored: Stored) -> list[dict[str, Any]]:
    """A link's part of the context: its input items, then its output unless it failed."""
    items = list(stored.input.items)
    if stored.response.get("status") != "failed":
        output = stored.response.get("output")
        items += output if isinstance(output, list) else []
    return items


_PREFIXES = {"function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def _prefix(item: dict[str, Any]) -> str:
    kind = item.get("type", "message")
    # A string first: a client's list or object is no dict key (checked by wire before, still).
    return _PREFIXES.get(kind, "msg") if isinstance(kind, str) else "msg"


def _listed(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as ``input_items`` lists it: a message's text content as parts, a status."""
    kind = item.get("type", "message")
    if kind != "message":
        return item
    content = item.get("content")
    if isinstance(content, str):
        part = "output_text" if item.get("role") == "assistant" else "input_text"
        content = [{"type": part, "text": content}]
    return {**item, "type": "message", "content": content, "status": item.get("status", "completed")}
