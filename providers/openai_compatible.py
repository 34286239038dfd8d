"""Any server that speaks OpenAI's chat-completions protocol: OpenAI, vLLM, Ollama, llama.cpp, LiteLLM, ...

Registered as ``openai_compatible``; :mod:`providers.deepseek` subclasses it
with DeepSeek's URL and key variable. Each configured instance owns one
pooled ``aiohttp.ClientSession``; every reply is streamed from upstream,
parsed incrementally and turned into provider events. Failures before the
first delta are retried with backoff; after it, they are reported and the
partial reply stands.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, ClassVar

import aiohttp
import msgspec

from core import (
    AuthenticationFailed,
    BadRequest,
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
    Redactor,
    Timeout,
    ToolCallDelta,
    Unavailable,
    UpstreamBalanceExhausted,
    Usage,
    estimate_prompt_tokens,
    estimate_tokens,
    hookimpl,
    url_credentials,
    without_credentials,
)

from .deadline import DeadlineExceeded, ReadDeadline
from .openai_wire import (
    FINISH_REASONS,
    Chunk,
    FunctionPart,
    decode_chunk,
    decode_embeddings,
    encode,
    error_message,
    retry_after,
    snippet,
    usage_from,
    vector_of,
    wire_messages,
)
from .sse import SSEDecoder

log = logging.getLogger("chatgate.providers.openai_compatible")

_JSON = {"Content-Type": "application/json"}


class Alias(msgspec.Struct, forbid_unknown_fields=True):
    """A model name clients use, mapped to an upstream model id plus fields merged into the body.

    ``extra_body`` wins over what a client sent for the same keys: the alias
    is the operator's definition of the model (thinking on or off, say).
    """

    model: str
    extra_body: dict[str, Any] = {}


class OpenAICompatibleOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Options of an ``openai_compatible`` instance, as written in its plugins.toml table.

    Timeouts are seconds: ``connect_timeout`` to open a connection,
    ``first_token_timeout`` from sending the request to the first delta
    (keep-alive comments do not count: they only say the request is
    queued), ``idle_timeout`` between two chunks once the reply flows, and
    ``total_timeout`` for one upstream request from start to end.
    """

    base_url: str
    api_key: str = ""
    models: list[str] = []
    aliases: dict[str, Alias] = {}
    headers: dict[str, str] = {}
    connect_timeout: float = 10.0
    first_token_timeout: float = 120.0
    idle_timeout: float = 60.0
    total_timeout: float = 900.0
    max_retries: int = 2
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0
    max_connections: int = 0
    """Upstream connections at once (streams included); 0: no cap. A cap queues every stream
    past it while the server has room (100, aiohttp's default, held 256 paced streams to 42%
    of a bare proxy's rate): what bounds them is the server's own ``max_connections`` and the
    keys' ``concurrent_requests``. Set one for an upstream that refuses more."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            shown = without_credentials(self.base_url)
            raise ValueError(f"base_url to start with http:// or https:// (it is {shown!r})")
        for field in ("connect_timeout", "first_token_timeout", "idle_timeout", "total_timeout"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} to be > 0")
        for field in ("max_retries", "backoff", "max_backoff", "max_retry_after"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} to be >= 0")
        if self.max_connections < 0:
            raise ValueError("max_connections to be >= 0 (0: no cap)")
        # A key read from a CRLF .env file ends in "\r": strip it rather than fail on every request.
        self.api_key = self.api_key.strip()
        if not self.api_key.isprintable():
            raise ValueError("api_key to hold no control characters")
        if self.api_key and url_credentials(self.base_url):
            # Both would be the Authorization header (aiohttp refuses every request so).
            raise ValueError("base_url to carry no user:password@ when api_key is set")
        for header, value in self.headers.items():
            if header.lower() == "authorization":
                raise ValueError("headers not to set Authorization (put the key in api_key)")
            if not (header + value).isprintable():
                raise ValueError(f"header {header!r} to hold no control characters")


# Fields the provider owns: a client's copy of them is never sent.
RESERVED_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "n"})


class OpenAICompatibleProvider(Provider):
    """A model server that speaks OpenAI's ``POST /chat/completions``.

    Promises, beyond :class:`core.Provider`'s:
        * one pooled HTTP client per instance, opened and closed with the app;
        * requests are streamed (``stream_options.include_usage`` on) unless
          the consumer wants only the whole reply (``ChatRequest.stream``
          False: one answer, bounded by ``total_timeout``, as the upstream
          would not send a first token early); a server that answers a
          stream request with one JSON body is understood too;
        * ``reasoning_content`` (or ``reasoning``) deltas become reasoning
          events, ``tool_calls`` deltas pass through, usage is taken from
          whichever chunk carries it, with DeepSeek's cache counters kept in
          ``Usage.extra``; a reply without usage gets an estimate marked
          ``extra["estimated"]``;
        * an empty body, a stream cut before ``[DONE]`` or an undecodable
          event raise :class:`~core.errors.Unavailable`, never hang;
        * 429, 5xx, connection failures and timeouts are retried with
          exponential backoff and jitter (``Retry-After`` honoured) while
          no delta has been produced, never after;
        * neither the API key (whole, or a piece of it an upstream echoes back) nor
          credentials in ``base_url`` (``https://user:pass@host``, which are sent as
          HTTP basic authentication) appear in an error, a log line or ``describe()``.
    """

    name = "openai_compatible"
    Options: ClassVar[type[OpenAICompatibleOptions]] = OpenAICompatibleOptions
    needs_key: ClassVar[bool] = False
    """Whether the upstream refuses every request without a key (local servers usually need none)."""
    key_variable: ClassVar[str | None] = None
    """The environment variable an operator keeps the key in, named when a needed key is missing."""
    output_limit_names: ClassVar[tuple[str, ...]] = ("max_tokens", "max_completion_tokens")
    """The names the server takes its output limit by; the cap is sent under the one the client
    used, when the server takes it, else under the first."""
    sends_reasoning: ClassVar[bool] = False
    """Whether earlier turns' reasoning goes back as ``reasoning_content`` (DeepSeek's thinking
    mode requires it after tool calls; other servers may reject the field)."""

    def __init__(self, instance: str, options: OpenAICompatibleOptions) -> None:
        super().__init__(instance, options)
        self.options: OpenAICompatibleOptions
        self._client: aiohttp.ClientSession | None = None
        self._url = options.base_url.rstrip("/") + "/chat/completions"
        self._random = random.Random()
        self._base_url = without_credentials(options.base_url)  # what messages and describe() show
        credentials = url_credentials(options.base_url)
        # The password, not the user name: a name like "user" would hide that word in every message.
        self._redactor = Redactor([options.api_key, credentials[1] if credentials else ""])

    async def open(self) -> None:
        if self._client is not None:
            return
        options = self.options
        headers = {
            "Accept": "text/event-stream, application/json",
            # A compressed stream could not be parsed as it arrives; ask for none.
            "Accept-Encoding": "identity",
            "User-Agent": "chatgate",
            **options.headers,
        }
        if options.api_key:
            headers["Authorization"] = f"Bearer {options.api_key}"
        # aiohttp, not httpx: under concurrency httpx's connection pool cost more CPU
        # per request than the rest of the gateway together (bench/README.md).
        self._client = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=options.max_connections, limit_per_host=0),
            # Reads, the pool wait and the request itself are bounded by first_token/idle/
            # total deadlines of our own (see stream); a socket read timeout cannot tell a
            # queued request from a stalled one.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=options.connect_timeout),
            cookie_jar=aiohttp.DummyCookieJar(),  # replies must not leak state into each other
        )

        if self.needs_key and not options.api_key:
            variable = self.key_variable or "api_key"
            log.warning("%s has no api_key: its requests fail until %s is set", self._who(), variable)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def models(self) -> Sequence[str]:
        return (*self.options.aliases, *(m for m in self.options.models if m not in self.options.aliases))

    def describe(self) -> dict[str, Any]:
        return {
            "plugin": self.name,
            "base_url": self._base_url,
            "models": list(self.models()),
            "api_key": "set" if self.options.api_key else "not set",
        }

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        # One generator, not a stack of them: every layer would cost a resumption per delta.
        body = encode(self.request_body(request))
        options = self.options
        attempt = 0
        while True:
            produced = False
            try:
                response, started, text = await self._open(body, request.stream)
                try:
                    if text is not None:
                        for event in self._whole_reply(text, request):
                            produced = True
                            yield event
                        return
                    reply = _Reply(self, request)
                    # Decompressed, should a server compress despite Accept-Encoding: identity.
                    chunks = response.content.iter_any()
                    end = started + options.total_timeout
                    first = min(started + options.first_token_timeout, end)
                    deadline = ReadDeadline(first)
                    try:
                        while True:
                            try:
                                raw = await deadline.read(chunks)
                            except DeadlineExceeded:
                                what = "the reply stalled" if produced else "no first token"
                                raise self._timeout(what, started) from None
                            except aiohttp.ClientError as exc:
                                raise self._transport_error(exc, produced=produced) from None
                            events = reply.feed(raw)
                            if events:
                                produced = True
                                for event in events:
                                    yield event
                            if reply.error is not None:
                                raise reply.error
                            if reply.done:
                                await self._drain(chunks, response)
                                yield reply.finish()
                                return
                            if raw is None:
                                raise reply.cut()
                            if events:  # keep-alive comments and partial lines are no progress
                                deadline.extend(options.idle_timeout, end)
                    finally:
                        deadline.close()
                finally:
                    # Closing a response not yet released closes its connection: the upstream
                    # sees the client go at once and stops generating (and billing) the reply.
                    response.close()
            except ProviderError as exc:
                if produced or not exc.retryable or attempt >= options.max_retries:
                    raise
                delay = self._retry_delay(attempt, exc)
                if delay is None:
                    raise
                attempt += 1
                log.warning(
                    "%s: %s; retry %d of %d in %.2f s",
                    self.instance,
                    exc,
                    attempt,
                    options.max_retries,
                    delay,
                )
                await asyncio.sleep(delay)
            except Exception as exc:  # the contract: typed errors only, whatever broke
                log.exception("%s: unexpected error while streaming a reply", self._who())
                raise ProviderError(
                    f"{self._who()} failed unexpectedly ({type(exc).__name__}); the server log has details"
                ) from None

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body sent upstream for ``request`` (aliases applied, reasoning rule followed)."""
        alias = self.options.aliases.get(request.model)
        body: dict[str, Any] = {
            "model": alias.model if alias else request.model,
            "messages": wire_messages(request.messages, reasoning=self.sends_reasoning),
            "stream": request.stream,
        }
        if request.stream:
            client_options = request.extra.get("stream_options")
            stream_options = dict(client_options) if isinstance(client_options, dict) else {}
            stream_options["include_usage"] = True
            body["stream_options"] = stream_options
        limit = request.output_limit
        if limit is not None:
            # Under the name the client used: OpenAI's reasoning models refuse max_tokens, and
            # a client that sent max_completion_tokens gets it alone, carrying the cap.
            names = self.output_limit_names
            used = "max_completion_tokens" in request.extra and "max_completion_tokens" in names
            body["max_completion_tokens" if used else names[0]] = limit
        for field in (
            "temperature",
            "top_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "response_format",
            "tool_choice",
            "user",
        ):
            value = getattr(request, field)
            if value is not None:
                body[field] = value
        if request.stop is not None:
            body["stop"] = list(request.stop)
        if request.tools is not None:
            body["tools"] = list(request.tools)
        for key, value in request.extra.items():
            if key not in RESERVED_FIELDS and key not in body and key != "max_completion_tokens":
                body[key] = value  # the output limit went above, under a name this server takes
        if alias:
            body.update(alias.extra_body)
        if limit is not None:
            # What was reserved covers this many output tokens: nothing sent may ask for more.
            for field in ("max_tokens", "max_completion_tokens"):
                asked = body.get(field)
                if isinstance(asked, int) and asked > limit:
                    body[field] = limit
        return body

    # --- embeddings ---

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """``POST {base_url}/embeddings``, asking for floats; retried as a reply is (429, 5xx,
        connection failures), within ``total_timeout`` an attempt."""
        alias = self.options.aliases.get(request.model)
        body: dict[str, Any] = {
            "model": alias.model if alias else request.model,
            "input": [list(item) if isinstance(item, tuple) else item for item in request.inputs],
            "encoding_format": "float",
        }
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        if request.user is not None:
            body["user"] = request.user
        for key, value in request.extra.items():
            body.setdefault(key, value)
        payload = encode(body)
        attempt = 0
        while True:
            try:
                return self._embeddings(await self._post_embeddings(payload), len(request.inputs))
            except ProviderError as exc:
                delay = self._retry_delay(attempt, exc) if exc.retryable else None
                if delay is None or attempt >= self.options.max_retries:
                    raise
                attempt += 1
                log.warning(
                    "%s: %s; retry %d of %d in %.2f s",
                    self.instance,
                    exc,
                    attempt,
                    self.options.max_retries,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _post_embeddings(self, payload: bytes) -> bytes:
        if self._client is None:
            raise Unavailable(f"provider {self.instance!r} is not open (the app has not started)")
        if self.needs_key and not self.options.api_key:
            raise AuthenticationFailed(f"{self._who()} has no api_key: {self._key_hint()}")
        started = asyncio.get_running_loop().time()
        url = self.options.base_url.rstrip("/") + "/embeddings"
        try:
            async with asyncio.timeout(self.options.total_timeout):
                async with self._client.post(
                    url, data=payload, headers=_JSON, allow_redirects=False
                ) as response:
                    raw = await response.read()
                    if response.status != 200:
                        raise self._status_error(response, raw.decode("utf-8", errors="replace"))
                    return raw
        except aiohttp.ClientError as exc:
            raise self._transport_error(exc, produced=False) from None
        except TimeoutError:
            raise self._timeout("no embeddings", started) from None

    def _embeddings(self, raw: bytes, count: int) -> Embeddings:
        what = "answered HTTP 200 with a body that is not an embeddings list"
        try:
            answer = decode_embeddings(raw)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise Unavailable(
                f"{self._who()} {what} ({exc}): {self._redact(snippet(raw))}", upstream_status=200
            ) from None
        if answer.error is not None:
            raise self._error_event(answer.error)
        items = sorted(answer.data or (), key=lambda item: item.index)
        if len(items) != count:
            raise Unavailable(
                f"{self._who()} answered {len(items)} vectors for {count} inputs", upstream_status=200
            )
        try:
            vectors = tuple(vector_of(item.embedding) for item in items)
        except ValueError as exc:
            raise Unavailable(f"{self._who()} {what} ({exc})", upstream_status=200) from None
        usage = answer.usage or {}
        prompt = usage.get("prompt_tokens")
        tokens = prompt if isinstance(prompt, int) and not isinstance(prompt, bool) and prompt >= 0 else 0
        return Embeddings(vectors, Usage(prompt_tokens=tokens))

    # --- one upstream request ---

    async def _open(self, body: bytes, streamed: bool) -> tuple[aiohttp.ClientResponse, float, str | None]:
        """Send the request; return the 200 response, when it was sent, and its body if it is
        not a stream (read within the same deadline: one timer per request, not two)."""
        if self._client is None:
            raise Unavailable(f"provider {self.instance!r} is not open (the app has not started)")
        options = self.options
        if self.needs_key and not options.api_key:
            raise AuthenticationFailed(f"{self._who()} has no api_key: {self._key_hint()}")
        started = asyncio.get_running_loop().time()
        response = None
        text = None
        try:
            async with asyncio.timeout_at(started + self._first_answer(streamed)):
                response = await self._client.post(self._url, data=body, headers=_JSON, allow_redirects=False)
                if response.status != 200 or not _is_stream(response):
                    text = (await response.read()).decode("utf-8", errors="replace")
        except aiohttp.ClientError as exc:  # before TimeoutError: aiohttp's timeouts are both
            if response is not None:
                response.close()
            raise self._transport_error(exc, produced=False) from None
        except TimeoutError:
            if response is None:
                raise self._timeout("no response", started) from None
            response.close()
            raise self._timeout("no complete answer", started) from None
        if response.status != 200:
            response.close()
            raise self._status_error(response, text or "")
        return response, started, text

    def _whole_reply(self, text: str, request: ChatRequest) -> list[ProviderEvent]:
        """The events of a non-streamed answer (DeepSeek may precede it with blank lines)."""
        text = text.strip()
        if not text:
            raise Unavailable(f"{self._who()} answered HTTP 200 with an empty body", upstream_status=200)
        chunk = self._decode(text.encode(), "answered HTTP 200 with a body that is not a chat completion")
        if not chunk.choices or chunk.choices[0].message is None:
            raise Unavailable(
                f"{self._who()} answered HTTP 200 without a message: " + self._redact(snippet(text.encode())),
                upstream_status=200,
            )
        choice = chunk.choices[0]
        message = choice.message
        assert message is not None
        events: list[ProviderEvent] = []
        fingerprint = chunk.fingerprint()
        thought = message.reasoning_content or message.reasoning
        if thought:
            events.append(ReasoningDelta(thought, fingerprint))
        if message.content:
            events.append(ContentDelta(message.content, choice.entries(), fingerprint))
        for position, call in enumerate(message.tool_calls or ()):
            function = call.function or FunctionPart()
            events.append(
                ToolCallDelta(position, call.id, function.name, function.arguments or "", fingerprint)
            )
        reason = FINISH_REASONS.get(choice.finish_reason or "stop", "stop")
        usage = self._usage(chunk.usage, request, [thought or "", message.content or ""])
        events.append(Finish(reason, usage, fingerprint))
        return events

    def _first_answer(self, streamed: bool) -> float:
        """Seconds allowed from sending a request to having something of the reply."""
        options = self.options
        return min(options.first_token_timeout, options.total_timeout) if streamed else options.total_timeout

    @staticmethod
    async def _drain(chunks: AsyncIterator[bytes], response: aiohttp.ClientResponse) -> None:
        """Read what follows ``[DONE]`` (the body's end) so the connection goes back to the pool."""
        try:
            # The end of the body follows [DONE] at once from a sane server; a reply
            # is never held back waiting for one that is not.
            async with asyncio.timeout(0.05):
                async for _ in chunks:
                    pass
        except (TimeoutError, aiohttp.ClientError):
            return  # the reply is complete; the connection is simply not reused
        response.release()

    # --- turning upstream data into core types ---

    @staticmethod
    def _usage(raw: dict[str, Any] | None, request: ChatRequest, produced: list[str]) -> Usage:
        usage = usage_from(raw) if raw else None
        if usage is not None:
            return usage
        # A server that reports no usage (or no counts in it) must not make replies free.
        return Usage(
            prompt_tokens=estimate_prompt_tokens(request.messages),
            completion_tokens=max(1, estimate_tokens("".join(produced))),
            extra={"estimated": True},
        )

    def _status_error(self, response: aiohttp.ClientResponse, text: str) -> ProviderError:
        status = response.status
        message = error_message(text) or response.reason or f"HTTP {status}"
        return self._error_for(status, message, retry_after(response.headers))

    def _error_for(self, status: int, message: str, wait: float | None = None) -> ProviderError:
        """The typed error of an upstream's ``status`` answer saying ``message``."""
        said = f"{self._who()} answered {status}: {self._redact(message)}"
        if status in (400, 413, 422):
            return BadRequest(said, upstream_status=status)
        if status in (401, 403):
            return AuthenticationFailed(
                f"{said} (check api_key of provider {self.instance!r})", upstream_status=status
            )
        if status == 402:
            return UpstreamBalanceExhausted(f"{said} (top up the upstream account)", upstream_status=status)
        if status == 429:
            return RateLimited(said, retry_after=wait, upstream_status=status)
        if status in (408, 504):
            return Timeout(said, upstream_status=status)
        if status >= 500:
            return Unavailable(said, upstream_status=status, retry_after=wait)
        if status == 404:
            return ProviderError(
                f"{said} (is base_url {self._base_url!r} right? it should be the URL "
                "that /chat/completions is appended to)",
                upstream_status=status,
            )
        return ProviderError(said, upstream_status=status)

    def _decode(self, payload: bytes, what: str) -> Chunk:
        """A chunk (or whole answer) of the upstream; an error it carries, or garbage, raises."""
        try:
            chunk = decode_chunk(payload)
        except (msgspec.DecodeError, RecursionError) as exc:  # msgspec gives up on deep nesting
            raise Unavailable(
                f"{self._who()} {what} ({exc}): {self._redact(snippet(payload))}", upstream_status=200
            ) from None
        if chunk.error is not None:
            raise self._error_event(chunk.error)
        return chunk

    def _error_event(self, error: Any) -> ProviderError:
        """An error the upstream sent inside a 200 answer (vLLM and LiteLLM do, mid-stream).

        Its ``code`` is the HTTP status it stands for when it is one (vLLM sends
        an int, LiteLLM a string); an ``invalid_request_error`` is the request's
        fault; anything else is the upstream failing.
        """
        if not isinstance(error, dict):
            return Unavailable(
                f"{self._who()} reported an error: {self._redact(str(error))}", upstream_status=200
            )
        message = str(error.get("message") or error)
        code = error.get("code")
        status = int(code) if isinstance(code, int | str) and str(code).isdigit() else 0
        if not 400 <= status <= 599:
            status = 400 if error.get("type") == "invalid_request_error" else 503
        return self._error_for(status, message)

    def _transport_error(self, exc: aiohttp.ClientError, *, produced: bool) -> ProviderError:
        if isinstance(exc, TimeoutError):
            return Timeout(f"{self._who()} timed out ({type(exc).__name__})")
        if produced:
            what = "the connection broke in the middle of the reply"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            what = f"cannot connect to {self._base_url}"
        else:
            what = "the connection failed"
        return Unavailable(f"{self._who()}: {what} ({type(exc).__name__}: {self._redact(str(exc))})")

    def _timeout(self, what: str, started: float) -> Timeout:
        waited = asyncio.get_running_loop().time() - started
        return Timeout(f"{self._who()}: {what} after {waited:.1f} s (see the *_timeout options)")

    def _retry_delay(self, attempt: int, exc: ProviderError) -> float | None:
        """Seconds to wait before retry ``attempt + 1``, or None when waiting is pointless."""
        options = self.options
        asked = exc.retry_after
        if asked is not None:
            # An upstream asking for a long pause is better answered by the caller's
            # own retry (the error carries retry_after) than by holding the request.
            return asked if asked <= options.max_retry_after else None
        delay = min(options.max_backoff, options.backoff * 2.0**attempt)
        return delay * (0.5 + self._random.random() / 2)

    def _key_hint(self) -> str:
        """How an operator supplies the missing key."""
        variable = self.key_variable
        if variable is None:
            return f"set api_key in [providers.{self.instance}] of plugins.toml"
        return f'export {variable} (plugins.toml reads it with api_key = "${{{variable}}}")'

    def _who(self) -> str:
        return f"{self.name} provider {self.instance!r}"

    def _redact(self, text: str) -> str:
        """``text`` from upstream (or about it) without the key or the base URL's credentials."""
        text = text.replace(self.options.base_url, self._base_url)
        return self._redactor(text)


def _is_stream(response: aiohttp.ClientResponse) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


class _Reply:
    """The state of one streamed reply: turns raw chunks into events, and knows how it ended."""

    __slots__ = (
        "_decoder",
        "_produced",
        "_provider",
        "_request",
        "chunked",
        "done",
        "error",
        "fingerprint",
        "reason",
        "usage",
    )

    def __init__(self, provider: OpenAICompatibleProvider, request: ChatRequest) -> None:
        self._provider = provider
        self._request = request
        self._decoder = SSEDecoder()
        self._produced: list[str] = []  # for a usage estimate, should the upstream send none
        self.chunked = self.done = False
        self.reason: FinishReason | None = None
        self.usage: dict[str, Any] | None = None
        self.error: ProviderError | None = None  # raised once the events before it are out
        self.fingerprint: str | None = None  # the upstream's system_fingerprint, once it sent one

    def feed(self, raw: bytes | None) -> list[ProviderEvent]:
        """The events of the next chunk of the body (``None``: the body ended)."""
        events: list[ProviderEvent] = []
        for payload in self._decoder.feed(raw) if raw is not None else self._decoder.flush():
            if payload == b"[DONE]":
                if not self.chunked:
                    raise Unavailable(
                        f"{self._provider._who()} ended its stream with [DONE] before sending any reply",
                        upstream_status=200,
                    )
                self.done = True
                return events
            try:
                chunk = self._provider._decode(payload, "sent an event that is not a chat-completion chunk")
            except ProviderError as exc:
                if not events:
                    raise
                # The events before it in the same read are the reply's; they go out first.
                self.error = exc
                return events
            if chunk.usage:
                self.usage = chunk.usage
            if (sent := chunk.fingerprint()) is not None and sent != self.fingerprint:
                self.fingerprint = sent  # one string for the reply's events
            if not chunk.choices:
                self.chunked = self.chunked or chunk.usage is not None
                continue
            self.chunked = True
            choice = chunk.choices[0]
            delta = choice.delta or choice.message
            fingerprint = self.fingerprint
            if delta is not None:
                thought = delta.reasoning_content or delta.reasoning
                if thought:
                    self._produced.append(thought)
                    events.append(ReasoningDelta(thought, fingerprint))
                if delta.content:
                    self._produced.append(delta.content)
                    events.append(ContentDelta(delta.content, choice.entries(), fingerprint))
                if delta.tool_calls:
                    for call in delta.tool_calls:
                        function = call.function or FunctionPart()
                        self._produced.append(function.arguments or "")
                        events.append(
                            ToolCallDelta(
                                call.index, call.id, function.name, function.arguments or "", fingerprint
                            )
                        )
            if choice.finish_reason:
                self.reason = FINISH_REASONS.get(choice.finish_reason, "stop")
        return events

    def finish(self) -> Finish:
        usage = self._provider._usage(self.usage, self._request, self._produced)
        return Finish(self.reason or "stop", usage, self.fingerprint)

    def cut(self) -> Unavailable:
        """The error of a body that ended before ``[DONE]``."""
        middle = " in the middle of the reply" if self._produced else ""
        return Unavailable(
            f"{self._provider._who()} closed the stream before [DONE]{middle}", upstream_status=200
        )


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [OpenAICompatibleProvider]
