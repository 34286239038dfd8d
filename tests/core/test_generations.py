"""The generation runner: a reply as a task that persists progress, can be followed and interrupted."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from core import MessageDraft
from core.errors import InsufficientBalance, NotFound, Unavailable
from core.services import Services
from core.services.generations import Generation, Upstream
from core.testing.fake_upstream import FakeUpstream, Scenario
from core.tokens import estimate_prompt_tokens, estimate_tokens
from core.types import ChatMessage, ChatRequest, ContentDelta, Finish
from stores.sqlite import SqliteStore
from tests.conftest import deepseek_config, serving

SLOW = {"\ntoken_delay = 0\n": "\ntoken_delay = 0.02\n"}


async def start_reply(
    services: Services, text: str = "Tell me about the sea", *, model: str = "mock-chat"
) -> Generation:
    """What a surface does: find the conversation and start a reply to ``text`` in it."""
    user = await services.accounts.user_for_email("writer@example.com", ["*"])
    if user.balance < 1_000_000:  # mock-chat is priced in the test configuration
        await services.billing.top_up(user.id, 10_000_000)
    conversation = await services.conversations.latest(user.id, "test")
    if conversation is None:
        conversation = await services.conversations.create(user.id, "test")
    request = ChatRequest(model=model, messages=(ChatMessage(role="user", content=text),))
    return await services.conversations.start_reply(
        conversation, services.catalog.route(model), request, question=text
    )


async def test_a_reply_runs_to_completion_and_is_stored(gateway):
    generation = await start_reply(gateway.services)
    events = [event async for event in generation.follow()]
    outcome = await generation.wait()
    text = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert isinstance(events[-1], Finish)
    assert outcome.status == "complete"
    assert outcome.finish_reason == "stop"
    stored = await gateway.services.conversations.store.get_message(generation.message_id)
    assert stored.content == text != ""
    assert stored.status == "complete"
    assert stored.prompt_tokens == outcome.usage.prompt_tokens > 0
    assert stored.completion_tokens == outcome.usage.completion_tokens > 0
    assert gateway.services.generations.current(generation.conversation_id) is None


async def test_reasoning_is_stored_apart_from_the_reply(gateway):
    generation = await start_reply(gateway.services, model="mock-reasoner")
    outcome = await generation.wait()
    assert outcome.message.reasoning
    assert outcome.message.content
    assert outcome.message.reasoning not in outcome.message.content


async def test_partial_replies_are_persisted_while_generating(write_config, gateway_factory):
    gateway = await gateway_factory(write_config(replace=SLOW))
    generation = await start_reply(gateway.services)
    store = gateway.services.conversations.store
    seen = []
    while not generation.done:
        message = await store.get_message(generation.message_id)
        if message.status == "generating":
            seen.append(message.content)
        await asyncio.sleep(0.03)
    final = (await generation.wait()).message.content
    partials = [text for text in seen if text and text != final]
    assert len(partials) >= 2, seen  # written repeatedly while growing ...
    assert all(final.startswith(p) for p in partials)
    assert partials == sorted(partials, key=len)  # ... and only ever growing


async def test_late_followers_see_every_event_from_the_start(write_config, gateway_factory):
    gateway = await gateway_factory(write_config(replace=SLOW))
    generation = await start_reply(gateway.services)
    await asyncio.sleep(0.15)
    early, late = generation.follow(), generation.follow()
    first = [e async for e in early]
    second = [e async for e in late]
    assert first == second
    assert isinstance(first[-1], Finish)


async def test_a_paced_follower_gets_fewer_larger_batches_of_the_same_events(write_config, gateway_factory):
    gateway = await gateway_factory(write_config(replace={"\ntoken_delay = 0\n": "\ntoken_delay = 0.004\n"}))
    generation = await start_reply(gateway.services, "Tell me a long story about the sea and the wind")
    eager, paced = generation.batches(), generation.batches(pace=0.05)
    eager_batches, paced_batches = await asyncio.gather(collect(eager), collect(paced))
    assert [e for b in eager_batches for e in b] == [e for b in paced_batches for e in b]
    tokens = sum(isinstance(e, ContentDelta) for b in eager_batches for e in b)
    assert tokens >= 10
    # Tokens 4 ms apart: the eager follower wakes for (nearly) each, the paced one every 50 ms.
    assert len(eager_batches) > tokens / 2
    assert 2 <= len(paced_batches) <= tokens / 4 + 2


async def collect(batches):
    return [batch async for batch in batches]


async def test_interrupting_keeps_the_partial_reply_and_stops_the_provider(write_config, gateway_factory):
    gateway = await gateway_factory(write_config(replace=SLOW))
    provider = gateway.services.catalog.providers["mock"]
    generation = await start_reply(gateway.services, "Explain tides in detail please")
    async for event in generation.follow():
        if isinstance(event, ContentDelta) and len(generation.content) > 10:
            break
    assert await gateway.services.generations.interrupt(generation.conversation_id) is True
    outcome = await generation.wait()
    assert outcome.status == "interrupted"
    assert outcome.message.status == "interrupted"
    assert outcome.message.content == generation.content != ""
    streamed = provider.tokens_streamed
    await asyncio.sleep(0.1)
    assert provider.tokens_streamed == streamed
    assert provider.active_streams == 0
    assert await gateway.services.generations.interrupt(generation.conversation_id) is False


async def test_a_new_reply_interrupts_the_conversations_running_one(write_config, gateway_factory):
    gateway = await gateway_factory(write_config(replace=SLOW))
    first = await start_reply(gateway.services, "first question")
    await asyncio.sleep(0.1)
    second = await start_reply(gateway.services, "second question")
    assert (await first.wait()).status == "interrupted"
    assert (await second.wait()).status == "complete"


async def test_a_provider_failure_marks_the_reply_error_and_keeps_what_was_said(
    write_config, gateway_factory
):
    failing = {"\ntoken_delay = 0\n": '\ntoken_delay = 0\nfail = "unavailable"\nfail_after_tokens = 3\n'}
    gateway = await gateway_factory(write_config(replace=failing))
    generation = await start_reply(gateway.services)
    outcome = await generation.wait()
    assert outcome.status == "error"
    assert isinstance(outcome.error, Unavailable)
    assert outcome.message.status == "error"
    assert outcome.message.error == outcome.error.message
    assert outcome.message.content == generation.content != ""
    messages = await gateway.services.conversations.store.list_messages(generation.conversation_id)
    assert [m.role for m in messages] == ["user", "assistant"]  # the question survives the failure


async def test_usage_is_settled_to_the_ledger_at_the_models_prices(gateway):
    services = gateway.services
    user = await services.accounts.user_for_email("writer@example.com", ["*"])
    await services.billing.top_up(user.id, 10_000_000)
    generation = await start_reply(services)
    outcome = await generation.wait()
    route = services.catalog.route("mock-chat")
    cost = services.billing.cost(route, outcome.usage.prompt_tokens, outcome.usage.completion_tokens)
    # mock-chat costs 1000 credits per million input tokens and 2000 per million output tokens
    assert cost == outcome.usage.prompt_tokens * 1000 + outcome.usage.completion_tokens * 2000
    store = services.conversations.store
    assert (await store.get_user(user.id)).balance == 10_000_000 - cost
    entries = await store.list_ledger(user.id)
    assert [e.kind for e in entries] == ["charge", "topup"]
    charge = entries[0]
    assert (charge.amount, charge.prompt_tokens, charge.completion_tokens) == (
        -cost,
        outcome.usage.prompt_tokens,
        outcome.usage.completion_tokens,
    )
    assert charge.outcome == "ok"
    assert charge.model == "mock-chat"
    assert charge.provider == "mock"
    assert charge.latency_ms is not None


async def test_an_interrupted_reply_is_charged_only_for_what_was_produced(write_config, gateway_factory):
    gateway = await gateway_factory(write_config(replace=SLOW))
    services = gateway.services
    user = await services.accounts.user_for_email("writer@example.com", ["*"])
    await services.billing.top_up(user.id, 10_000_000)
    generation = await start_reply(services)
    reserved = -generation.reservation.entry.amount
    await asyncio.sleep(0.15)
    await services.generations.interrupt(generation.conversation_id)
    outcome = await generation.wait()
    charge = (await services.conversations.store.list_ledger(user.id))[0]
    assert charge.outcome == "interrupted"
    assert 0 < -charge.amount < reserved
    assert outcome.usage.completion_tokens > 0
    assert (await services.conversations.store.get_user(user.id)).balance == 10_000_000 + charge.amount


async def test_a_reply_the_balance_cannot_cover_writes_nothing(gateway):
    services = gateway.services
    store = services.conversations.store
    user = await services.accounts.user_for_email("broke@example.com", ["*"])
    conversation = await services.conversations.create(user.id, "test")
    request = ChatRequest(model="mock-chat", messages=(ChatMessage(role="user", content="hello"),))
    with pytest.raises(InsufficientBalance):
        await services.conversations.start_reply(
            conversation, services.catalog.route("mock-chat"), request, question="hello"
        )
    assert await store.list_messages(conversation.id) == []
    assert await store.list_ledger(user.id) == []
    assert services.generations.current(conversation.id) is None


async def test_replies_a_crash_left_generating_are_marked_interrupted_at_start(write_config, gateway_factory):
    config = write_config()
    store = SqliteStore("sqlite", SqliteStore.Options(path=str(config.parent / "chatgate.db")))
    await store.open()
    user = await store.ensure_user("crash@example.com")
    conversation = await store.create_conversation(user.id, "test")
    orphan = await store.append_message(conversation.id, MessageDraft(role="assistant", status="generating"))
    await store.aclose()
    await asyncio.sleep(1.1)  # stale_after = 1 in the test configuration
    gateway = await gateway_factory(config)
    message = await gateway.services.conversations.store.get_message(orphan.id)
    assert message.status == "interrupted"


async def test_a_running_reply_is_not_swept_because_it_keeps_a_heartbeat(write_config, gateway_factory):
    slow_start = {"first_token_delay = 0": "first_token_delay = 1.6"}
    gateway = await gateway_factory(write_config(replace=slow_start))
    generation = await start_reply(gateway.services)
    await asyncio.sleep(1.3)  # longer than stale_after, before any token arrived
    assert await gateway.services.generations.sweep() == 0
    assert (await generation.wait()).status == "complete"


async def test_shutdown_interrupts_and_persists_running_replies(write_config):
    from core.app import create_app
    from core.config import load_config

    app = create_app(load_config(write_config(replace=SLOW)))
    async with serving(app):
        generation = await start_reply(app.state.services)
        await asyncio.sleep(0.1)
    outcome = await generation.wait()
    assert outcome.status == "interrupted"
    store = SqliteStore("sqlite", SqliteStore.Options(path=app.state.services.config.store.options["path"]))
    await store.open()
    try:
        assert (await store.get_message(generation.message_id)).status == "interrupted"
    finally:
        await store.aclose()


async def test_cancelling_a_waiter_does_not_cancel_the_reply(write_config, gateway_factory):
    gateway = await gateway_factory(write_config(replace=SLOW))
    generation = await start_reply(gateway.services)
    waiter = asyncio.create_task(generation.wait())
    await asyncio.sleep(0.05)
    waiter.cancel()
    assert (await generation.wait()).status == "complete"


async def test_interrupting_right_after_starting_still_ends_the_reply(write_config, gateway_factory):
    """No await between run() and interrupt(): the task has not taken its first step yet."""
    gateway = await gateway_factory(write_config(replace=SLOW))
    services = gateway.services
    user = await services.accounts.user_for_email("quick@example.com", ["*"])
    conversation = await services.conversations.create(user.id, "test")
    store = services.conversations.store
    reply = await store.append_message(conversation.id, MessageDraft(role="assistant", status="generating"))
    request = ChatRequest(model="mock-chat", messages=(ChatMessage(role="user", content="hi"),))
    generation = await services.generations.run(
        conversation.id, reply.id, services.catalog.route("mock-chat"), request
    )
    async with asyncio.timeout(2):  # not wait_for: its extra task would let the reply start first
        assert await services.generations.interrupt(conversation.id) is True
        assert (await generation.wait()).message.status == "interrupted"
    assert len(services.generations._exclusive) == 0  # per-conversation locks do not pile up


async def test_the_charge_is_settled_even_when_the_reply_cannot_be_written(gateway):
    services = gateway.services
    store = services.conversations.store
    user = await services.accounts.user_for_email("writer@example.com", ["*"])
    await services.billing.top_up(user.id, 10_000_000)
    generation = await start_reply(services)
    await store.delete_conversation(generation.conversation_id)  # behind the runner's back
    with pytest.raises(NotFound):
        await generation.wait()
    async with asyncio.timeout(5):  # the settlement follows the failed write
        while (await store.list_ledger(user.id))[0].kind == "reservation":  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    [charge, _topup] = await store.list_ledger(user.id)
    assert charge.kind == "charge"
    assert charge.outcome != "pending"
    assert (await store.get_user(user.id)).balance == 10_000_000 + charge.amount


async def test_orphans_are_swept_periodically_not_only_at_start(gateway):
    """A crash just before a restart leaves replies that are not stale yet at start-up."""
    store = gateway.services.conversations.store
    user = await store.ensure_user("orphan@example.com")
    conversation = await store.create_conversation(user.id, "test")
    orphan = await store.append_message(conversation.id, MessageDraft(role="assistant", status="generating"))
    deadline = time.monotonic() + 5
    while (await store.get_message(orphan.id)).status == "generating":
        assert time.monotonic() < deadline, "the orphan was never swept"
        await asyncio.sleep(0.1)
    assert (await store.get_message(orphan.id)).status == "interrupted"


async def test_a_reply_generating_in_another_process_shows_as_generating(gateway):
    """Only the store knows about a reply another worker is producing."""
    services = gateway.services
    user = await services.accounts.user_for_email("shared@example.com", ["*"])
    conversation = await services.conversations.create(user.id, "test")
    store = services.conversations.store
    await store.append_message(conversation.id, MessageDraft(role="user", content="hi"))
    await store.append_message(
        conversation.id, MessageDraft(role="assistant", content="Hel", status="generating")
    )
    transcript = await services.conversations.transcript(
        await services.conversations.store.get_conversation(conversation.id)
    )
    assert transcript.generating is True
    assert transcript.messages[-1].content == "Hel"


async def test_an_abandoned_reply_is_charged_for_what_it_produced(gateway):
    """A process died mid-reply: the sweep settles its reservation from the stored partial reply."""
    services = gateway.services
    store = services.conversations.store
    user = await services.accounts.user_for_email("crash@example.com", ["*"])
    await services.billing.top_up(user.id, 10_000_000)
    conversation = await services.conversations.create(user.id, "test")
    route = services.catalog.route("mock-chat")
    request = ChatRequest(
        model="mock-chat", messages=(ChatMessage(role="user", content="tell me everything"),)
    )
    # What the dead process had done: reserved, and written part of the reply.
    reservation = await services.billing.reserve(user.id, route, request, key_id=None)
    partial = "The sea is deep and"
    draft = MessageDraft(
        role="assistant", content=partial, status="generating", ledger_id=reservation.entry.id
    )
    reply = await store.append_message(conversation.id, draft)
    await asyncio.sleep(1.1)  # stale_after = 1
    assert await services.generations.sweep() == 1
    assert (await store.get_message(reply.id)).status == "interrupted"
    entry = await store.get_ledger_entry(reservation.entry.id)
    produced = estimate_tokens(partial)
    prompt = estimate_prompt_tokens(request.messages)
    assert (entry.kind, entry.outcome) == ("charge", "abandoned")
    assert (entry.prompt_tokens, entry.completion_tokens) == (prompt, produced)
    assert entry.amount == -(prompt * 1000 + produced * 2000)
    assert (await store.get_user(user.id)).balance == 10_000_000 + entry.amount


async def test_the_sweep_settles_a_reservation_a_dead_process_left_behind(gateway, monkeypatch):
    services = gateway.services
    user = await services.accounts.user_for_email("gone@example.com", ["*"])
    await services.billing.top_up(user.id, 10_000_000)
    route = services.catalog.route("mock-chat")
    request = ChatRequest(model="mock-chat", messages=(ChatMessage(role="user", content="Hello there"),))
    reservation = await services.billing.reserve(user.id, route, request, key_id=None)
    held = (await services.accounts.get_user(user.id)).balance
    assert held < 10_000_000
    monkeypatch.setattr("core.services.generations.STALE_RESERVATION", timedelta(0))
    await asyncio.sleep(0.01)  # stamps are whole milliseconds: let the reservation be in the past
    # This sweep or the runner's periodic one (every stale_after) settles it: either will do.
    await services.generations.sweep()
    entry = await services.billing.store.get_ledger_entry(reservation.entry.id)
    assert entry.kind == "charge"
    assert entry.outcome == "abandoned"
    assert entry.amount == -(reservation.entry.prompt_tokens * 1000)  # the prompt, at mock-chat's price
    assert (await services.accounts.get_user(user.id)).balance == 10_000_000 + entry.amount
    assert await services.generations.sweep() == 0


async def test_a_reservation_whose_caller_is_cancelled_is_given_back(gateway):
    services = gateway.services
    user = await services.accounts.user_for_email("cancelled@example.com", ["*"])
    await services.billing.top_up(user.id, 10_000_000)
    route = services.catalog.route("mock-chat")
    request = ChatRequest(model="mock-chat", messages=(ChatMessage(role="user", content="hi"),))
    cancelled = 0
    # Cancelled at once (while the store writes) and at later points (after it wrote).
    for delay in [0.0] * 5 + [0.0002 * step for step in range(1, 10)]:
        task = asyncio.create_task(services.billing.reserve(user.id, route, request, key_id=None))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await services.billing.release(await task)  # it finished first: the caller gives it back
        except asyncio.CancelledError:
            cancelled += 1
    assert cancelled >= 5
    store = services.conversations.store
    for _ in range(100):  # the give-backs land shortly after
        ledger = await store.list_ledger(user.id)
        if all(entry.kind != "reservation" for entry in ledger):
            break
        await asyncio.sleep(0.01)
    held = [entry for entry in ledger if entry.kind == "reservation"]
    given_back = [entry for entry in ledger if entry.outcome == "not_sent"]
    assert held == [], (held, ledger)
    assert (await store.get_user(user.id)).balance == 10_000_000
    assert all(entry.amount == 0 for entry in given_back)


DEEPSEEK_MODEL = """
[models.deepseek-chat]
provider = "deepseek"
input_price = 0
output_price = 0
"""


async def deepseek_route(fake_deepseek, write_config, gateway_factory):
    """A gateway in front of the fake DeepSeek; its route to deepseek-chat and a streamed request."""
    gateway = await gateway_factory(write_config(deepseek_config(fake_deepseek.url) + DEEPSEEK_MODEL))
    message = ChatMessage(role="user", content="Hi")
    request = ChatRequest(model="deepseek-chat", messages=(message,), stream=True)
    return gateway.services.catalog.route("deepseek-chat"), request


async def test_an_upstream_request_is_sent_before_anyone_reads_it_and_closed_with_it(
    fake_deepseek: FakeUpstream, write_config, gateway_factory
):
    fake_deepseek.scenario = Scenario(first_token_delay=5)
    route, request = await deepseek_route(fake_deepseek, write_config, gateway_factory)
    upstream = Upstream(route, request)
    async with asyncio.timeout(2):
        while not fake_deepseek.requests:  # noqa: ASYNC110 - nobody has asked for an event yet
            await asyncio.sleep(0.005)
    closed = time.monotonic()
    await upstream.aclose()
    assert await fake_deepseek.wait_for_disconnect(timeout=2) - closed < 0.5


async def test_an_upstream_yields_the_same_events_as_the_provider(
    fake_deepseek: FakeUpstream, write_config, gateway_factory
):
    fake_deepseek.scenario = Scenario(tokens=12)
    route, request = await deepseek_route(fake_deepseek, write_config, gateway_factory)
    upstream = Upstream(route, request)
    through = [e async for e in upstream.events()]
    await upstream.aclose()
    direct = [e async for e in route.provider.stream(request)]
    assert through == direct
    assert sum(isinstance(e, ContentDelta) for e in through) == 12
