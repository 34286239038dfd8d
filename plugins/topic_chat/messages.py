"""``/chat/topic/{topic_id}/message``: sending (the reply streams), listing, editing, regenerating."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, get, patch, post
from litestar.di import NamedDependency
from litestar.response import Response

from core import Caller, ReplyStream

from .context import TopicChat
from .replies import instructions, reply_stream
from .wire import MessageEdit, MessageEntry, NewMessage, ReplyRequest, message_of, message_text, path_id, read


class MessageController(Controller):
    """A topic's messages: send one and get the reply as it is generated, list, edit, regenerate.

    Promises: a reply streams as ``text/plain`` while it is generated, then
    ``¦`` and its ids (:class:`~.wire.ReplyMeta`), and is stored however the
    client fares; it is charged to the key's owner within the key's limits;
    someone else's topic or message is 404; bad input is 400 naming the
    field, with nothing written or sent upstream.
    """

    path = "/chat/topic/{topic_id:str}/message"
    tags = ("topic-chat",)

    # Bodies are read by hand, after the key and the topic are checked (see TopicController).

    @post(summary="Send a message; the reply streams as plain text, then ¦ and its ids", status_code=200)
    async def send(
        self,
        request: Request[Any, Any, Any],
        chat: NamedDependency[TopicChat],
        caller: NamedDependency[Caller],
        topic_id: str,
    ) -> Response[dict[str, object]] | ReplyStream:
        found = await chat.own_topic(caller, topic_id, "topic_id")
        body = read(await request.body(), NewMessage)
        route = chat.catalog.route(body.series_id, body.model_id)
        text = message_text(body.message, chat.options.max_message_chars)
        system, web = await instructions(
            chat.services, chat.options, text, body.enable_google_results is True
        )
        generation = await chat.services.conversations.ask(
            found,
            route,
            text,
            system=system,
            memory=body.enable_memory is not False,
            summarize=chat.options.summarize,
            payer=chat.payer_of(caller),
        )
        return await reply_stream(found, generation, web, chat.options.first_text_wait)

    @get(summary="A topic's messages")
    async def list_messages(
        self,
        chat: NamedDependency[TopicChat],
        caller: NamedDependency[Caller],
        topic_id: str,
    ) -> Response[bytes]:
        found = await chat.own_topic(caller, topic_id, "topic_id")
        live = chat.services.generations.current(found.id)
        if live is None and (cached := chat.listings.get(found)) is not None:
            return Response(cached, media_type="application/json")
        transcript = await chat.services.conversations.transcript(found)
        body = msgspec.json.encode([message_of(m, found, live) for m in transcript.messages])
        if live is None and not transcript.generating:
            chat.listings.put(found, body)  # rendered once per change
        return Response(body, media_type="application/json")

    @patch("/{message_id:str}", summary="Edit a message")
    async def edit(
        self,
        request: Request[Any, Any, Any],
        chat: NamedDependency[TopicChat],
        caller: NamedDependency[Caller],
        topic_id: str,
        message_id: str,
    ) -> MessageEntry:
        found = await chat.own_topic(caller, topic_id)
        number = path_id(message_id, "messageId")
        text = message_text(read(await request.body(), MessageEdit).message, chat.options.max_message_chars)
        edited = await chat.services.conversations.edit_message(found, number, text)
        return message_of(edited, await chat.services.conversations.get(found.user_id, found.id), None)

    @post(
        "/{message_id:str}/regenerate", summary="Answer again, replacing the reply in place", status_code=200
    )
    async def regenerate(
        self,
        request: Request[Any, Any, Any],
        chat: NamedDependency[TopicChat],
        caller: NamedDependency[Caller],
        topic_id: str,
        message_id: str,
    ) -> Response[dict[str, object]] | ReplyStream:
        found = await chat.own_topic(caller, topic_id)
        number = path_id(message_id, "messageId")
        body = read(await request.body(), ReplyRequest)
        route = chat.catalog.route(body.series_id, body.model_id)
        question = await chat.services.conversations.question_of(found, number)  # what a web search looks for
        system, web = await instructions(
            chat.services, chat.options, question.content, body.enable_google_results is True
        )
        generation = await chat.services.conversations.regenerate(
            found,
            route,
            number,
            system=system,
            memory=body.enable_memory is not False,
            payer=chat.payer_of(caller),
        )
        return await reply_stream(found, generation, web, chat.options.first_text_wait)
