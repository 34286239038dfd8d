"""Money: exact amounts and prices."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from core.config import ModelConfig
from core.money import format_amount, parse_amount
from core.services.billing import Billing
from core.services.catalog import Route
from core.types import ChatMessage, ChatRequest
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
