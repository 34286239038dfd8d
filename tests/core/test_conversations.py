"""Conversations as the surfaces read them: owner-checked, with their messages kept by revision."""

from __future__ import annotations

import pytest

from core import MessageDraft, MessagePatch
from core.errors import NotFound


async def test_get_brings_kept_messages_up_to_date_with_writes_from_elsewhere(gateway):
    services = gateway.services
    store = services.billing.store
    owner = await services.accounts.ensure_user("owner@example.com")
    stranger = await services.accounts.ensure_user("stranger@example.com")
    conversation = await services.conversations.create(owner.id, "test")
    question = await store.append_message(conversation.id, MessageDraft(role="user", content="one"))
    kept = await services.conversations.messages(await services.conversations.get(owner.id, conversation.id))
    assert kept == [question]

    # Another process answers and edits: the store moves the revision, nothing here knows.
    reply = await store.append_message(conversation.id, MessageDraft(role="assistant", content="two"))
    edited = await store.update_message(question.id, MessagePatch(content="one, edited"))

    current = await services.conversations.get(owner.id, conversation.id)
    assert current.revision == reply.revision + 1
    assert await services.conversations.messages(current) == [edited, reply]
    assert await services.conversations.messages(current) == await store.list_messages(conversation.id)
    with pytest.raises(NotFound):
        await services.conversations.get(stranger.id, conversation.id)
    # A refused reader changes nothing the owner sees.
    assert await services.conversations.messages(current) == [edited, reply]
