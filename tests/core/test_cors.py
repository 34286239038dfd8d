"""Browsers calling the API from another origin, when the operator names it (``[server] cors_origins``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from core.config import load_config
from core.errors import ConfigError
from tests.conftest import RunningGateway

PAGE = "http://app.example"


@pytest.fixture
async def keyed(
    write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> tuple[RunningGateway, str]:
    config = write_config(
        replace={'host = "127.0.0.1"\n': f'host = "127.0.0.1"\ncors_origins = ["{PAGE}"]\n'}
    )
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    key, secret = await gateway.services.accounts.create_key("browser@example.com")
    await gateway.services.billing.top_up(key.user_id, 10**9)
    return gateway, secret


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/chat/topic", "/api/chat"])
async def test_a_preflight_from_a_named_origin_is_answered_on_every_surface(keyed, path: str) -> None:
    gateway, _ = keyed
    asked = {
        "Origin": PAGE,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    response = await gateway.client.options(path, headers=asked)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == PAGE
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == "authorization, content-type"
    assert "access-control-allow-credentials" not in response.headers
    # Another origin's preflight gets nothing that would let its page read an answer.
    other = await gateway.client.options(path, headers={**asked, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


async def test_answers_to_a_named_origin_carry_the_headers_streams_included(keyed) -> None:
    gateway, secret = keyed
    headers = {"Origin": PAGE, "Authorization": f"Bearer {secret}"}
    models = await gateway.client.get("/v1/models", headers=headers)
    assert models.status_code == 200
    assert models.headers["access-control-allow-origin"] == PAGE
    assert models.headers["access-control-expose-headers"] == "*"
    body = {"model": "mock-chat", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    async with gateway.client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as stream:
        assert stream.status_code == 200
        assert stream.headers["access-control-allow-origin"] == PAGE
        assert [line async for line in stream.aiter_lines() if line.startswith("data:")][-1] == "data: [DONE]"
    # Refusals too, so the page can read why.
    refused = await gateway.client.get("/v1/models", headers={"Origin": PAGE})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == PAGE
    # No Origin, or another one: as before.
    plain = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert "access-control-allow-origin" not in plain.headers
    assert plain.headers["vary"] == "origin"  # a shared cache keeps answers apart by origin
    other = await gateway.client.get("/v1/models", headers={**headers, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


async def test_without_cors_origins_nothing_changes(gateway: RunningGateway) -> None:
    asked = {"Origin": PAGE, "Access-Control-Request-Method": "POST"}
    response = await gateway.client.options("/v1/chat/completions", headers=asked)
    assert "access-control-allow-origin" not in response.headers
    response = await gateway.client.get("/v1/models", headers={"Origin": PAGE})
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize(
    "origin", ["app.example", "http://app.example/", "http://app.example/page", "ftp://x"]
)
def test_a_malformed_origin_is_a_configuration_error(write_config, origin: str) -> None:
    config = write_config(
        replace={'host = "127.0.0.1"\n': f'host = "127.0.0.1"\ncors_origins = ["{origin}"]\n'}
    )
    with pytest.raises(ConfigError, match="cors_origins"):
        load_config(config)


# --- a real browser, on a page of another origin ---


@pytest.fixture
async def page_server() -> AsyncIterator[Callable[[str], str]]:
    """Serves one HTML page (set by calling the fixture with its text) on its own port: another origin."""
    html = {"text": ""}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = html["text"].encode()
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def page(text: str) -> str:
        html["text"] = text
        return f"http://127.0.0.1:{port}"

    yield page
    server.close()


SCRIPT = """<!doctype html><pre id="out">…</pre><script>
fetch("{gateway}/v1/chat/completions", {{
  method: "POST",
  headers: {{"Authorization": "Bearer {key}", "Content-Type": "application/json"}},
  body: JSON.stringify({{model: "mock-chat", messages: [{{role: "user", content: "Hi"}}], stream: true}}),
}}).then(async (r) => {{
  const text = await r.text();
  document.getElementById("out").textContent = JSON.stringify({{status: r.status, text}});
}}).catch((e) => {{ document.getElementById("out").textContent = JSON.stringify({{error: String(e)}}); }});
</script>"""


def run_page(url: str) -> dict[str, object]:
    from tests.plugins.browser import By, WebDriverWait, browser

    driver = browser()
    try:
        driver.get(url)
        WebDriverWait(driver, 15).until(lambda d: d.find_element(By.ID, "out").text != "…")
        return json.loads(driver.find_element(By.ID, "out").text)  # type: ignore[no-any-return]
    finally:
        driver.quit()


@pytest.mark.parametrize("allowed", [True, False])
async def test_a_page_of_another_origin_streams_a_completion_only_when_allowed(
    allowed: bool, write_config, gateway_factory, page_server
) -> None:
    pytest.importorskip("selenium")
    url = page_server("")  # the page's origin, before the gateway names it
    origins = f'cors_origins = ["{url}"]\n' if allowed else ""
    config = write_config(replace={'host = "127.0.0.1"\n': f'host = "127.0.0.1"\n{origins}'})
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment]
    key, secret = await gateway.services.accounts.create_key("page@example.com")
    await gateway.services.billing.top_up(key.user_id, 10**9)
    page_server(SCRIPT.format(gateway=gateway.url, key=secret))
    seen = await asyncio.to_thread(run_page, url)
    if allowed:
        assert seen["status"] == 200
        assert str(seen["text"]).rstrip().endswith("data: [DONE]")
    else:
        assert "error" in seen  # the browser kept the answer from the page (TypeError: Failed to fetch)
