"""Conversations and messages: the calls that run on the store's thread, each one whole call."""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec

from core import Conversation, Message, MessageDraft

from .rows import EPOCH, MS, balance_of, by_id, fetch, found, insert, now_ms, record, update


def create_conversation(db: sqlite3.Connection, values: dict[str, Any]) -> Conversation:
    now = now_ms()
    balance_of(db, values["user_id"])
    return record(Conversation, insert(db, "conversations", {**values, "created_at": now, "updated_at": now}))


def append_message(
    db: sqlite3.Connection, conversation_id: int, draft: MessageDraft, owner: str | None = None
) -> Message:
    now = now_ms()  # under the write lock, so timestamps follow ids across processes too
    bumped = fetch(
        db, "UPDATE conversations SET updated_at = ? WHERE id = ? RETURNING id", (now, conversation_id)
    )
    found(bumped, "conversation", conversation_id)
    values = {**msgspec.structs.asdict(draft), "conversation_id": conversation_id}
    if draft.status == "generating":  # a reply being generated belongs to its process (core.cluster)
        values["owner"] = owner
    row = insert(db, "messages", {**values, "created_at": now, "updated_at": now})
    return message(db, row["id"])


def append_messages(
    db: sqlite3.Connection, conversation_id: int, drafts: list[MessageDraft], owner: str | None = None
) -> list[Message]:
    return [
        append_message(db, conversation_id, draft, owner) for draft in drafts
    ]  # one transaction: all or none


def message(db: sqlite3.Connection, message_id: int) -> Message:
    # Read back after the write: RETURNING shows the row before the triggers stamped its revision.
    return by_id(db, Message, "messages", message_id, "message")


def update_message(db: sqlite3.Connection, message_id: int, values: dict[str, Any]) -> Message:
    found(update(db, "messages", message_id, values), "message", message_id)
    return message(db, message_id)


def interrupt_stale(db: sqlite3.Connection, cutoff_ms: int) -> list[Message]:
    sql = (
        "UPDATE messages SET status = 'interrupted', updated_at = ?"
        " WHERE status = 'generating' AND updated_at < ? RETURNING *"
    )
    return [message(db, row["id"]) for row in fetch(db, sql, (now_ms(), cutoff_ms))]


def conversation_since(
    db: sqlite3.Connection, conversation_id: int, after_revision: int
) -> tuple[Conversation, list[Message]]:
    # One read call is one transaction: the messages are those of the revision returned.
    conversation = by_id(db, Conversation, "conversations", conversation_id, "conversation")
    if conversation.revision <= after_revision:
        return conversation, []
    return conversation, messages(db, conversation_id, after_revision)


_MESSAGE_COLUMNS = (
    "id, conversation_id, role, content, reasoning, status, model, prompt_tokens, completion_tokens,"
    " error, created_at, updated_at, ledger_id, revision"
)


def messages(db: sqlite3.Connection, conversation_id: int, after_revision: int) -> list[Message]:
    # The hot read of long conversations (a polled record): tuples and positional
    # structs, about 1.4x faster than rows by name through record.
    cursor = db.cursor()
    cursor.row_factory = None
    cursor.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND revision > ? ORDER BY id",
        (conversation_id, after_revision),
    )
    epoch, ms = EPOCH, MS
    # Columns in field order; the two stamps (then ledger_id and revision) come last.
    return [
        Message(*row[:10], epoch + row[10] * ms, epoch + row[11] * ms, row[12], row[13])  # type: ignore[call-arg]
        for row in cursor.fetchall()
    ]
