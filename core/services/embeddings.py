"""Embeddings requests, billed exactly once, as completions are.

An embeddings request has no reply to stream and no output tokens: it reserves the
estimated input tokens at the model's ``input_price`` (within the key's limits, as a
reply is admitted; an upper bound: each text's UTF-8 bytes, at most the model's context),
calls the provider once, and settles to the usage the provider
reports (never above the reservation). The call and its settlement run in a task of
their own, so a client that leaves cannot interrupt the bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from ..errors import ProviderError, Unavailable
from ..records import RateLimits, RateUse
from ..tokens import estimate_tokens
from ..types import EmbeddingRequest, Embeddings, Usage
from .accounts import Caller
from .billing import Billing, Reservation
from .catalog import Route

log = logging.getLogger("chatgate.embeddings")


FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: what ``encoding_format = "base64"`` can carry."""


def input_tokens(item: str | tuple[int, ...]) -> int:
    """The estimated tokens of one input: a text's estimate, or a token array's length."""
    return len(item) if isinstance(item, tuple) else max(1, estimate_tokens(item))


def reserved_tokens(item: str | tuple[int, ...], most: int) -> int:
    """An upper bound of one input's tokens, to reserve: a token array's length, else the text's
    UTF-8 bytes (byte-level BPE never makes more tokens than bytes), at most ``most`` (the
    model's context, past which the upstream cannot take it)."""
    if isinstance(item, tuple):
        return len(item)
    return max(1, min(len(item.encode("utf-8", "surrogatepass")), most))


def _check(vectors: tuple[tuple[float, ...], ...], instance: str) -> None:
    """Refuse a vector with a value no client can read (NaN, infinite, beyond float32)."""
    for i, vector in enumerate(vectors):
        if not all(-FLOAT32_MAX <= value <= FLOAT32_MAX for value in vector):  # False for NaN too
            raise ProviderError(
                f"provider {instance!r} answered vector {i} with a value that is not a finite float32"
            )


class Embedder:
    """Runs embeddings requests for surfaces.

    Promises: nothing goes upstream before the key's limits and the balance admitted the
    request; every admitted request is settled exactly once: ``complete`` at the
    provider's usage (an estimate when it reports none, so no request is free),
    ``error`` at nothing when the provider failed (or answered a vector with a value that is
    not a finite float32), ``cancelled`` at the input when the
    gateway shut down mid-call.
    """

    input_tokens = staticmethod(input_tokens)
    """The estimated tokens of one input (:func:`input_tokens`)."""

    def __init__(self, billing: Billing) -> None:
        self.billing = billing
        self._running: set[asyncio.Task[Embeddings]] = set()

    async def embed(
        self, caller: Caller, route: Route, request: EmbeddingRequest, limits: RateLimits | None = None
    ) -> tuple[Embeddings, RateUse | None]:
        """Reserve, embed and settle; the vectors and the key's use of its limits.

        Raises:
            RateLimitExceeded: the key is at one of its limits; nothing went upstream.
            InsufficientBalance: the balance cannot cover the input; nothing went upstream.
            ProviderError: the provider failed; nothing was charged.
        """
        most = route.config.context_tokens
        prompt = sum(reserved_tokens(item, most) for item in request.inputs)
        key_id = caller.key.id if caller.key is not None else None
        reservation = await self.billing.reserve_input(
            caller.user.id, route, prompt, key_id=key_id, limits=limits, balance=caller.user.balance
        )
        task = asyncio.create_task(self._run(route, request, reservation), name=f"embeddings {route.model}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        # Shielded: a client that leaves lets the call finish and be settled.
        return await asyncio.shield(task), reservation.use

    async def _run(self, route: Route, request: EmbeddingRequest, reservation: Reservation) -> Embeddings:
        started = time.monotonic()
        usage, outcome = Usage(), "error"
        # What a call the upstream does not count is charged: the estimate, within the reservation.
        estimated = min(reservation.prompt_tokens, sum(input_tokens(item) for item in request.inputs))
        try:
            result = await route.provider.embed(request)
            if len(result.vectors) != len(request.inputs):
                raise Unavailable(
                    f"provider {route.provider.instance!r} answered {len(result.vectors)} vectors "
                    f"for {len(request.inputs)} inputs"
                )
            _check(result.vectors, route.provider.instance)
            usage, outcome = result.usage, "complete"
            if usage.prompt_tokens <= 0:  # an upstream that counts nothing must not make it free
                usage = Usage(prompt_tokens=estimated, extra={"estimated": True})
                result = msgspec.structs.replace(result, usage=usage)  # the client sees what it paid for
            return result
        except asyncio.CancelledError:
            usage, outcome = Usage(prompt_tokens=reservation.prompt_tokens), "cancelled"
            raise
        except ProviderError:
            raise
        except Exception as exc:  # a provider breaking its contract must not lose the money
            log.exception("provider %r failed unexpectedly", route.provider.instance)
            raise Unavailable(f"internal error in provider: {type(exc).__name__}") from None
        finally:
            latency_ms = round((time.monotonic() - started) * 1000)
            try:
                await self.billing.settle(reservation, usage, outcome=outcome, latency_ms=latency_ms)
            except Exception:
                log.exception("could not settle ledger entry %d", reservation.entry.id)

    async def aclose(self) -> None:
        """Wait (briefly) for the calls still running, then cancel what is left; each is settled
        (a cancelled call at its input)."""
        if self._running:
            await asyncio.wait(self._running, timeout=10)
        if running := set(self._running):
            for task in running:
                task.cancel()
            await asyncio.wait(running, timeout=5)
