"""The chat page in headless Chromium: create a topic, send a message, watch it stream, regenerate it."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from pathlib import Path

from core.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import PRICED_MODELS, RunningGateway, deepseek_config
from tests.plugins.browser import (  # skips without a browser
    By,
    WebDriverWait,
    blocked_by_policy,
    browser,
    expected_conditions,
)
from tests.plugins.test_topic_chat import CATALOG, User, user_on


def use_the_page(url: str, key: str) -> list[str]:
    """What a person does on the page; returns the texts the streamed reply showed as it grew."""
    driver = browser()
    wait = WebDriverWait(driver, 15)
    seen: list[str] = []
    try:
        driver.get(url + "/chat")
        driver.find_element(By.ID, "key").send_keys(key)
        driver.find_element(By.ID, "save-key").click()
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "app")))
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "series"), "DeepSeek"))

        driver.find_element(By.ID, "topic-name").send_keys("From the page")
        driver.find_element(By.ID, "new-topic").click()
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "topics"), "From the page"))
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "send-form")))

        driver.find_element(By.ID, "input").send_keys("Tell me about tides")
        driver.find_element(By.ID, "send").click()
        reply = (By.CSS_SELECTOR, "#messages .msg.ai .text")
        for _ in range(200):  # watch it grow
            texts = [e.text for e in driver.find_elements(*reply)]
            if texts and texts[-1] and (not seen or texts[-1] != seen[-1]):
                seen.append(texts[-1])
            if seen and seen[-1].endswith("w39"):
                break
            time.sleep(0.02)
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())

        driver.find_element(By.CSS_SELECTOR, "#messages .msg.ai button.regenerate").click()
        wait.until(expected_conditions.text_to_be_present_in_element(reply, "Regenerated reply."))
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
        assert not blocked_by_policy(driver), "the page works under its Content-Security-Policy"
        return seen
    finally:
        driver.quit()


async def test_create_a_topic_send_a_message_watch_it_stream_and_regenerate_it(
    write_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    config = write_config(
        deepseek_config(fake_deepseek.url) + PRICED_MODELS, replace={"[surfaces.topic_chat]\n": CATALOG}
    )
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    user: User = await user_on(gateway, "page@example.com")
    fake_deepseek.script(
        Scenario(content=" ".join(f"w{i}" for i in range(40)), token_delay=0.03),
        Scenario(content="Regenerated reply."),
    )
    seen = await asyncio.to_thread(use_the_page, gateway.url, user.key)
    assert len(seen) >= 3, seen  # the reply showed up piece by piece
    assert all(b.startswith(a) for a, b in itertools.pairwise(seen))
    [created] = (await user.call("GET", "/chat/topic")).json()
    assert created["name"] == "From the page"
    messages = await user.messages(created["id"])
    assert [(m["type"], m["message"]) for m in messages] == [
        (0, "Tell me about tides"),
        (1, "Regenerated reply."),
    ]
    assert fake_deepseek.requests[-1].body["messages"] == [{"role": "user", "content": "Tell me about tides"}]


async def test_the_chat_page_needs_nothing_from_the_internet(gateway: RunningGateway) -> None:
    response = await gateway.client.get("/chat")
    assert response.headers["content-security-policy"].startswith("default-src 'self';")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    page = response.text
    assert "<title>chatgate · chat</title>" in page
    assert "https://" not in page
    for asset in ("chat.css", "chat.js"):
        response = await gateway.client.get(f"/chat/static/{asset}")
        assert response.status_code == 200
        assert "https://" not in response.text
    assert (await gateway.client.get("/chat/static/../__init__.py")).status_code == 404
