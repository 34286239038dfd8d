"""The key-management page, driven in headless Chromium: create a user and a key, then use the key."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.conftest import RunningGateway
from tests.plugins.browser import (  # skips without a browser
    By,
    WebDriverWait,
    blocked_by_policy,
    browser,
    expected_conditions,
)

TOKEN = "admin-page-token-0123456789"


@pytest.fixture
async def gateway(
    write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> RunningGateway:
    config = write_config(replace={'host = "127.0.0.1"\n': f'host = "127.0.0.1"\nadmin_token = "{TOKEN}"\n'})
    return await gateway_factory(config)  # type: ignore[no-any-return,misc]


def use_the_page(url: str) -> tuple[str, int]:
    """Everything a person does on the page; returns the key it showed and the chart's bar count."""
    driver = browser()
    wait = WebDriverWait(driver, 15)
    try:
        driver.get(url + "/admin")
        driver.find_element(By.ID, "token").send_keys("wrong")
        driver.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "sign-in"), "not the server"))
        token = driver.find_element(By.ID, "token")
        token.clear()
        token.send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "console")))

        driver.find_element(By.ID, "user-email").send_keys("page@example.com")
        balance = driver.find_element(By.ID, "user-balance")
        balance.clear()
        balance.send_keys("5")
        driver.find_element(By.CSS_SELECTOR, "#user-form button").click()
        row = '#users tr[data-email="page@example.com"]'
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, row)))
        driver.find_element(By.CSS_SELECTOR, f"{row} .topup-amount").send_keys("5")
        driver.find_element(By.CSS_SELECTOR, f"{row} button.topup").click()
        wait.until(
            expected_conditions.text_to_be_present_in_element((By.CSS_SELECTOR, f"{row} .balance"), "10.")
        )

        driver.find_element(By.ID, "key-email").send_keys("page@example.com")
        driver.find_element(By.ID, "key-name").send_keys("from the page")
        driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "new-key")))
        key = driver.find_element(By.ID, "new-key-value").text
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#keys tr")))

        with openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as sdk:
            answer = sdk.chat.completions.create(
                model="mock-chat", messages=[{"role": "user", "content": "Hi"}]
            )
        assert answer.choices[0].message.content

        bars = 0
        for _ in range(50):  # the charge settles just after the answer
            driver.refresh()
            wait.until(expected_conditions.visibility_of_element_located((By.ID, "console")))
            bars = len(driver.find_elements(By.CSS_SELECTOR, "#chart svg rect"))
            if bars:
                break
        assert not blocked_by_policy(driver), "the page works under its Content-Security-Policy"
        return key, bars
    finally:
        driver.quit()


async def test_create_a_key_on_the_page_then_call_the_api_with_it(gateway: RunningGateway) -> None:
    key, bars = await asyncio.to_thread(use_the_page, gateway.url)
    assert key.startswith("sk-cg-")
    assert bars >= 1, "the chart shows the day's tokens"
    user = await gateway.services.accounts.find_user("page@example.com")
    assert user is not None
    assert user.balance < 10_000_000  # 10 credits, less the request the key made


async def test_the_page_is_only_served_with_an_admin_token(
    write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> None:
    plain: RunningGateway = await gateway_factory(write_config(name="plain.toml"))  # type: ignore[assignment,misc]
    assert (await plain.client.get("/admin")).status_code == 404


async def test_the_page_needs_nothing_from_the_internet(gateway: RunningGateway) -> None:
    response = await gateway.client.get("/admin")
    assert response.headers["content-security-policy"].startswith("default-src 'self';")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    page = response.text
    assert "http://" not in page
    assert "https://" not in page
    for asset in ("admin.css", "admin.js"):
        response = await gateway.client.get(f"/admin/static/{asset}")
        assert response.status_code == 200
        assert "https://" not in response.text
    assert (await gateway.client.get("/admin/static/../admin.py")).status_code == 404
