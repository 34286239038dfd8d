"""A reply's provider events as a Responses event stream (research/dialects.md B.6).

Every event is an ``event:`` line and a ``data:`` object carrying the same ``type`` and a
``sequence_number`` from 0. The stream opens with ``response.created`` and
``response.in_progress``; each output item is announced (``output_item.added``), filled
(text deltas with ``logprobs: []``, reasoning text, call arguments) and closed
(``…done`` events, then ``output_item.done``) in the order the SDK's accumulator wants:
``output_index`` is the item's position in ``output``. Reasoning streams as
``reasoning_text`` events, or as ``reasoning_summary_*`` events when the request set
``reasoning.summary`` (what LangChain shows while streaming). The stream ends with exactly one
of ``response.completed``, ``response.incomplete`` or ``response.failed``, and no
``[DONE]``.
"""

from __future__ import annotations

from typing import Any, cast

import msgspec

from core import ContentDelta, Finish, ProviderEvent, ReasoningDelta, ToolCallDelta, Usage
from core.reply import merge_tool_call

from . import wire

_encode = msgspec.json.Encoder().encode


class _Item:
    """An output item being streamed."""

    __slots__ = ("call", "deltas", "done", "head", "id", "index", "kind", "parts", "tail")

    def __init__(self, kind: str, item_id: str, index: int, summary: bool = False) -> None:
        self.kind = kind
        self.id = item_id
        self.index = index
        self.parts: list[str] = []
        self.call: ToolCallDelta | None = None
        self.deltas = 0
        self.done: dict[str, Any] | None = None  # the item as its output_item.done event showed it
        # What every delta event of this item repeats, rendered once: the event's name and type
        # before its sequence number, its item and place after it.
        # A reasoning item streams as a summary when one was asked for (LangChain shows only those).
        event = _DELTAS.get("summary" if summary else kind, b"response.function_call_arguments.delta")
        self.head = b"event: " + event + b'\ndata: {"type":"' + event + b'","sequence_number":'
        where = b',"item_id":"' + item_id.encode() + b'","output_index":' + str(index).encode()
        place = (
            b',"summary_index":0' if summary else b"" if kind == "function_call" else b',"content_index":0'
        )
        self.tail = where + place + b',"delta":'

    @property
    def text(self) -> str:
        return "".join(self.parts)


_DELTAS = {
    "message": b"response.output_text.delta",
    "reasoning": b"response.reasoning_text.delta",
    "summary": b"response.reasoning_summary_text.delta",
}
_END = {"message": b',"logprobs":[]}\n\n', "reasoning": b"}\n\n", "function_call": b"}\n\n"}


class ResponseEvents:
    """The events of one streamed response.

    Promises: :meth:`opening` comes first; :meth:`feed` turns each provider event into
    the events it stands for, opening and closing items so that at most one text or
    reasoning item is open and every delta follows its item's ``added`` event; then
    exactly one of :meth:`finish` and :meth:`fail` closes the stream, after which
    :attr:`body` is the final ``Response`` object (what is stored).
    """

    def __init__(
        self, response_id: str, created_at: int, model: str, echo: dict[str, Any], summary: bool
    ) -> None:
        self.response_id = response_id
        self.created_at = created_at
        self.model = model
        self.echo = echo
        self.summary = summary
        self.seq = 0
        self.items: list[_Item] = []  # in output order
        self.open: _Item | None = None  # the reasoning or message item open
        self.calls: dict[int, _Item] = {}  # tool-call index upstream -> its item (the latest one)
        self.open_calls: list[_Item] = []  # every call item not closed yet, in output order
        # Fragments of calls whose name has not come yet, by index: an item is announced
        # with its name, so they wait (merged) until it comes.
        self.held: dict[int, ToolCallDelta] = {}
        self.body: dict[str, Any] | None = None

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + _encode(data) + b"\n\n"

    def _delta(self, item: _Item, text: str) -> bytes:
        # The hot path: one delta rendered from pieces rendered once, no dict built.
        seq = self.seq
        self.seq = seq + 1
        return b"".join((item.head, b"%d" % seq, item.tail, _encode(text), _END[item.kind]))

    def _response(self, status: str, **fields: Any) -> dict[str, Any]:
        return wire.response_body(
            self.response_id, self.created_at, self.model, self.echo, status=status, **fields
        )

    def opening(self) -> bytes:
        """``response.created`` and ``response.in_progress`` (the same object, encoded once)."""
        body = _encode(self._response("in_progress", output=[]))
        self.seq = 2
        return (
            b'event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":'
            + body
            + b'}\n\nevent: response.in_progress\ndata: {"type":"response.in_progress","sequence_number":1,'
            b'"response":' + body + b"}\n\n"
        )

    def feed(self, event: ProviderEvent) -> bytes:
        """The events one provider event stands for (a :class:`Finish` is for :meth:`finish`)."""
        kind = type(event)
        if kind is ContentDelta or kind is ReasoningDelta:
            text = cast("ContentDelta | ReasoningDelta", event).text
            if not text:
                return b""
            wanted = "message" if kind is ContentDelta else "reasoning"
            item = self.open
            out = b""
            if item is None or item.kind != wanted:
                out = self._open(wanted)
                item = self.open
                assert item is not None
            item.parts.append(text)
            delta = self._delta(item, text)
            return out + delta if out else delta
        if isinstance(event, ToolCallDelta):
            return self._call(event)
        return b""  # a Finish, or an event of another kind from a third-party provider

    def _open(self, kind: str) -> bytes:
        out = self._close_open()
        summary = self.summary and kind == "reasoning"
        item = _Item(kind, wire.item_id("msg" if kind == "message" else "rs"), len(self.items), summary)
        self.items.append(item)
        self.open = item
        if kind == "message":
            added = {
                "id": item.id,
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            part: dict[str, Any] = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        else:
            added = {"id": item.id, "type": "reasoning", "summary": []}
            part = {"type": "reasoning_text", "text": ""}
        out += self._event("response.output_item.added", {"output_index": item.index, "item": added})
        if summary:
            where = {"item_id": item.id, "output_index": item.index, "summary_index": 0}
            part = {"type": "summary_text", "text": ""}
            return out + self._event("response.reasoning_summary_part.added", {**where, "part": part})
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        return out + self._event("response.content_part.added", {**where, "part": part})

    def _close_open(self, status: str = "completed") -> bytes:
        item, self.open = self.open, None
        if item is None:
            return b""
        text = item.text
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        if item.kind == "message":
            done = wire.message_item(item.id, text, status)
            part = done["content"][0]
            out = self._event("response.output_text.done", {**where, "text": text, "logprobs": []})
        elif self.summary:
            done = wire.reasoning_item(item.id, text, True)
            where = {"item_id": item.id, "output_index": item.index, "summary_index": 0}
            out = self._event("response.reasoning_summary_text.done", {**where, "text": text})
            part = {"type": "summary_text", "text": text}
            out += self._event("response.reasoning_summary_part.done", {**where, "part": part})
            item.done = done
            return out + self._event("response.output_item.done", {"output_index": item.index, "item": done})
        else:
            done = wire.reasoning_item(item.id, text, False)
            part = {"type": "reasoning_text", "text": text}
            out = self._event("response.reasoning_text.done", {**where, "text": text})
        out += self._event("response.content_part.done", {**where, "part": part})
        item.done = done
        return out + self._event("response.output_item.done", {"output_index": item.index, "item": done})

    def _call(self, part: ToolCallDelta) -> bytes:
        index = part.index
        item = self.calls.get(index)
        if item is not None:
            assert item.call is not None
            if not (part.id and item.call.id and part.id != item.call.id):
                if part.arguments:  # appended; joined once, at the end (no copy per fragment)
                    item.parts.append(part.arguments)
                    item.deltas += 1
                    return self._delta(item, part.arguments)
                return b""
            # An upstream that numbers every parallel call 0: a new id on an open index is a
            # new call (the one before stays open until the calls are closed).
            del self.calls[index]
        out = b""
        held = self.held.pop(index, None)
        if held is not None and part.id and held.id and part.id != held.id:
            out = self._announce(held)  # its name never came; it is not merged into another call
            held = None
        call = merge_tool_call(held, part)
        if not call.name:
            self.held[index] = call
            return out
        return out + self._announce(call)

    def _announce(self, call: ToolCallDelta) -> bytes:
        """Open a call's item (``output_item.added`` with its name), and stream what came of its
        arguments so far."""
        out = self._close_open()
        item = _Item("function_call", wire.item_id("fc"), len(self.items))
        # The upstream's id, or None: wire.call_item then derives one from the item's id.
        item.call = ToolCallDelta(index=call.index, id=call.id, name=call.name)
        self.items.append(item)
        self.open_calls.append(item)
        self.calls[call.index] = item
        added = wire.call_item(item.id, item.call, "in_progress")
        out += self._event("response.output_item.added", {"output_index": item.index, "item": added})
        if call.arguments:
            item.parts.append(call.arguments)
            item.deltas += 1
            out += self._delta(item, call.arguments)
        return out

    @staticmethod
    def _whole_call(item: _Item) -> ToolCallDelta:
        assert item.call is not None
        return msgspec.structs.replace(item.call, arguments=item.text)

    def _close_calls(self) -> bytes:
        out = b""
        # Calls whose name never came are still announced (nameless): their arguments were produced.
        for call in list(self.held.values()):
            out += self._announce(call)
        self.held = {}
        for item in self.open_calls:
            call = self._whole_call(item)
            if not item.deltas:  # arguments that never came still get their delta (dialects.md B.6 step 4)
                out += self._delta(item, "")
            where = {"item_id": item.id, "output_index": item.index}
            out += self._event(
                "response.function_call_arguments.done",
                {**where, "name": call.name or "", "arguments": call.arguments},
            )
            item.done = done = wire.call_item(item.id, call, "completed")
            out += self._event("response.output_item.done", {"output_index": item.index, "item": done})
        self.calls = {}
        self.open_calls = []
        return out

    def output(self, status: str = "completed") -> list[dict[str, Any]]:
        """The output items so far, in order, as the final ``Response`` lists them."""
        out = []
        for item in self.items:
            if item.done is not None:
                out.append(item.done)
            elif item.kind == "message":
                out.append(wire.message_item(item.id, item.text, status))
            elif item.kind == "reasoning":
                out.append(wire.reasoning_item(item.id, item.text, self.summary))
            else:
                call = self._whole_call(item)
                out.append(wire.call_item(item.id, call, "completed" if status == "completed" else status))
        return out

    def finish(self, finish: Finish) -> tuple[bytes, bytes]:
        """Close the open items; return their events and the terminal event (separately, so the
        response can be stored before the client hears it ended)."""
        status, reason = wire.FINISHED.get(finish.reason, ("failed", None))
        if status == "failed":
            message = f"The model's server could not finish the reply ({finish.reason})."
            return self.fail(message, finish.usage)
        item_status = "incomplete" if status == "incomplete" else "completed"
        out = self._close_open(item_status) + self._close_calls()
        if not self.items:  # a reply with no text at all still has its (empty) message
            out += self._open("message") + self._close_open(item_status)
        self.body = self._response(
            status, output=self.output(item_status), usage=finish.usage, incomplete=reason
        )
        return out, self._event(f"response.{status}", {"response": self.body})

    def fail(
        self, message: str, usage: Usage | None = None, code: str = "server_error"
    ) -> tuple[bytes, bytes]:
        """End a reply that failed after the stream began: ``response.failed`` with what was produced."""
        self.open = None
        self.calls = {}
        self.open_calls = []
        self.held = {}
        error = {"code": code, "message": message}
        self.body = self._response("failed", output=self.output("incomplete"), usage=usage, error=error)
        return b"", self._event("response.failed", {"response": self.body})
