"""Money: exact amounts and prices."""

from __future__ import annotations

import math
from fractions import Fraction

import msgspec
import pytest

from core.config import ModelConfig
from core.errors import ContextTooLong
from core.money import MAX_BALANCE, format_amount, parse_amount
from core.services.billing import Billing
from core.services.catalog import Route
from core.tokens import IMAGE_TOKENS, OutputMeter, estimate_request_tokens, estimate_tokens
from core.types import (
    ChatMessage,
    ChatRequest,
    ContentDelta,
    Finish,
    ProviderEvent,
    ReasoningDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from providers.mock import MockProvider


@pytest.mark.parametrize(
    ("text", "micro"), [("1", 1_000_000), ("2.5", 2_500_000), ("0.000001", 1), ("-3", -3_000_000)]
)
def test_amounts_parse_exactly(text, micro):
    assert parse_amount(text) == micro


@pytest.mark.parametrize("text", ["ten", "0.0000001", "nan", "inf", ""])
def test_bad_amounts_are_refused(text):
    with pytest.raises(ValueError, match=r"not a|decimals"):
        parse_amount(text)


def test_amounts_format_with_six_decimals():
    assert format_amount(12_500_000) == "12.500000"
    assert format_amount(-1) == "-0.000001"


def route(input_price: float, output_price: float) -> Route:
    config = ModelConfig(provider="mock", input_price=input_price, output_price=output_price)
    return Route("m", config, MockProvider("mock", MockProvider.Options()))


def test_cost_is_per_million_tokens_rounded_up_to_a_micro_credit():
    assert Billing.cost(route(0.27, 1.1), 1_000_000, 1_000_000) == 1_370_000
    assert Billing.cost(route(0.27, 1.1), 1, 0) == 1  # 0.27 micro-credits round up
    assert Billing.cost(route(0, 0), 10**9, 10**9) == 0


@pytest.mark.parametrize(
    ("input_price", "output_price"),
    [(0.3, 1.2), (0.1, 0.2), (0.27, 1.1), (1e-7, 3.33333), (1e20, 5e-12), (7, 0)],
)
def test_cost_is_exact_for_prices_as_written(input_price, output_price):
    model = ModelConfig(provider="mock", input_price=input_price, output_price=output_price)
    for prompt, completion in [(0, 0), (1, 0), (0, 1), (95_722, 83_069), (10**9, 3)]:
        exact = Fraction(str(input_price)) * prompt + Fraction(str(output_price)) * completion
        assert Billing.cost_at(model, prompt, completion) == math.ceil(exact)


def test_worst_case_covers_the_prompt_and_the_longest_reply():
    billing = Billing(store=None, models={})  # type: ignore[arg-type]
    request = ChatRequest(model="m", messages=(ChatMessage(role="user", content="a" * 100),), max_tokens=50)
    assert billing.worst_case(route(1, 1), request) == (4 + 30) + 50
    unbounded = ChatRequest(model="m", messages=request.messages)
    assert billing.worst_case(route(1, 1), unbounded) == (4 + 30) + 4096


@pytest.mark.parametrize(
    "text", ["1000000000000.000001", "-1000000000000.000001", "1e999999", "-1e1000000", 1e300]
)
def test_amounts_past_the_ceiling_are_refused(text):
    with pytest.raises(ValueError, match="too large"):
        parse_amount(text)
    assert parse_amount("1e12") == MAX_BALANCE == 10**18


def test_max_tokens_is_at_most_the_models_and_always_set():
    capped = route(1, 1)  # max_output_tokens 4096
    hi = (ChatMessage(role="user", content="hi"),)
    assert capped.output_tokens(ChatRequest(model="m", messages=hi)) == 4096
    assert capped.output_tokens(ChatRequest(model="m", messages=hi, max_tokens=10**9)) == 4096
    assert capped.output_tokens(ChatRequest(model="m", messages=hi, max_tokens=7)) == 7


def test_the_prompt_estimate_counts_the_whole_request():
    text = ChatRequest(model="m", messages=(ChatMessage(role="user", content="a" * 100),))
    base = estimate_request_tokens(text)
    assert base == 4 + 30
    parts = [
        {"type": "text", "text": "a" * 100},
        {"type": "image_url", "image_url": {"url": "data:," + "A" * 10**6}},
    ]
    with_image = msgspec.structs.replace(text, messages=(ChatMessage(role="user", content=parts),))
    assert estimate_request_tokens(with_image) == base + IMAGE_TOKENS  # fixed, whatever the bytes
    audio = [{"type": "input_audio", "input_audio": {"data": "A" * 1000, "format": "wav"}}]
    with_audio = msgspec.structs.replace(text, messages=(ChatMessage(role="user", content=audio),))
    assert estimate_request_tokens(with_audio) > 300  # as sent
    call = ToolCall(id="call_1", name="lookup", arguments='{"q": "' + "b" * 100 + '"}')
    history = (
        ChatMessage(role="assistant", tool_calls=(call,)),
        ChatMessage(role="tool", content="c" * 100, tool_call_id="call_1"),
    )
    assert estimate_request_tokens(msgspec.structs.replace(text, messages=history)) > 2 * 30
    tools = ({"type": "function", "function": {"name": "lookup", "description": "d" * 1000}},)
    assert estimate_request_tokens(msgspec.structs.replace(text, tools=tools)) > base + 300
    extra = {"metadata": {"note": "e" * 1000}}
    assert estimate_request_tokens(msgspec.structs.replace(text, extra=extra)) > base + 300
    schema = {"type": "json_schema", "json_schema": {"schema": {"description": "f" * 1000}}}
    assert estimate_request_tokens(msgspec.structs.replace(text, response_format=schema)) > base + 300


def test_a_request_that_cannot_fit_the_context_is_refused_before_anything():
    small = Route("m", ModelConfig(provider="mock", context_tokens=100, max_output_tokens=10), MockProvider())
    fits = ChatRequest(model="m", messages=(ChatMessage(role="user", content="a" * 300),))
    assert Billing.prompt_tokens(small, fits) == 94
    too_long = ChatRequest(model="m", messages=(ChatMessage(role="user", content="a" * 320),))
    with pytest.raises(ContextTooLong) as caught:
        Billing.prompt_tokens(small, too_long)
    assert caught.value.tokens == 100


def words(n: int) -> list[ProviderEvent]:
    return [ContentDelta(" word") for _ in range(n)]


def test_an_honest_reply_is_never_cut():
    meter = OutputMeter(64)
    # As many pieces as the cap, each a token; code's indentation estimates high but passes.
    events = [ReasoningDelta("hmm"), *words(30), ContentDelta("\n" + " " * 12), *words(32)]
    events.append(Finish("length", Usage(completion_tokens=64)))
    assert [meter.admit(event) for event in events] == events
    assert not meter.over


def test_a_reply_is_cut_at_its_cap_in_pieces():
    meter = OutputMeter(64)
    admitted = [meter.admit(event) for event in words(64)]
    assert None not in admitted
    assert meter.admit(ContentDelta(" more")) is None
    assert meter.over


def test_a_reply_sent_in_one_piece_is_cut_to_twice_its_cap_in_estimated_tokens():
    meter = OutputMeter(64)
    cut = meter.admit(ContentDelta("x" * 10_000))
    assert isinstance(cut, ContentDelta)
    assert 2 * 64 - 1 <= estimate_tokens(cut.text) <= 2 * 64
    assert meter.over
    tools = OutputMeter(1)
    assert tools.admit(ToolCallDelta(index=0, id="c", name="f")) is not None
    assert tools.admit(ToolCallDelta(index=0, arguments="{}")) is None  # cut short it would not parse
