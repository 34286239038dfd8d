"""Provider events as Anthropic's stream: the content-block state machine.

The SDKs are strict about the stream's bookkeeping (research/dialects.md 0.1,
0.2, A.10, E #1-#4): every event has an ``event:`` line and the same ``type``
in its data; ``message_start`` comes first; blocks are started with indices
0, 1, 2... in order and never interleave; a delta's type matches its block's;
a thinking block carries a ``signature_delta`` before its stop; tool input
comes only as ``input_json_delta`` fragments; ``stop_reason`` is ``tool_use``
whenever a tool_use block was sent. :class:`Blocks` keeps those promises
whatever order the upstream's deltas come in, rendering each event straight
to bytes from fixed pieces (one encode per delta's text, no dict per event).
"""

from __future__ import annotations

import logging

import msgspec

from core import ContentDelta, Finish, ProviderEvent, ReasoningDelta, ToolCallDelta

from . import wire

log = logging.getLogger("chatgate.anthropic_messages")

_encode = msgspec.json.Encoder().encode

PING = b'event: ping\ndata: {"type":"ping"}\n\n'
MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'

_NONE, _THINKING, _TEXT, _TOOL = 0, 1, 2, 3


def error_event(type_: str, message: str) -> bytes:
    """The ``event: error`` that ends a stream which failed after it began (the SDKs raise it)."""
    data = _encode({"type": "error", "error": {"type": type_, "message": message}})
    return b"event: error\ndata: " + data + b"\n\n"


def _delta_prefix(index: int, kind: bytes, field: bytes) -> bytes:
    return (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
        + str(index).encode()
        + b',"delta":{"type":"'
        + kind
        + b'","'
        + field
        + b'":'
    )


def _start(index: int, block: bytes) -> bytes:
    return (
        b'event: content_block_start\ndata: {"type":"content_block_start","index":'
        + str(index).encode()
        + b',"content_block":'
        + block
        + b"}\n\n"
    )


def _stop(index: int) -> bytes:
    return (
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":'
        + str(index).encode()
        + b"}\n\n"
    )


class Blocks:
    """One reply's stream of Anthropic events.

    Promises: :meth:`start` is ``message_start``; :meth:`feed` renders each
    provider event, in order, as zero or more events such that blocks start at
    indices 0, 1, 2... and one is open at a time; nothing is lost: what comes
    while a tool_use block is open (another call's fragments, interleaved, or
    text) waits and is sent after it, each call whole, and a call's fragments
    wait for its name; a fragment that brings a new id at the open call's index
    is another call (:func:`wire.new_call`), in a block of its own; empty text
    never opens a block; the :class:`Finish` closes the open block and renders
    ``message_delta`` (the real usage) and ``message_stop``, whatever the finish
    (an upstream that ran out of resources ends a reply it was paid for as
    ``end_turn``, as the chat surface passes its finish on). :attr:`finished`
    says whether the stream has ended.
    """

    __slots__ = (
        "_held",
        "_kind",
        "_nameless",
        "_open_tool",
        "_prefix",
        "_thinking",
        "finished",
        "index",
        "message_id",
        "model",
        "names",
        "sent_tools",
        "tools",
    )

    def __init__(self, model: str, names: dict[str, str] | None = None) -> None:
        self.model = model
        self.names = names or {}  # the client's name of each tool the upstream knows shortened
        self.message_id = wire.message_id()
        self.index = -1  # the index of the block last started
        self._kind = _NONE  # the kind of the open block
        self._prefix = b""  # the open block's delta event, up to its text
        self._thinking: list[str] = []  # the open thinking block's text, for its signature
        self._open_tool: int | None = None  # the upstream index of the open tool_use block
        self.tools: dict[int, ToolCallDelta] = {}  # the call each upstream index last had a block for
        self._held: list[ProviderEvent] = []  # what came while a tool_use block was open
        self._nameless: dict[int, ToolCallDelta] = {}  # a call's fragments before its name
        self.sent_tools = 0
        self.finished = False

    def start(self, input_tokens: int) -> bytes:
        """``message_start``: the message with no content yet and the estimated input tokens
        (corrected by ``message_delta``, never left at 0: research/dialects.md finding 5)."""
        message: dict[str, object] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": 1,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        data = _encode({"type": "message_start", "message": message})
        return b"event: message_start\ndata: " + data + b"\n\n"

    def feed(self, event: ProviderEvent) -> bytes:
        """The events ``event`` makes."""
        if self._kind == _TOOL and not isinstance(event, Finish):
            if isinstance(event, ToolCallDelta) and event.index == self._open_tool:
                if not wire.new_call(event, self.tools[event.index]):
                    return self._arguments(event.arguments)
                return self._next_call(event)
            # A tool_use block is open: anything else waits for it to close (at the finish),
            # so neither its arguments nor what came between are lost or interleaved.
            self._held.append(event)
            return b""
        match event:
            case ContentDelta(text=text):
                if not text:
                    return b""
                out = b"" if self._kind == _TEXT else self._open(_TEXT)
                return out + self._prefix + _encode(text) + b"}}\n\n"
            case ReasoningDelta(text=text):
                if not text:
                    return b""
                out = b"" if self._kind == _THINKING else self._open(_THINKING)
                self._thinking.append(text)
                return out + self._prefix + _encode(text) + b"}}\n\n"
            case ToolCallDelta() as part:
                return self._tool(part)
            case Finish() as finish:
                return self._finish(finish)
        return b""  # type: ignore[unreachable]  # another kind from a third-party provider: skipped

    def _tool(self, part: ToolCallDelta) -> bytes:
        """The first fragment of a call (no tool_use block is open): its block starts, once it has a name."""
        k = part.index
        if k in self._nameless or part.name is None:
            waiting = self._nameless.pop(k, None)
            if waiting is not None and wire.new_call(part, waiting):
                log.warning("an upstream tool call never got its name; dropped")
                waiting = None
            part = part if waiting is None else _merge(waiting, part)
            if part.name is None:
                self._nameless[k] = part  # arguments before the name: the block needs the name first
                return b""
        if k in self.tools and not wire.new_call(part, self.tools[k]):
            # Cannot happen: a call's block stays open until the finish or the next call at its index.
            log.warning("an upstream tool-call fragment came after its call's block closed; dropped")
            return b""
        return self._open_tool_block(part) + self._arguments(part.arguments)

    def _next_call(self, part: ToolCallDelta) -> bytes:
        """``part`` starts another call at the open call's index: the open call is whole, so its
        block ends; what waited behind it came before ``part`` and goes first."""
        out = self._close()
        held, self._held = self._held, []
        return out + b"".join([self.feed(event) for event in held]) + self.feed(part)

    def _arguments(self, fragment: str) -> bytes:
        if not fragment:
            return b""
        return self._prefix + _encode(fragment) + b"}}\n\n"

    def _open_tool_block(self, part: ToolCallDelta) -> bytes:
        out = self._close()
        self.index += 1
        self._kind = _TOOL
        self._open_tool = part.index
        self.tools[part.index] = part
        self.sent_tools += 1
        name = part.name or ""  # a call's block starts once it has its name
        name = self.names.get(name, name)
        block = _encode({"type": "tool_use", "id": wire.tool_use_id(part.id), "name": name, "input": {}})
        self._prefix = _delta_prefix(self.index, b"input_json_delta", b"partial_json")
        return out + _start(self.index, block)

    def _open(self, kind: int) -> bytes:
        out = self._close()
        self.index += 1
        self._kind = kind
        if kind == _TEXT:
            self._prefix = _delta_prefix(self.index, b"text_delta", b"text")
            return out + _start(self.index, b'{"type":"text","text":""}')
        self._prefix = _delta_prefix(self.index, b"thinking_delta", b"thinking")
        return out + _start(self.index, b'{"type":"thinking","thinking":"","signature":""}')

    def _close(self) -> bytes:
        """End the open block (a thinking block with its signature first)."""
        kind, self._kind = self._kind, _NONE
        self._open_tool = None
        if kind == _NONE:
            return b""
        out = b""
        if kind == _THINKING:
            sign = wire.signature("".join(self._thinking))
            self._thinking = []
            out = _delta_prefix(self.index, b"signature_delta", b"signature") + _encode(sign) + b"}}\n\n"
        return out + _stop(self.index)

    def _finish(self, finish: Finish) -> bytes:
        out = self._close()
        # What waited behind a tool_use block, in the order it came; a call among it holds
        # back what follows it in turn, so each pass ends at least one call.
        while self._held:
            held, self._held = self._held, []
            out += b"".join([self.feed(event) for event in held]) + self._close()
        if self._nameless:
            log.warning("an upstream tool call never got its name; dropped")
            self._nameless = {}
        self.finished = True
        stop = wire.stop_reason(finish.reason, self.sent_tools > 0)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": wire.usage_body(finish.usage),
        }
        return out + b"event: message_delta\ndata: " + _encode(delta) + b"\n\n" + MESSAGE_STOP


def _merge(into: ToolCallDelta, part: ToolCallDelta) -> ToolCallDelta:
    return ToolCallDelta(
        index=into.index,
        id=into.id or part.id,
        name=into.name or part.name,
        arguments=into.arguments + part.arguments,
    )
