"""Anthropic's Messages shapes: requests checked into core types, whole replies and errors rendered.

Requests are decoded by msgspec straight into the structs below (one pass in C,
no intermediate dicts), then translated to a :class:`~core.ChatRequest` in
chat-completions terms (research/dialects.md A.3-A.6, A.16). A bad field
answers 400 ``invalid_request_error`` with a message that starts with the
field's path the way Anthropic writes it (``max_tokens: Field required``,
``messages.0.content.1: ...``). Fields chatgate does not model are ignored,
not passed on: they are Anthropic's own (``cache_control``, ``container``,
betas Claude Code sends), which an OpenAI-style upstream would refuse.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal

import msgspec

from core import (
    ChatMessage,
    ChatRequest,
    Finish,
    ProviderEvent,
    ToolCall,
    ToolCallDelta,
    Usage,
    reasoning_fields,
)
from core.reply import merge_tool_call

# --- errors ---

STATUS_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
"""Anthropic's ``error.type`` for each status it documents (research/dialects.md A.11)."""


def error_type(status: int) -> str:
    """The ``error.type`` of ``status``: Anthropic's own, else the generic one of its class."""
    return STATUS_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def request_id() -> str:
    """A request id in Anthropic's style (``req_...``): unique, not secret, so no system call."""
    return f"req_{random.getrandbits(96):024x}"


def error_body(type_: str, message: str, rid: str) -> dict[str, Any]:
    """Anthropic's error body: ``{"type": "error", "error": {"type", "message"}, "request_id"}``."""
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": rid}


class Invalid(Exception):
    """A request field is wrong: answer 400 ``invalid_request_error`` with ``message``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- request structs ---


class Block(msgspec.Struct, tag_field="type", frozen=True):
    """A content block of a message; the ``type`` key picks the struct."""


class TextBlock(Block, tag="text", frozen=True):
    text: str


class Base64Source(msgspec.Struct, tag_field="type", tag="base64", frozen=True):
    media_type: str
    data: str


class UrlSource(msgspec.Struct, tag_field="type", tag="url", frozen=True):
    url: str


class ImageBlock(Block, tag="image", frozen=True):
    source: Base64Source | UrlSource


class ToolUseBlock(Block, tag="tool_use", frozen=True):
    id: str
    name: str
    input: dict[str, Any] = {}


class ToolResultBlock(Block, tag="tool_result", frozen=True):
    tool_use_id: str
    content: str | list[dict[str, Any]] | None = None
    is_error: bool = False


class ThinkingBlock(Block, tag="thinking", frozen=True):
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(Block, tag="redacted_thinking", frozen=True):
    data: str = ""


AnyBlock = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock
BLOCK_TYPES = ("text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking")


class MessageParam(msgspec.Struct, frozen=True):
    role: Literal["user", "assistant"]
    content: str | list[AnyBlock]


class SystemText(msgspec.Struct, frozen=True):
    text: str
    type: Literal["text"] = "text"


class ToolParam(msgspec.Struct, frozen=True):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class ToolChoice(msgspec.Struct, frozen=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(msgspec.Struct, frozen=True):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class Metadata(msgspec.Struct, frozen=True):
    user_id: str | None = None


class CountRequest(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /v1/messages/count_tokens``: a Messages request without ``max_tokens``."""

    model: str
    messages: list[MessageParam]
    system: str | list[SystemText] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountRequest, frozen=True, kw_only=True):
    """``POST /v1/messages`` (research/dialects.md A.3); unknown fields are ignored."""

    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    stream: bool = False
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: int | None = None  # no chat-completions equivalent: dropped
    stop_sequences: list[str] | None = None
    metadata: Metadata | None = None


_decode_messages = msgspec.json.Decoder(MessagesRequest).decode
_decode_count = msgspec.json.Decoder(CountRequest).decode
_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]+)`$")
_INVALID_TAG = re.compile(r"^Invalid value '([^']*)'$")
_INDEX = re.compile(r"\[(\d+)\]")
_BLOCK_TYPE = re.compile(r"\.content\.\d+\.type$")


def parse(raw: bytes, *, count: bool = False) -> MessagesRequest | CountRequest:
    """Decode and check a body (``count``: a count_tokens one); :class:`Invalid` names the first bad field."""
    if not raw.strip():
        raise Invalid("The request body is empty; expected a JSON object.")
    try:
        body = _decode_count(raw) if count else _decode_messages(raw)
    except msgspec.ValidationError as exc:
        raise _shape_error(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise Invalid(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise Invalid("The request body nests arrays or objects too deeply to be read.") from None
    if not body.model:
        raise Invalid("model: String should have at least 1 character")
    if not body.messages:
        raise Invalid("messages: List should have at least 1 item")
    return body


def _shape_error(message: str) -> Invalid:
    """msgspec's validation ``message`` as Anthropic words it: the path (``messages.0.content``) first."""
    where = _AT.search(message)
    path = _INDEX.sub(r".\1", where.group(1)) if where else ""
    detail = message[: where.start()] if where else message
    if missing := _MISSING.match(detail):
        field = f"{path}.{missing.group(1)}" if path else missing.group(1)
        return Invalid(f"{field}: Field required")
    tag = _INVALID_TAG.match(detail)
    if tag and _BLOCK_TYPE.search(path):
        kinds = ", ".join(BLOCK_TYPES)
        return Invalid(
            f"{path.removesuffix('.type')}: chatgate does not take content blocks of type "
            f"{tag.group(1)!r} (it takes {kinds})"
        )
    return Invalid(f"{path}: {detail}" if path else detail)


# --- request -> chat request ---

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]+")
_ENCODED = "cgx_"  # an upstream tool-call id Anthropic would refuse, carried as base64url


def tool_use_id(upstream: str | None) -> str:
    """The ``tool_use.id`` sent for an upstream tool-call id: the id itself when Anthropic's
    ``^[a-zA-Z0-9_-]+$`` takes it, else reversibly encoded; a fresh one when there is none."""
    if not upstream:
        return f"toolu_{random.getrandbits(120):030x}"
    if _SAFE_ID.fullmatch(upstream) and not upstream.startswith(_ENCODED):
        return upstream
    return _ENCODED + base64.urlsafe_b64encode(upstream.encode()).rstrip(b"=").decode()


def upstream_tool_id(anthropic: str) -> str:
    """The upstream's tool-call id for a ``tool_use.id`` (or ``tool_use_id``) a client sends back."""
    if anthropic.startswith(_ENCODED):
        data = anthropic[len(_ENCODED) :]
        try:
            return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError):
            pass
    return anthropic


SIGNATURE_PREFIX = "cg1."


def signature(thinking: str) -> str:
    """The ``signature`` of a thinking block chatgate emits: recognisable (:func:`signed_here`),
    not secret; it marks the block as one this gateway produced from the upstream's reasoning."""
    return SIGNATURE_PREFIX + hashlib.blake2b(thinking.encode(), digest_size=16).hexdigest()


def signed_here(block: ThinkingBlock) -> bool:
    """Whether ``block`` is one chatgate emitted, unchanged."""
    return block.signature == signature(block.thinking)


def _image_part(block: ImageBlock) -> dict[str, Any]:
    source = block.source
    url = source.url if isinstance(source, UrlSource) else f"data:{source.media_type};base64,{source.data}"
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result_text(block: ToolResultBlock, images: list[dict[str, Any]]) -> str:
    """What a tool message carries for ``block``: its text (images go to ``images``, for the user
    message after the tool messages); a result with nothing to show is still a (empty) message."""
    content = block.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        pieces = []
        for part in content:
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif kind == "image" and isinstance(part.get("source"), dict):
                try:
                    image = msgspec.convert(part, ImageBlock)
                except msgspec.ValidationError:
                    continue
                images.append(_image_part(image))
            elif kind == "tool_reference" and isinstance(part.get("tool_name"), str):
                pieces.append(f"Tool loaded: {part['tool_name']}")
        text = "\n".join(pieces)
    return f"Error: {text}" if block.is_error else text


def _joined(texts: list[str]) -> str:
    return texts[0] if len(texts) == 1 else "\n\n".join(texts)


MAX_TOOL_NAME = 64
"""The longest function name OpenAI-style upstreams take (Anthropic's and MCP's run longer)."""


def upstream_tool_name(name: str) -> str:
    """``name`` as the upstream gets it: itself, or when longer than :data:`MAX_TOOL_NAME`, a
    prefix and a hash of the whole (research A.16 #12), mapped back on the way out."""
    if len(name) <= MAX_TOOL_NAME:
        return name
    return f"{name[:55]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


class Translated(msgspec.Struct, frozen=True):
    """A checked request in chat-completions terms, where its first image block is, and the
    client's name of each tool whose name the upstream gets shortened."""

    request: ChatRequest
    image: str | None
    names: dict[str, str] = {}


def to_chat(body: CountRequest, *, stream: bool = False, plugin: str | None = None) -> Translated:
    """``body`` as a :class:`ChatRequest` (research/dialects.md A.16) for an upstream of provider
    ``plugin`` (:func:`core.reasoning.upstream_plugin`: it decides how ``thinking`` is asked for);
    :class:`Invalid` when it cannot be one (a final assistant turn: chat-completions upstreams have
    no prefill)."""
    messages: list[ChatMessage] = []
    image: str | None = None
    system = body.system
    if isinstance(system, list):
        system = "\n\n".join(part.text for part in system if part.text.strip())
    if system and system.strip():
        messages.append(ChatMessage(role="system", content=system))
    last = len(body.messages) - 1
    for i, turn in enumerate(body.messages):
        if turn.role == "user":
            image = _user_turn(i, turn.content, messages) or image
            continue
        assistant = _assistant_turn(i, turn.content)
        if i == last:
            if assistant.content or assistant.tool_calls:
                raise Invalid(
                    f"messages.{i}: chatgate does not continue a final assistant message (prefill); "
                    "end the conversation with a user message"
                )
            continue  # an empty final assistant turn asks for nothing
        messages.append(assistant)
    names = {upstream_tool_name(t.name): t.name for t in body.tools or () if len(t.name) > MAX_TOOL_NAME}
    return Translated(_request(body, tuple(_merged(messages)), stream, plugin), image, names)


def _user_turn(i: int, content: str | list[AnyBlock], messages: list[ChatMessage]) -> str | None:
    """Append user turn ``i`` to ``messages``: its tool results as tool messages first (right after
    the assistant's calls), then the rest as one user message; return where its first image is."""
    if not content:
        raise Invalid(f"messages.{i}: user messages must have non-empty content")
    if isinstance(content, str):
        messages.append(ChatMessage(role="user", content=content))
        return None
    image: str | None = None
    texts: list[str] = []
    parts: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []  # from tool results: only a user message can carry them
    for j, block in enumerate(content):
        if isinstance(block, TextBlock):
            texts.append(block.text)
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            image = image or f"messages.{i}.content.{j}"
            parts.append(_image_part(block))
        elif isinstance(block, ToolResultBlock):
            found: list[dict[str, Any]] = []
            text = _tool_result_text(block, found)
            if found:
                image = image or f"messages.{i}.content.{j}"
                images += found
            tool_id = upstream_tool_id(block.tool_use_id)
            messages.append(ChatMessage(role="tool", content=text, tool_call_id=tool_id))
        else:
            kind = block.__struct_config__.tag
            raise Invalid(f"messages.{i}.content.{j}: a {kind} block belongs in an assistant message")
    parts += images
    if texts and len(parts) == len(texts):
        messages.append(ChatMessage(role="user", content=_joined(texts)))
    elif parts:
        messages.append(ChatMessage(role="user", content=parts))
    return image


def _assistant_turn(i: int, content: str | list[AnyBlock]) -> ChatMessage:
    """Assistant turn ``i``: ``[thinking, text, tool_use...]`` as one chat message."""
    if isinstance(content, str):
        content = [TextBlock(content)] if content else []
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    for j, block in enumerate(content):
        if isinstance(block, TextBlock):
            if block.text.strip():  # empty text blocks are never sent on (research E #8)
                texts.append(block.text)
        elif isinstance(block, ThinkingBlock):
            thoughts.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            arguments = msgspec.json.encode(block.input).decode()
            call_id = upstream_tool_id(block.id)
            calls.append(ToolCall(id=call_id, name=upstream_tool_name(block.name), arguments=arguments))
        elif not isinstance(block, RedactedThinkingBlock):  # encrypted reasoning no upstream here reads
            kind = block.__struct_config__.tag
            raise Invalid(f"messages.{i}.content.{j}: a {kind} block belongs in a user message")
    return ChatMessage(
        role="assistant",
        content=_joined(texts) if texts else (None if calls else ""),
        reasoning="".join(thoughts) if thoughts else None,
        tool_calls=tuple(calls),
    )


def _merged(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Consecutive user turns as one (Anthropic merges them; chat upstreams want alternation)."""
    out: list[ChatMessage] = []
    for message in messages:
        previous = out[-1] if out else None
        if (
            previous is not None
            and message.role == "user"
            and previous.role == "user"
            and isinstance(message.content, str)
            and isinstance(previous.content, str)
        ):
            out[-1] = ChatMessage(role="user", content=previous.content + "\n\n" + message.content)
        else:
            out.append(message)
    return out


_CHOICES: dict[str, str] = {"auto": "auto", "any": "required", "none": "none"}


def budget_effort(budget: int) -> str:
    """A thinking ``budget_tokens`` as a reasoning effort: ``low`` below 4096, ``medium`` below
    16384, ``high`` from there. Anthropic's least budget is 1024; Claude Code's three ("think"
    4000, "think hard" 10000, "ultrathink" 31999) land on one effort each."""
    if budget < 4096:
        return "low"
    return "medium" if budget < 16384 else "high"


def thinking_fields(thinking: ThinkingConfig | None, plugin: str | None) -> dict[str, Any]:
    """``thinking`` as the fields an upstream of provider ``plugin`` takes.

    DeepSeek gets its own ``thinking`` switch (adaptive thinking is thinking), with the effort
    of an enabled budget (:func:`core.reasoning.reasoning_fields`). Another upstream would
    refuse that field (400): it gets ``reasoning_effort`` for an enabled budget, and nothing
    for ``disabled`` or ``adaptive``, since chat-completions servers share no off switch (most
    refuse ``reasoning_effort: "none"``) and adaptive thinking is what a model does unasked.
    """
    if thinking is None:
        return {}
    if thinking.type == "enabled" and thinking.budget_tokens is not None:
        return reasoning_fields(budget_effort(thinking.budget_tokens), plugin)
    if plugin != "deepseek":
        return {}
    return {"thinking": {"type": "disabled" if thinking.type == "disabled" else "enabled"}}


def _request(
    body: CountRequest, messages: tuple[ChatMessage, ...], stream: bool, plugin: str | None
) -> ChatRequest:
    extra = thinking_fields(body.thinking, plugin)
    tools = None
    if body.tools is not None:
        converted = []
        for i, tool in enumerate(body.tools):
            if tool.type not in (None, "custom"):
                raise Invalid(
                    f"tools.{i}: server tools ({tool.type!r}) cannot run behind chatgate; "
                    "only client tools (name, description, input_schema) are supported"
                )
            function: dict[str, Any] = {"name": upstream_tool_name(tool.name)}
            if tool.description is not None:
                function["description"] = tool.description
            function["parameters"] = tool.input_schema or {"type": "object", "properties": {}}
            converted.append({"type": "function", "function": function})
        tools = tuple(converted)
    tool_choice: str | dict[str, Any] | None = None
    choice = body.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise Invalid("tool_choice.name: Field required")
            tool_choice = {"type": "function", "function": {"name": upstream_tool_name(choice.name)}}
        else:
            tool_choice = _CHOICES[choice.type]
        if tools is None:
            tool_choice = None  # about tools the request has none of: an upstream may refuse it (400)
        elif choice.disable_parallel_tool_use:
            extra["parallel_tool_calls"] = False
    if not isinstance(body, MessagesRequest):
        return ChatRequest(
            model=body.model, messages=messages, tools=tools, tool_choice=tool_choice, extra=extra
        )
    return ChatRequest(
        model=body.model,
        messages=messages,
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.max_tokens,
        stop=tuple(body.stop_sequences) if body.stop_sequences else None,
        tools=tools,
        tool_choice=tool_choice,
        user=body.metadata.user_id if body.metadata is not None else None,
        extra=extra,
        stream=stream,
    )


# --- replies ---

_STOP_REASONS: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "end_turn",  # a tool-call finish with no usable call (research A.8)
    "content_filter": "refusal",
}


def stop_reason(reason: str, tool_used: bool) -> str:
    """Anthropic's ``stop_reason`` for an upstream finish: ``tool_use`` whenever a tool_use block
    was sent, whatever the upstream said (research/dialects.md finding 4, E #4)."""
    return "tool_use" if tool_used else _STOP_REASONS.get(reason, "end_turn")


def message_id() -> str:
    return f"msg_{random.getrandbits(120):030x}"


def usage_body(usage: Usage) -> dict[str, int]:
    """Usage in Anthropic's terms: ``input_tokens`` excludes the cached reads it lists apart."""
    cached = usage.cached_tokens
    return {
        "input_tokens": max(usage.prompt_tokens - cached, 0),
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's JSON arguments as the ``input`` object (kept as ``raw_input`` if not JSON)."""
    if not arguments.strip():
        return {}
    try:
        value = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return {"raw_input": arguments}
    return value if isinstance(value, dict) else {"raw_input": arguments}


def new_call(part: ToolCallDelta, current: ToolCallDelta | None) -> bool:
    """Whether fragment ``part`` starts another call than ``current``, the call last seen at its
    index: it brings an id of its own (some OpenAI-compatible servers give every call index 0)."""
    return current is not None and part.id is not None and current.id not in (None, part.id)


def gather_calls(events: Iterable[ProviderEvent]) -> list[ToolCallDelta]:
    """The whole calls in a reply's ``events``: fragments merged by index, in the order the calls
    began, a fragment with a new id at a used index starting another call (:func:`new_call`)."""
    calls: list[ToolCallDelta] = []
    at: dict[int, int] = {}  # upstream index -> position in calls of the latest call there
    for event in events:
        if not isinstance(event, ToolCallDelta):
            continue
        i = at.get(event.index)
        if i is None or new_call(event, calls[i]):
            at[event.index] = len(calls)
            calls.append(event)
        else:
            calls[i] = merge_tool_call(calls[i], event)
    return calls


def message_body(
    model: str,
    content: str,
    reasoning: str,
    tool_calls: Sequence[ToolCallDelta],
    finish: Finish,
    names: dict[str, str],
) -> dict[str, Any]:
    """A whole ``message``: thinking first, then text, then the tool calls (research A.7), each
    under the name the client gave it (``names``: the shortened ones)."""
    blocks: list[dict[str, Any]] = []
    if reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": signature(reasoning)})
    if content:
        blocks.append({"type": "text", "text": content})
    tools = 0
    for call in tool_calls:
        if not call.name:
            continue  # a fragment that never got its name is no call
        tools += 1
        blocks.append(
            {
                "type": "tool_use",
                "id": tool_use_id(call.id),
                "name": names.get(call.name, call.name),
                "input": tool_input(call.arguments),
            }
        )
    return {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop_reason(finish.reason, tools > 0),
        "stop_sequence": None,
        "usage": usage_body(finish.usage),
    }
