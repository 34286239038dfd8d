"""OpenAI's chat-completions shapes: requests checked into core types, replies rendered back.

Validation follows OpenAI's API: a bad field answers 400 with
``{"error": {"message", "type", "param", "code"}}`` and ``param`` naming it,
so clients (and their users) see which field to fix. Fields chatgate does
not model are kept and passed upstream, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import random
import time
from typing import Any

import msgspec

from core import ChatMessage, ChatRequest, Finish, InvalidBody, ToolCall, ToolCallDelta, Usage, decode_body

ROLES = ("system", "user", "assistant", "tool", "developer")
KNOWN = frozenset(
    {
        "model",
        "messages",
        "stream",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "response_format",
        "tools",
        "tool_choice",
        "user",
    }
)


class Invalid(Exception):
    """A request field is wrong: answer 400 naming ``param``."""

    def __init__(self, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


MAX_CHOICES = 8
"""The most choices (``n``) one request may ask for. Each is a request of its own upstream,
reserved and charged on its own, so ``n`` multiplies the worst case held on the balance and
the upstream load; OpenAI allows 128, and 8 covers what clients use ``n`` for (a few
samples to pick from) without letting one request fan out into a burst."""

MAX_TOP_LOGPROBS = 20
"""OpenAI's bound on ``top_logprobs``."""


class Parsed(msgspec.Struct, frozen=True):
    """A checked request: what goes to the provider, and how the client wants the answer.

    ``n``: how many choices (each its own upstream request); ``logprobs``: whether the
    client asked for them (they ride upstream in ``request.extra``, with ``top_logprobs``).
    """

    request: ChatRequest
    stream: bool
    include_usage: bool
    n: int = 1
    logprobs: bool = False


def parse(raw: bytes) -> Parsed:
    """Check a request body; raise :class:`Invalid` naming the first bad field."""
    try:
        body = decode_body(raw)
    except InvalidBody as exc:
        raise Invalid(
            f"We could not parse the JSON body of your request ({exc}). "
            "The body must be a JSON object; see https://platform.openai.com/docs/api-reference/chat",
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
    messages = _messages(body.get("messages"))
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise wrong_type("stream", "a boolean", stream)
    n = body.get("n")
    if n is None:
        n = 1
    if not _is_int(n):
        raise wrong_type("n", "an integer", n)
    if not 1 <= n <= MAX_CHOICES:
        raise Invalid(
            f"Invalid 'n': {n} is outside the allowed range [1, {MAX_CHOICES}] (chatgate makes each "
            "choice a request of its own upstream, charged on its own).",
            "n",
            "invalid_value",
        )
    logprobs = _logprobs(body)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    presence = _number(body, "presence_penalty", -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", -2.0, 2.0)
    limits = _max_tokens(body)
    max_tokens = min(limits.values()) if limits else None
    stop = _stop(body.get("stop"))
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise wrong_type("seed", "an integer", seed)
    response_format = body.get("response_format")
    if response_format is not None and not (isinstance(response_format, dict) and "type" in response_format):
        raise Invalid(
            'Invalid \'response_format\': expected an object like {"type": "json_object"}.', "response_format"
        )
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise Invalid("Invalid 'tools': expected an array of tool objects.", "tools", "invalid_type")
    tool_choice = body.get("tool_choice")
    if tool_choice is not None and not isinstance(tool_choice, str | dict):
        raise Invalid("Invalid 'tool_choice': expected a string or an object.", "tool_choice", "invalid_type")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise wrong_type("user", "a string", user)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise Invalid("Invalid 'stream_options': expected an object.", "stream_options", "invalid_type")
    include_usage = bool(stream_options and stream_options.get("include_usage"))

    extra = {k: v for k, v in body.items() if k not in KNOWN and v is not None}
    extra.pop("stream_options", None)  # how this client wants its stream is the surface's business
    if "max_completion_tokens" in limits:
        # The client's name for its limit, kept so that the limit goes upstream under it (see
        # ChatRequest.output_limit); both sent: the lesser counts.
        extra["max_completion_tokens"] = max_tokens
    request = ChatRequest(
        model=model,
        messages=messages,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        stop=stop,
        seed=seed,
        presence_penalty=presence,
        frequency_penalty=frequency,
        response_format=response_format,
        tools=tuple(tools) if tools is not None else None,
        tool_choice=tool_choice,
        user=user,
        extra=extra,
        stream=stream,
    )
    return Parsed(request, stream, include_usage, n, logprobs)


def _logprobs(body: dict[str, Any]) -> bool:
    """Whether ``logprobs`` were asked for; ``top_logprobs`` checked (0 to 20, and only with them)."""
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise wrong_type("logprobs", "a boolean", logprobs)
    top = body.get("top_logprobs")
    if top is not None:
        if not _is_int(top):
            raise wrong_type("top_logprobs", "an integer", top)
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise Invalid(
                f"Invalid 'top_logprobs': {top} is outside the allowed range [0, {MAX_TOP_LOGPROBS}].",
                "top_logprobs",
                "invalid_value",
            )
        if logprobs is not True:
            raise Invalid(
                "Invalid 'top_logprobs': it may only be set when 'logprobs' is true.",
                "top_logprobs",
                "invalid_value",
            )
    return logprobs is True


def _messages(value: Any) -> tuple[ChatMessage, ...]:
    if value is None:
        raise missing("messages")
    if not isinstance(value, list):
        raise wrong_type("messages", "an array", value)
    if not value:
        raise Invalid("Invalid 'messages': empty array. Expected an array with minimum length 1.", "messages")
    out = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise wrong_type(where, "an object", item)
        role = item.get("role")
        if role not in ROLES:
            raise Invalid(
                f"Invalid value for '{where}.role': expected one of {', '.join(ROLES)}, got {role!r}.",
                f"{where}.role",
                "invalid_value",
            )
        content = item.get("content")
        calls = item.get("tool_calls")
        if content is None and not (role == "assistant" and calls):
            raise Invalid(
                f"Missing required parameter: '{where}.content'.",
                f"{where}.content",
                "missing_required_parameter",
            )
        if content is not None and not (
            isinstance(content, str)
            or (isinstance(content, list) and all(isinstance(p, dict) for p in content))
        ):
            raise Invalid(
                f"Invalid type for '{where}.content': expected a string or an array of content parts, "
                f"got {_kind(content)}.",
                f"{where}.content",
                "invalid_type",
            )
        if isinstance(content, list):
            _check_parts(content, f"{where}.content")
        out.append(_message(item, role, content, calls, where))
    return tuple(out)


PART_TYPES = ("text", "image_url", "input_audio", "file", "refusal")
"""The content part types of OpenAI's chat messages (refusal: in an assistant's)."""


def _check_parts(parts: list[dict[str, Any]], where: str) -> None:
    for j, part in enumerate(parts):
        kind = part.get("type")
        if kind is None:
            raise Invalid(
                f"Missing required parameter: '{where}[{j}].type'.",
                f"{where}[{j}].type",
                "missing_required_parameter",
            )
        if kind not in PART_TYPES:
            supported = ", ".join(f"'{t}'" for t in PART_TYPES[:-1]) + f" and '{PART_TYPES[-1]}'"
            raise Invalid(
                f"Invalid value: {kind!r}. Supported values are: {supported}.",
                f"{where}[{j}].type",
                "invalid_value",
            )


def first_image(request: ChatRequest) -> str | None:
    """Where the request's first image part is (``messages[i].content[j]``), or None."""
    for i, message in enumerate(request.messages):
        if isinstance(message.content, (list, tuple)):
            for j, part in enumerate(message.content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    return f"messages[{i}].content[{j}]"
    return None


def _message(item: dict[str, Any], role: Any, content: Any, calls: Any, where: str) -> ChatMessage:
    tool_calls: list[ToolCall] = []
    if calls is not None:
        if not isinstance(calls, list):
            raise Invalid(f"Invalid type for '{where}.tool_calls': expected an array.", f"{where}.tool_calls")
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
                raise Invalid(
                    f"Invalid '{where}.tool_calls[{j}]': "
                    "expected {id, type, function: {name, arguments}}.",
                    f"{where}.tool_calls[{j}]",
                )
            tool_calls.append(
                ToolCall(
                    id=str(call.get("id") or ""),
                    name=function["name"],
                    arguments=str(function.get("arguments") or ""),
                    type=str(call.get("type") or "function"),
                )
            )
    name = item.get("name")
    tool_call_id = item.get("tool_call_id")
    reasoning = item.get("reasoning_content")
    known = ("role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content")
    return ChatMessage(
        role="system" if role == "developer" else role,
        content=content,
        name=name if isinstance(name, str) else None,
        reasoning=reasoning if isinstance(reasoning, str) else None,
        tool_calls=tuple(tool_calls),
        tool_call_id=tool_call_id if isinstance(tool_call_id, str) else None,
        extra={k: v for k, v in item.items() if k not in known},
    )


def _number(
    body: dict[str, Any], field: str, low: float, high: float, *, low_open: bool = False
) -> float | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong_type(field, "a number", value)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise Invalid(
            f"Invalid '{field}': {value!r} is outside the allowed range {bound}.", field, "invalid_value"
        )
    return float(value)


def _max_tokens(body: dict[str, Any]) -> dict[str, int]:
    """The output limits sent, by field (``max_completion_tokens``, ``max_tokens``), checked."""
    limits = {}
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if not _is_int(value):
            raise wrong_type(field, "an integer", value)
        if value < 1:
            raise Invalid(
                f"Invalid '{field}': integer below minimum value. "
                f"Expected a value >= 1, but got {value} instead.",
                field,
                "integer_below_min_value",
            )
        limits[field] = int(value)
    return limits


def _stop(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 16:
        return tuple(value)
    raise Invalid("Invalid 'stop': expected a string or an array of up to 16 strings.", "stop")


def wrong_type(param: str, expected: str, value: Any) -> Invalid:
    return Invalid(
        f"Invalid type for '{param}': expected {expected}, got {_kind(value)}.", param, "invalid_type"
    )


def missing(param: str) -> Invalid:
    return Invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}
    if value is None:
        return "null"
    return names.get(type(value), "an object")


# --- replies ---


class Reply:
    """The identity of one reply: the same ``id``, ``created`` and (once the upstream named
    one) ``system_fingerprint`` on every chunk."""

    __slots__ = ("created", "fingerprint", "head", "id", "model")

    def __init__(self, model: str) -> None:
        # Unique, not secret: no system call for random bytes on every request.
        self.id = f"chatcmpl-{random.getrandbits(128):032x}"
        self.created = int(time.time())
        self.model = model
        self.fingerprint: str | None = None
        self.head = self._head()

    def _head(self) -> bytes:
        # Every chunk starts the same way: render it once (again when the fingerprint comes).
        fingerprint = b""
        if self.fingerprint is not None:
            fingerprint = b',"system_fingerprint":' + msgspec.json.encode(self.fingerprint)
        return (
            b'data: {"id":"'
            + self.id.encode()
            + b'","object":"chat.completion.chunk","created":'
            + str(self.created).encode()
            + b',"model":'
            + msgspec.json.encode(self.model)
            + fingerprint
            + b',"choices":['
        )

    def saw(self, fingerprint: str | None) -> None:
        """Note the upstream's ``system_fingerprint`` (the latest one counts; None changes nothing)."""
        if fingerprint is not None and fingerprint != self.fingerprint:
            self.fingerprint = fingerprint
            self.head = self._head()


_encode = msgspec.json.Encoder().encode

NO_LOGPROBS: dict[str, Any] = {"content": [], "refusal": None}
"""A chunk's ``logprobs`` when they were asked for and it has no content tokens (OpenAI's role chunk)."""


def chunk(
    reply: Reply,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    *,
    usage: bool,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> bytes:
    """One ``chat.completion.chunk`` event of choice ``index``; ``usage`` adds ``"usage": null``
    (include_usage was asked); ``logprobs`` is the choice's ``logprobs`` object, or null."""
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    tail = b'],"usage":null}\n\n' if usage else b"]}\n\n"
    return reply.head + _encode(choice) + tail


def logprobs_body(entries: list[dict[str, Any]] | tuple[dict[str, Any], ...] | None) -> dict[str, Any]:
    """A choice's ``logprobs`` object for these content token entries."""
    return {"content": list(entries or ()), "refusal": None}


def usage_chunk(reply: Reply, usage: Usage) -> bytes:
    """The trailing chunk of ``include_usage``: no choices, the whole request's usage."""
    return reply.head + b'],"usage":' + _encode(usage_body(usage)) + b"}\n\n"


def tool_call_delta(part: ToolCallDelta) -> dict[str, Any]:
    call: dict[str, Any] = {"index": part.index}
    if part.id:
        call["id"] = part.id
        call["type"] = "function"
    function: dict[str, Any] = {"arguments": part.arguments}
    if part.name:
        function = {"name": part.name, "arguments": part.arguments}
    call["function"] = function
    return call


def usage_body(usage: Usage) -> dict[str, Any]:
    """Usage in OpenAI's shape, with DeepSeek's extra counters kept for clients that read them."""
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }
    for key in ("prompt_cache_hit_tokens", "prompt_cache_miss_tokens"):
        if isinstance(usage.extra.get(key), int):
            body[key] = usage.extra[key]
    return body


def choice_body(
    index: int,
    content: str,
    reasoning: str,
    tool_calls: list[ToolCallDelta],
    finish: Finish,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One choice of a whole ``chat.completion``."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in tool_calls
        ]
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish.reason}


def choices_body(reply: Reply, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
    """A whole ``chat.completion`` of ``choices``; ``system_fingerprint`` when the upstream named one."""
    body = {
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
        "usage": usage_body(usage),
    }
    if reply.fingerprint is not None:
        body["system_fingerprint"] = reply.fingerprint
    return body


def completion_body(
    reply: Reply,
    content: str,
    reasoning: str,
    tool_calls: list[ToolCallDelta],
    finish: Finish,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A whole ``chat.completion`` of one choice."""
    choice = choice_body(0, content, reasoning, tool_calls, finish, logprobs)
    return choices_body(reply, [choice], finish.usage)


def summed(usages: list[Usage]) -> Usage:
    """The usage of several choices together (each was a request of its own upstream)."""
    return Usage(
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        completion_tokens=sum(u.completion_tokens for u in usages),
        reasoning_tokens=sum(u.reasoning_tokens for u in usages),
        cached_tokens=sum(u.cached_tokens for u in usages),
    )
