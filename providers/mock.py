"""The mock provider: plausible, deterministic replies streamed offline.

It is the default provider of a fresh install, so everything around it
(streaming UIs, billing, rate limits, error pages) can be tried without a
network connection or an API key. Operators can make it slow or make it fail
to rehearse how the rest of the system copes.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
from collections.abc import AsyncGenerator, Sequence
from typing import Any, ClassVar, Literal

import msgspec

from core import (
    PROVIDER_ERRORS,
    BadRequest,
    ChatMessage,
    ChatRequest,
    ContentDelta,
    EmbeddingRequest,
    Embeddings,
    Finish,
    FinishReason,
    Provider,
    ProviderError,
    ProviderEvent,
    RateLimited,
    ReasoningDelta,
    Usage,
    estimate_prompt_tokens,
    estimate_tokens,
    hookimpl,
    is_cjk,
)

FailKind = Literal[
    "bad_request", "authentication", "insufficient_balance", "rate_limited", "unavailable", "timeout"
]

DEFAULT_FAIL_MESSAGES: dict[str, str] = {
    "bad_request": "The request was rejected as invalid (simulated by the mock provider).",
    "authentication": "The API key was rejected (simulated by the mock provider).",
    "insufficient_balance": "The upstream account has insufficient balance (simulated by the mock provider).",
    "rate_limited": "Rate limit reached, please retry later (simulated by the mock provider).",
    "unavailable": "The model is temporarily unavailable (simulated by the mock provider).",
    "timeout": "The model did not answer in time (simulated by the mock provider).",
}

# What a real upstream answers for each failure; a timeout has no answer at all.
UPSTREAM_STATUS: dict[str, int | None] = {
    "bad_request": 400,
    "authentication": 401,
    "insufficient_balance": 402,
    "rate_limited": 429,
    "unavailable": 503,
    "timeout": None,
}


class MockOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Options of the mock provider, as written in its plugins.toml table."""

    models: list[str] = msgspec.field(default_factory=lambda: ["mock-chat", "mock-reasoner"])
    thinking_models: list[str] = msgspec.field(default_factory=lambda: ["mock-reasoner"])
    first_token_delay: float = 0.2
    token_delay: float = 0.02
    fail: FailKind | None = None
    fail_message: str = ""
    fail_after_tokens: int = 0
    retry_after: float | None = None
    embedding_models: list[str] = msgspec.field(default_factory=lambda: ["mock-embedding"])
    embedding_dimensions: int = 256

    def __post_init__(self) -> None:
        for field in ("first_token_delay", "token_delay", "fail_after_tokens", "retry_after"):
            value = getattr(self, field)
            if value is not None and value < 0:
                raise ValueError(f"{field} to be >= 0 (it is {value})")
        if not 1 <= self.embedding_dimensions <= 4096:
            raise ValueError(f"embedding_dimensions to be 1 to 4096 (it is {self.embedding_dimensions})")


class MockProvider(Provider):
    """A provider that answers without a network, deterministically.

    Promises:
        * the same messages and model always produce the same events;
        * the reply is in the language of the last user message (Chinese when
          it is mostly CJK, English otherwise), 2-4 sentences that refer to
          the question; ``thinking_models`` reason first, in the same language;
        * tokens arrive ``first_token_delay`` then ``token_delay`` seconds
          apart, and ``max_tokens`` and ``stop`` are honoured like an upstream;
        * usage counts one token per delta, so billing adds up exactly;
        * ``fail`` raises the configured :class:`~core.errors.ProviderError`,
          before the first token or after ``fail_after_tokens`` content tokens
          (at the end of the reply if it is shorter);
        * with ``logprobs`` true in the request, each content token carries a
          deterministic OpenAI-style logprob entry, with ``top_logprobs``
          alternatives; no ``system_fingerprint`` (it has no backend to name);
        * ``embedding_models`` embed (:meth:`embed`): deterministic unit vectors
          from a hash of the model and the input, ``embedding_dimensions`` long
          or the ``dimensions`` asked (the first ones, renormalised), one usage
          token per estimated input token; ``fail`` fails them too.

    ``tokens_streamed`` and ``active_streams`` count what the instance did, so
    tests can see that a closed or cancelled stream stopped working.
    """

    name = "mock"
    Options: ClassVar[type[MockOptions]] = MockOptions

    def __init__(self, instance: str = "mock", options: MockOptions | None = None) -> None:
        super().__init__(instance, options if options is not None else MockOptions())
        self.options: MockOptions
        self.tokens_streamed = 0
        self.active_streams = 0

    def models(self) -> Sequence[str]:
        return tuple(self.options.models)

    def describe(self) -> dict[str, Any]:
        return {"plugin": self.name, "models": list(self.options.models)}

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        options = self.options
        if request.model not in options.embedding_models:
            served = ", ".join(options.embedding_models) or "none"
            raise BadRequest(
                f"model {request.model!r} is not an embedding model; this provider embeds with: {served}",
                upstream_status=400,
            )
        native = options.embedding_dimensions
        size = request.dimensions if request.dimensions is not None else native
        if not 1 <= size <= native:
            raise BadRequest(
                f"dimensions must be 1 to {native} for model {request.model!r}, got {size}",
                upstream_status=400,
            )
        await _pause(options.first_token_delay)
        if options.fail:
            raise self._failure()
        vectors = tuple(_unit_vector(request.model, item, native, size) for item in request.inputs)
        tokens = sum(len(i) if isinstance(i, tuple) else max(1, estimate_tokens(i)) for i in request.inputs)
        return Embeddings(vectors, Usage(prompt_tokens=tokens))

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        self._validate(request)
        options = self.options
        rng = random.Random(_seed(request))
        question = _last_user_text(request.messages)
        language = _language(question)
        topic = _topic(question, language)
        reasoning: list[str] = []
        if request.model in options.thinking_models:
            reasoning = split_tokens(compose_reasoning(topic, language, rng), rng)
        content = split_tokens(_cut_at_stop(compose_reply(topic, language, rng), request.stop), rng)
        events: list[ProviderEvent] = [ReasoningDelta(t) for t in reasoning]
        if request.extra.get("logprobs") is True:
            top = request.extra.get("top_logprobs")
            chosen = random.Random(_seed(request) + b"logprobs")  # the reply is the same either way
            count = top if isinstance(top, int) and not isinstance(top, bool) else 0
            events += [ContentDelta(t, (_logprob(t, chosen, count),)) for t in content]
        else:
            events += [ContentDelta(t) for t in content]

        self.active_streams += 1
        try:
            await _pause(options.first_token_delay)
            if options.fail and options.fail_after_tokens == 0:
                raise self._failure()
            emitted = reasoning_emitted = content_emitted = 0
            reason: FinishReason = "stop"
            for event in events:
                if request.max_tokens is not None and emitted >= request.max_tokens:
                    reason = "length"
                    break
                if emitted:
                    await _pause(options.token_delay)
                emitted += 1
                self.tokens_streamed += 1
                if isinstance(event, ReasoningDelta):
                    reasoning_emitted += 1
                else:
                    content_emitted += 1
                yield event
                if options.fail and content_emitted == options.fail_after_tokens:
                    raise self._failure()
            if options.fail:
                # The reply ended before the failure point: break the stream rather than finish it.
                raise self._failure()
            usage = Usage(
                prompt_tokens=estimate_prompt_tokens(request.messages),
                completion_tokens=emitted,
                reasoning_tokens=reasoning_emitted,
            )
            yield Finish(reason, usage)
        finally:
            self.active_streams -= 1

    def _validate(self, request: ChatRequest) -> None:
        if request.model in self.options.embedding_models:
            raise BadRequest(
                f"model {request.model!r} is an embedding model: it makes vectors, not chat replies",
                upstream_status=400,
            )
        if request.model not in self.options.models:
            served = ", ".join(self.options.models) or "none"
            raise BadRequest(
                f"model {request.model!r} does not exist; this provider serves: {served}", upstream_status=400
            )
        if not request.messages:
            raise BadRequest("messages must not be empty", upstream_status=400)
        if request.max_tokens is not None and request.max_tokens < 1:
            raise BadRequest(f"max_tokens must be >= 1, got {request.max_tokens}", upstream_status=400)

    def _failure(self) -> ProviderError:
        kind = self.options.fail
        assert kind is not None
        message = self.options.fail_message or DEFAULT_FAIL_MESSAGES[kind]
        if kind == "rate_limited":
            return RateLimited(message, retry_after=self.options.retry_after)
        return PROVIDER_ERRORS[kind](message, upstream_status=UPSTREAM_STATUS[kind])


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [MockProvider]


async def _pause(seconds: float) -> None:
    # A zero delay must not yield to the loop at all, so tests run at full speed.
    if seconds > 0:
        await asyncio.sleep(seconds)


def _seed(request: ChatRequest) -> bytes:
    payload = msgspec.json.encode([request.model, request.messages], order="deterministic")
    return hashlib.sha256(payload).digest()


_ALTERNATIVES = (" the", " a", " it", " and", " to", " of", " in", " is", ",", ".")


def _logprob(token: str, rng: random.Random, top: int) -> dict[str, Any]:
    """An OpenAI-style logprob entry for ``token``, with ``top`` alternatives (the token first)."""
    logprob = -round(rng.random() * 1.5, 6)
    alternatives = [token, *(a for a in _ALTERNATIVES if a != token)][: max(0, top)]
    ranked = [
        {"token": alt, "logprob": round(logprob - 2.0 * rank, 6), "bytes": list(alt.encode())}
        for rank, alt in enumerate(alternatives)
    ]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": ranked}


def _unit_vector(model: str, item: str | tuple[int, ...], native: int, size: int) -> tuple[float, ...]:
    """A deterministic vector of length 1 for ``item``: the first ``size`` of ``native`` values."""
    seed = hashlib.sha256(msgspec.json.encode([model, item])).digest()
    rng = random.Random(seed)
    values = [rng.gauss(0.0, 1.0) for _ in range(native)][:size]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return tuple(v / norm for v in values)


def _text_of(message: ChatMessage) -> str:
    if isinstance(message.content, list):
        return " ".join(str(part.get("text", "")) for part in message.content)
    return message.content or ""


def _last_user_text(messages: Sequence[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return _text_of(message)
    return ""


def _language(text: str) -> Literal["zh", "en"]:
    # Compare CJK characters with Latin *words*: a Chinese question naming
    # "Python" or "GIL" is still Chinese, an English one quoting 你好 is not.
    cjk = sum(1 for c in text if is_cjk(c) and c.isalpha())
    words = len(re.findall(r"[A-Za-z]+", text))
    return "zh" if cjk > words else "en"


_GREETINGS = {
    "hi",
    "hello",
    "hey",
    "hi there",
    "hello there",
    "good morning",
    "good evening",
    "你好",
    "您好",
    "嗨",
    "哈喽",
    "早上好",
    "晚上好",
}


def _topic(text: str, language: str) -> str:
    """A short quotable piece of the question, or "" for a greeting or an empty message."""
    normalized = re.sub(r"[^\w\s]", "", text).strip().lower()
    if not normalized or normalized in _GREETINGS:
        return ""
    first = re.split(r"[.?!;。？！；\n]", text.strip(), maxsplit=1)[0].strip() or text.strip()
    if language == "zh":
        short = first[:16]
        return short + ("…" if len(first) > 16 else "")
    words = first.split()
    short = " ".join(words[:8]).rstrip(",;:")
    return short + ("…" if len(words) > 8 else "")


_EN_GREETING = [
    ["Hello! How can I help you today?", "Hi there! What would you like to talk about?"],
    [
        "I can answer questions, explain ideas or help you draft some text.",
        "Ask me anything, from quick facts to longer explanations.",
    ],
]
_ZH_GREETING = [
    ["你好！有什么可以帮你的吗？", "嗨！今天想聊点什么？"],
    ["我可以回答问题、解释概念，或者帮你起草文字。", "无论是简单的问题还是需要详细解释的话题，都可以问我。"],
]
_EN_OPENERS = [
    'Good question about "{topic}".',
    'You asked about "{topic}", so here is a short answer.',
    'Let me take "{topic}" step by step.',
    'When it comes to "{topic}", a few points stand out.',
    'There are a couple of ways to look at "{topic}".',
]
_EN_BODIES = [
    "The short version is that it depends on what you want to optimise: simplicity, speed or flexibility.",
    "A good first step is to write down the constraints you actually have, because they usually decide it.",
    "Most people find that starting small and iterating works better than planning everything up front.",
    "It helps to compare two or three concrete options side by side before committing to one.",
    "There is rarely a single right answer here, but there are a few common pitfalls worth avoiding.",
    "In practice, the simplest approach that meets your needs is usually the one that lasts.",
    "Looking at a real example often makes the trade-offs much clearer than the theory does.",
]
_EN_CLOSERS = [
    "Let me know if you would like a more detailed example.",
    "I hope that helps; feel free to ask a follow-up question.",
    "If you share a bit more context, I can give a more specific recommendation.",
]
_ZH_OPENERS = [
    "关于“{topic}”，这是个好问题。",
    "你问到了“{topic}”，我简单说一下。",
    "我们一步一步来看“{topic}”。",
    "说到“{topic}”，有几点值得注意。",
    "看待“{topic}”可以有几种不同的角度。",
]
_ZH_BODIES = [
    "简单来说，这取决于你更看重哪一方面：简单、速度还是灵活性。",
    "第一步最好先把实际的限制条件写下来，它们往往决定了答案。",
    "很多人发现，先从小处着手、再逐步改进，比一开始就规划好一切更有效。",
    "在做决定之前，不妨把两三个具体方案放在一起比较。",
    "这里很少有唯一正确的答案，但有一些常见的坑值得避开。",
    "实践中，能满足需求的最简单方案往往最经得起时间考验。",
    "看一个真实的例子，通常比讲理论更容易看清其中的取舍。",
]
_ZH_CLOSERS = [
    "如果需要，我可以再举一个更详细的例子。",
    "希望对你有帮助，欢迎继续提问。",
    "如果你能多提供一些背景，我可以给出更具体的建议。",
]
_EN_REASONING = [
    'The user is asking about "{topic}".',
    "I should work out what they actually need before answering.",
    "A short, practical answer with one or two concrete suggestions seems best.",
    "It is worth mentioning the trade-offs instead of claiming there is one right way.",
    "I can offer to go into more detail at the end.",
]
_ZH_REASONING = [
    "用户在问“{topic}”。",
    "我需要先弄清楚对方真正想要的是什么。",
    "给出一个简短实用、带一两条具体建议的回答比较合适。",
    "应该提到其中的取舍，而不是说只有一种正确做法。",
    "最后可以主动提出进一步展开细节。",
]


def compose_reply(topic: str, language: str, rng: random.Random) -> str:
    """A 2-4 sentence reply that refers to ``topic`` ("" means the user only greeted)."""
    zh = language == "zh"
    if not topic:
        return ("" if zh else " ").join(
            rng.choice(options) for options in (_ZH_GREETING if zh else _EN_GREETING)
        )
    openers, bodies, closers = (
        (_ZH_OPENERS, _ZH_BODIES, _ZH_CLOSERS) if zh else (_EN_OPENERS, _EN_BODIES, _EN_CLOSERS)
    )
    count = rng.randint(2, 4)
    sentences = [rng.choice(openers).format(topic=topic)]
    sentences += rng.sample(bodies, count - 1 if count < 3 else count - 2)
    if count >= 3:
        sentences.append(rng.choice(closers))
    return ("" if zh else " ").join(sentences)


def compose_reasoning(topic: str, language: str, rng: random.Random) -> str:
    """A short chain of thought that plans the reply."""
    zh = language == "zh"
    bank = _ZH_REASONING if zh else _EN_REASONING
    subject = topic or ("对方的问候" if zh else "a greeting")
    later = sorted(rng.sample(range(1, len(bank)), rng.randint(2, 3)))
    return ("" if zh else " ").join([bank[0].format(topic=subject)] + [bank[i] for i in later])


def _cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    cuts = [text.find(s) for s in stop or () if s and s in text]
    return text[: min(cuts)] if cuts else text


# A token is a Latin word or any other single character, with the whitespace before it attached.
_PIECE = re.compile(r"\s*(?:[0-9A-Za-z'’]+|\S)|\s+")


def split_tokens(text: str, rng: random.Random) -> list[str]:
    """Split ``text`` into word-ish tokens that concatenate back to it; CJK goes 1-2 characters a token."""
    tokens: list[str] = []
    for piece in _PIECE.findall(text):
        last = tokens[-1] if tokens else ""
        if len(piece) == 1 == len(last) and is_cjk(piece) and is_cjk(last) and rng.random() < 0.5:
            tokens[-1] = last + piece
        else:
            tokens.append(piece)
    return tokens
