"""OpenAI's Responses shapes: a ``POST /v1/responses`` body checked into a chat request, and the
``Response`` object (with its output items and usage) rendered back.

The translation is the one of research/dialects.md B.2-B.5: ``input`` items become chat
messages (a ``function_call`` an assistant tool call, a ``function_call_output`` a tool
message, a ``reasoning`` item the reasoning of the assistant turn that follows it),
``instructions`` a leading system message, flat function tools chat tools,
``text.format`` a ``response_format`` and ``max_output_tokens`` the output limit. A bad
field answers 400 naming it (``input[2].call_id``), as OpenAI does. Fields chatgate does
not model are ignored, not passed upstream: they are Responses fields, which a chat
upstream would not know.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import msgspec

from core import (
    ChatMessage,
    ChatRequest,
    InvalidBody,
    ProviderEvent,
    ToolCall,
    ToolCallDelta,
    Usage,
    decode_body,
    reasoning_fields,
)

from ..wire import Invalid, missing, wrong_type

EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
"""The ``reasoning.effort`` values of OpenAI's SDK (``types/shared/reasoning.py``)."""
MESSAGE_ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})


class Parsed(msgspec.Struct, frozen=True):
    """A checked ``POST /v1/responses``: the chat request to make (its messages are this
    request's own; the stored context and ``instructions`` are added by :func:`chat_request`),
    and what the reply and the store need to know of it."""

    request: ChatRequest
    items: list[dict[str, Any]]
    """``input`` as a list of items (a string input is one user message)."""
    instructions: str | None
    previous_response_id: str | None
    store: bool
    stream: bool
    echo: dict[str, Any]
    """The request's fields a ``Response`` object repeats (tools, text, reasoning ...)."""
    image: str | None
    """Where the first image part is (``input[i].content[j]``), for models without vision."""
    summary: bool
    """``reasoning.summary`` was asked: the reasoning is also the item's summary."""


def load(raw: bytes) -> tuple[dict[str, Any], str]:
    """The body as JSON, and the model it names (to route before the rest is checked);
    :class:`Invalid` when it is not a JSON object naming one."""
    try:
        body = decode_body(raw)
    except InvalidBody as exc:
        raise Invalid(
            f"We could not parse the JSON body of your request ({exc}). The body must be a JSON object; "
            "see https://platform.openai.com/docs/api-reference/responses",
            None,
            "invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise Invalid("The request body must be a JSON object.", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Invalid(
            "you must provide a model parameter (a non-empty string)", "model", "missing_required_parameter"
        )
    return body, model


def parse(raw: bytes, provider: str | None = None) -> Parsed:
    """Check a request body; raise :class:`Invalid` naming the first bad field.

    ``provider`` is the provider plugin the model is served by, when known: DeepSeek
    takes a reasoning effort in its own terms (see :func:`reasoning_fields`).
    """
    body, model = load(raw)
    return parse_body(body, model, provider)


def parse_body(body: dict[str, Any], model: str, provider: str | None) -> Parsed:
    """Check a body :func:`load` read (see :func:`parse`)."""
    for field, why in (
        ("background", "background responses are not supported by chatgate; send background: false"),
        ("conversation", "the Conversations API is not supported by chatgate; use previous_response_id"),
        ("prompt", "stored prompts are not supported by chatgate; send input and instructions"),
    ):
        if body.get(field) not in (None, False):
            raise Invalid(f"Invalid '{field}': {why}.", field, "unsupported_parameter")
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise wrong_type("previous_response_id", "a non-empty string", previous)
    items = _input(body.get("input"), previous is not None)
    messages, image = to_messages(items, "input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise wrong_type("instructions", "a string", instructions)
    stream = _flag(body, "stream", False)
    store = _flag(body, "store", True)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    max_tokens = body.get("max_output_tokens")
    if max_tokens is not None:
        if not _is_int(max_tokens):
            raise wrong_type("max_output_tokens", "an integer", max_tokens)
        if max_tokens < 1:
            raise Invalid(
                "Invalid 'max_output_tokens': integer below minimum value. "
                f"Expected a value >= 1, but got {max_tokens} instead.",
                "max_output_tokens",
                "integer_below_min_value",
            )
    tools = _tools(body.get("tools"))
    tool_choice, tools = _tool_choice(body.get("tool_choice"), tools)
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise wrong_type("text", "an object", text)
    response_format = _format((text or {}).get("format"))
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise wrong_type("reasoning", "an object", reasoning)
    effort = (reasoning or {}).get("effort")
    if effort is not None and effort not in EFFORTS:
        raise Invalid(
            f"Invalid value for 'reasoning.effort': expected one of {', '.join(EFFORTS)}, got {effort!r}.",
            "reasoning.effort",
            "invalid_value",
        )
    summary = (reasoning or {}).get("summary") or (reasoning or {}).get("generate_summary")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(v, str) for v in metadata.values())
        and len(metadata) <= 16
    ):
        raise Invalid("Invalid 'metadata': expected an object of up to 16 string values.", "metadata")
    user = body.get("safety_identifier") or body.get("user")
    if user is not None and not isinstance(user, str):
        raise wrong_type("user", "a string", user)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise wrong_type("parallel_tool_calls", "a boolean", parallel)

    extra: dict[str, Any] = reasoning_fields(effort, provider)
    if parallel is not None and tools:
        extra["parallel_tool_calls"] = parallel
    request = ChatRequest(
        model=model,
        messages=messages,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        response_format=response_format,
        tools=tuple(_chat_tool(t) for t in tools) if tools else None,
        tool_choice=tool_choice if tools else None,
        user=user,
        extra=extra,
        stream=stream,
    )
    echo = {
        "instructions": instructions,
        "max_output_tokens": max_tokens,
        "metadata": metadata or {},
        "parallel_tool_calls": True if parallel is None else parallel,
        "previous_response_id": previous,
        "reasoning": {"effort": effort, "summary": summary},
        "store": store,
        "temperature": 1.0 if temperature is None else temperature,
        "text": {"format": (text or {}).get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": tools,
        "top_p": 1.0 if top_p is None else top_p,
        "truncation": body.get("truncation") or "disabled",
        "user": user,
    }
    return Parsed(
        request=request,
        items=items,
        instructions=instructions,
        previous_response_id=previous,
        store=store,
        stream=stream,
        echo=echo,
        image=image,
        summary=bool(summary),
    )


def chat_request(parsed: Parsed, context: list[ChatMessage]) -> ChatRequest:
    """The request that goes upstream: ``instructions``, the stored ``context``, then the input."""
    if not context and parsed.instructions is None:
        return parsed.request
    head = [ChatMessage(role="system", content=parsed.instructions)] if parsed.instructions else []
    messages = (*head, *context, *parsed.request.messages)
    return msgspec.structs.replace(parsed.request, messages=messages)


# --- input ---


def _input(value: Any, chained: bool) -> list[dict[str, Any]]:
    if value is None:
        if chained:
            return []
        raise missing("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        raise wrong_type("input", "a string or an array of input items", value)
    if not value and not chained:
        raise Invalid("Invalid 'input': empty array. Expected at least one input item.", "input")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise wrong_type(f"input[{i}]", "an object", item)
    return value


class _Turn:
    """An assistant turn being gathered from consecutive items (text, reasoning, tool calls)."""

    __slots__ = ("calls", "content", "reasoning")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[ToolCall] = []

    def message(self) -> ChatMessage | None:
        if not (self.content or self.calls):
            return None  # reasoning alone is no turn: it belongs to a turn that never came
        return ChatMessage(
            role="assistant",
            content="".join(self.content) if self.content else None,
            reasoning="".join(self.reasoning) if self.reasoning else None,
            tool_calls=tuple(self.calls),
        )


def to_messages(items: list[dict[str, Any]], where: str) -> tuple[tuple[ChatMessage, ...], str | None]:
    """Items as chat messages, and where the first image part is; :class:`Invalid` names a bad one.

    Consecutive assistant items (a message, function calls) make one assistant message,
    which takes the reasoning of the ``reasoning`` items before it; the join key of a call
    and its output is ``call_id``.
    """
    out: list[ChatMessage] = []
    turn = _Turn()
    image: str | None = None

    def close() -> None:
        nonlocal turn
        message = turn.message()
        if message is not None:
            out.append(message)
        # Always a fresh turn: reasoning that no turn took is dropped, not carried onto a later one.
        turn = _Turn()

    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        kind = item.get("type", "message")
        if not isinstance(kind, str):
            raise wrong_type(f"{at}.type", "a string", kind)
        if kind == "message":
            role = item.get("role")
            if role not in MESSAGE_ROLES:
                raise Invalid(
                    f"Invalid value for '{at}.role': expected one of {', '.join(MESSAGE_ROLES)}, "
                    f"got {role!r}.",
                    f"{at}.role",
                    "invalid_value",
                )
            content, found = _content(item.get("content"), f"{at}.content")
            image = image or found
            if role == "assistant":
                if turn.content or turn.calls:
                    close()
                if isinstance(content, str):
                    turn.content.append(content)
                continue
            close()
            out.append(
                ChatMessage(role="system" if role in ("system", "developer") else "user", content=content)
            )
        elif kind == "function_call":
            call_id, name = _string(item, "call_id", at), _string(item, "name", at)
            arguments = item.get("arguments", "")
            if not isinstance(arguments, str):
                raise wrong_type(f"{at}.arguments", "a string (JSON text)", arguments)
            turn.calls.append(ToolCall(id=call_id, name=name, arguments=arguments))
        elif kind == "function_call_output":
            close()
            call_id = _string(item, "call_id", at)
            out.append(
                ChatMessage(role="tool", content=_output(item.get("output"), at), tool_call_id=call_id)
            )
        elif kind == "reasoning":
            if turn.content or turn.calls:
                close()
            turn.reasoning.append(_reasoning_text(item))
        else:
            supported = "message, function_call, function_call_output and reasoning"
            raise Invalid(
                f"Invalid value for '{at}.type': {kind!r} items are not supported by chatgate "
                f"(supported: {supported}).",
                f"{at}.type",
                "invalid_value",
            )
    close()
    return tuple(out), image


def _content(value: Any, at: str) -> tuple[str | list[dict[str, Any]], str | None]:
    """A message's content as chat content: text joined, or chat parts when there are images."""
    if isinstance(value, str):
        return value, None
    if not isinstance(value, list):
        raise wrong_type(at, "a string or an array of content parts", value)
    texts: list[str] = []
    parts: list[dict[str, Any]] = []
    image: str | None = None
    for j, part in enumerate(value):
        where = f"{at}[{j}]"
        if not isinstance(part, dict):
            raise wrong_type(where, "an object", part)
        kind = part.get("type")
        if not isinstance(kind, str):  # checked first: a list or an object is no set member
            raise wrong_type(f"{where}.type", "a string", kind)
        if kind in TEXT_PARTS:
            text = part.get("text")
            if not isinstance(text, str):
                raise wrong_type(f"{where}.text", "a string", text)
            texts.append(text)
            parts.append({"type": "text", "text": text})
        elif kind == "refusal":
            refusal = part.get("refusal")
            texts.append(refusal if isinstance(refusal, str) else "")
            parts.append({"type": "text", "text": texts[-1]})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise Invalid(
                    f"Invalid '{where}': chatgate takes images as 'image_url' (a URL or a data: URL); "
                    "file ids are not supported.",
                    f"{where}.image_url",
                )
            image = image or where
            parts.append(
                {"type": "image_url", "image_url": {"url": url, "detail": part.get("detail") or "auto"}}
            )
        else:
            raise Invalid(
                f"Invalid value for '{where}.type': {kind!r} is not supported by chatgate "
                "(supported: input_text, output_text, refusal, input_image).",
                f"{where}.type",
                "invalid_value",
            )
    if image is None:
        return "".join(texts), None
    return parts, image


def _output(value: Any, at: str) -> str:
    """A function call's output as tool message text (a list of parts: its text parts joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p["text"] for p in value if isinstance(p, dict) and isinstance(p.get("text"), str))
    raise wrong_type(f"{at}.output", "a string or an array of content parts", value)


def _reasoning_text(item: dict[str, Any]) -> str:
    """A reasoning item's text: its raw ``content``, or else its ``summary``."""
    for field in ("content", "summary"):
        parts = item.get(field)
        if isinstance(parts, list):
            text = "".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
            if text:
                return text
    return ""


def _string(item: dict[str, Any], field: str, at: str) -> str:
    value = item.get(field)
    if value is None:
        raise missing(f"{at}.{field}")
    if not isinstance(value, str) or not value:
        raise wrong_type(f"{at}.{field}", "a non-empty string", value)
    return value


# --- tools and formats ---


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise wrong_type("tools", "an array", value)
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise wrong_type(f"tools[{i}]", "an object", tool)
        kind = tool.get("type")
        if kind != "function":
            raise Invalid(
                f"Invalid value for 'tools[{i}].type': {kind!r} tools run on OpenAI's servers and are not "
                "supported by chatgate; only 'function' tools are.",
                f"tools[{i}].type",
                "invalid_value",
            )
        _string(tool, "name", f"tools[{i}]")
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise wrong_type(f"tools[{i}].parameters", "an object (a JSON schema)", parameters)
    return value


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool["name"]}
    for field in ("description", "parameters", "strict"):
        if tool.get(field) is not None:
            function[field] = tool[field]
    return {"type": "function", "function": function}


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """``tool_choice`` in chat terms, and the tools that go upstream (``allowed_tools`` narrows them)."""
    if value is None or value in ("none", "auto", "required"):
        return value, tools
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "function" and isinstance(value.get("name"), str):
            return {"type": "function", "function": {"name": value["name"]}}, tools
        if kind == "allowed_tools" and isinstance(value.get("tools"), list):
            return _allowed_tools(value, tools)
    raise Invalid(
        "Invalid 'tool_choice': expected 'none', 'auto', 'required', "
        '{"type": "function", "name": ...} or {"type": "allowed_tools", ...}.',
        "tool_choice",
        "invalid_value",
    )


def _allowed_tools(value: dict[str, Any], tools: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """``{"type": "allowed_tools", "mode": ..., "tools": [...]}``: the tools it names, the mode."""
    names: set[str] = set()
    for i, tool in enumerate(value["tools"]):
        if not isinstance(tool, dict):
            raise wrong_type(f"tool_choice.tools[{i}]", "an object", tool)
        name = tool.get("name")
        if not isinstance(name, str):  # checked before it is a set member (a list is unhashable)
            raise wrong_type(f"tool_choice.tools[{i}].name", "a string", name)
        names.add(name)
    mode = value.get("mode", "auto")
    if mode not in ("auto", "required"):
        raise Invalid(
            f"Invalid value for 'tool_choice.mode': expected 'auto' or 'required', got {mode!r}.",
            "tool_choice.mode",
            "invalid_value",
        )
    return mode, [t for t in tools if t["name"] in names]


def _format(value: Any) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format`` (None for plain text)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise wrong_type("text.format", "an object", value)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        name = value.get("name")
        if not isinstance(name, str) or not name:
            raise missing("text.format.name")
        schema = value.get("schema")
        if not isinstance(schema, dict):
            raise (
                missing("text.format.schema")
                if schema is None
                else wrong_type("text.format.schema", "an object", schema)
            )
        inner: dict[str, Any] = {"name": name, "schema": schema}
        for field in ("strict", "description"):
            if value.get(field) is not None:
                inner[field] = value[field]
        return {"type": "json_schema", "json_schema": inner}
    raise Invalid(
        f"Invalid value for 'text.format.type': expected text, json_object or json_schema, got {kind!r}.",
        "text.format.type",
        "invalid_value",
    )


def _flag(body: dict[str, Any], field: str, default: bool) -> bool:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise wrong_type(field, "a boolean", value)
    return value


def _number(body: dict[str, Any], field: str, low: float, high: float) -> float | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong_type(field, "a number", value)
    if not low <= value <= high:
        raise Invalid(
            f"Invalid '{field}': {value!r} is outside the allowed range [{low:g}, {high:g}].",
            field,
            "invalid_value",
        )
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- the Response object ---


def item_id(prefix: str) -> str:
    """An output item's id: unique, not secret (no system call for random bytes per item)."""
    return f"{prefix}_{random.getrandbits(128):032x}"


def usage_body(usage: Usage) -> dict[str, Any]:
    """Usage in the Responses shape: ``input_tokens`` includes the cached ones (dialects.md B.5)."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def response_body(
    response_id: str,
    created_at: int,
    model: str,
    echo: dict[str, Any],
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: Usage | None = None,
    error: dict[str, Any] | None = None,
    incomplete: str | None = None,
) -> dict[str, Any]:
    """A whole ``Response`` object (``output`` must be a list: the SDK's ``output_text`` iterates it)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "model": model,
        "output": output,
        "max_tool_calls": None,
        "service_tier": "default",
        "top_logprobs": 0,
        **echo,
        "usage": usage_body(usage) if usage is not None else None,
    }


def reasoning_item(rid: str, text: str, summary: bool) -> dict[str, Any]:
    """A reasoning output item: the raw reasoning as ``content`` (and as ``summary`` when asked)."""
    return {
        "id": rid,
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": text}] if summary else [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def message_item(mid: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": mid,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
    }


def call_item(fid: str, call: ToolCallDelta, status: str) -> dict[str, Any]:
    return {
        "id": fid,
        "type": "function_call",
        "status": status,
        "call_id": call.id or fid.replace("fc_", "call_", 1),
        "name": call.name or "",
        "arguments": call.arguments,
    }


def gathered_calls(events: Iterable[ProviderEvent]) -> list[ToolCallDelta]:
    """A whole reply's tool calls from its events, split as a stream renders them
    (``events.ResponseEvents``): fragments of one ``index`` make one call, except that a new
    ``id`` on an index starts a new call (an upstream that numbers every parallel call 0)."""
    calls: list[tuple[ToolCallDelta, list[str]]] = []  # each call's first fields, its argument parts
    latest: dict[int, int] = {}  # index -> position in calls
    for event in events:
        if type(event) is not ToolCallDelta:
            continue
        at = latest.get(event.index)
        if at is not None:
            call, parts = calls[at]
            if not (event.id and call.id and event.id != call.id):
                if not call.name and (event.id or event.name):  # a stream announces it with its name
                    call = ToolCallDelta(event.index, id=call.id or event.id, name=event.name)
                    calls[at] = (call, parts)
                parts.append(event.arguments)
                continue
        latest[event.index] = len(calls)
        calls.append((ToolCallDelta(event.index, id=event.id, name=event.name), [event.arguments]))
    return [msgspec.structs.replace(call, arguments="".join(parts)) for call, parts in calls]


FINISHED = {
    "stop": ("completed", None),
    "tool_calls": ("completed", None),
    "length": ("incomplete", "max_output_tokens"),
    "content_filter": ("incomplete", "content_filter"),
}
"""A chat ``finish_reason`` as the response's ``status`` and ``incomplete_details.reason``; any
other (DeepSeek's ``insufficient_system_resource``) is a failed response."""


def output_items(
    reasoning: str, content: str, calls: list[ToolCallDelta], status: str, summary: bool
) -> list[dict[str, Any]]:
    """The output of a whole reply: its reasoning, its text, then its calls, in that order. A reply
    with no text has no message item unless it has nothing at all (then one empty message), as a
    streamed one (``events.ResponseEvents.finish``): reasoning alone is the reasoning item."""
    items = []
    if reasoning:
        items.append(reasoning_item(item_id("rs"), reasoning, summary))
    if content or not (calls or reasoning):
        items.append(
            message_item(item_id("msg"), content, "incomplete" if status == "incomplete" else "completed")
        )
    items += [call_item(item_id("fc"), call, "completed") for call in calls]
    return items
