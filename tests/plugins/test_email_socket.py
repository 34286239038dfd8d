"""The email-socket surface (seed 000) against a live gateway and the fake DeepSeek upstream."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.services.billing import Payer, Quota
from core.services.context import SUMMARY_PREAMBLE
from core.testing.fake_upstream import FakeUpstream, Scenario
from core.tokens import estimate_prompt_tokens
from core.types import ChatMessage
from plugins.email_socket.callers import PROXY_HEADERS, local_caller
from tests.conftest import RunningGateway, Servers, deepseek_config

MODELS = """
[models.deepseek-chat]
provider = "deepseek"
context_tokens = 65536
max_output_tokens = 4096

[models.deepseek-reasoner]
provider = "deepseek"
context_tokens = 65536
max_output_tokens = 4096
"""
SEEDS = Path(__file__).parent / "seeds"


class Email:
    """The gateway as the seed's clients see it."""

    def __init__(self, gateway: RunningGateway) -> None:
        self.gateway = gateway
        self.url = gateway.url
        self.http = gateway.client

    async def chat(self, email: str, inp: str, **extra: Any) -> httpx.Response:
        return await self.http.post("/api/chat", json={"email": email, "inp": inp, **extra}, timeout=30)

    async def record(self, email: str) -> dict[str, Any]:
        response = await self.http.post("/api/record", json={"email": email})
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]


@pytest.fixture
def email_config(fake_deepseek: FakeUpstream, write_config: Callable[..., Path]) -> Callable[..., Path]:
    """A config whose email surface answers with ``model`` (the fake's reasoner by default)."""

    def write(surface: str = "", *, model: str = "deepseek-reasoner", models: str = MODELS) -> Path:
        options = f'[surfaces.email_socket]\nmodel = "{model}"\n{surface}'
        return write_config(  # type: ignore[no-any-return]
            deepseek_config(fake_deepseek.url, extra="max_retries = 0") + models,
            replace={"[surfaces.email_socket]\n": options},
        )

    return write


@pytest.fixture
async def email(email_config: Callable[..., Path], gateway_factory: Callable[..., object]) -> Email:
    return Email(await gateway_factory(email_config()))  # type: ignore[arg-type,misc]


def chat_requests(fake: FakeUpstream) -> list[dict[str, Any]]:
    """The bodies of the replies' upstream requests (summaries left out)."""
    return [r.body for r in fake.requests if not is_summary(r.body)]


def is_summary(body: dict[str, Any]) -> bool:
    first = body["messages"][0]
    return first["role"] == "system" and "running summary" in first["content"]


# --- the seed's own clients ---


async def run(*command: str) -> str:
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


def seed(name: str, url: str, tmp_path: Path, old: str = "http://aisocket.zeromi.cn:5000") -> Path:
    path = tmp_path / name
    path.write_text((SEEDS / name).read_text().replace(old, url))
    return path


async def test_the_seed_python_example(email: Email, fake_deepseek: FakeUpstream, tmp_path: Path) -> None:
    fake_deepseek.scenario = Scenario(content="量子计算利用叠加和纠缠。", reasoning="用户想要入门解释。")
    out = await run(sys.executable, str(seed("000_polling.py", email.url, tmp_path)))
    assert out.splitlines() == ["AI回复: 量子计算利用叠加和纠缠。", "思考过程: 用户想要入门解释。"]
    [body] = chat_requests(fake_deepseek)
    assert body["messages"][-1] == {"role": "user", "content": "解释一下量子计算的基本原理"}


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_the_seed_javascript_example(email: Email, fake_deepseek: FakeUpstream, tmp_path: Path) -> None:
    fake_deepseek.scenario = Scenario(content="你好!有什么可以帮你?", reasoning="打招呼。")
    out = await run("node", str(seed("000_chat.js", email.url, tmp_path)))
    assert "最新回复: {" in out
    assert "role: 'ai'" in out
    assert "content: '你好!有什么可以帮你?'" in out
    assert "think: '打招呼。'" in out
    assert out.rstrip().endswith("对话完成")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_the_seed_curl_calls(email: Email, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.scenario = Scenario(content="今天晴。", reasoning="天气问题。")
    chat = await run(
        "curl", "-s", "-X", "POST", f"{email.url}/api/chat",
        "-H", "Content-Type: application/json",
        "-d", '{ "email": "user@example.com", "inp": "你好,今天天气怎么样?" }',
    )  # fmt: skip
    assert json.loads(chat) == {"status": True, "code": 200, "exit": 0}
    record = await run(
        "curl", "-s", "-X", "POST", f"{email.url}/api/record",
        "-H", "Content-Type: application/json",
        "-d", '{"email": "user@example.com"}',
    )  # fmt: skip
    assert json.loads(record) == {
        "text": [
            {"role": "user", "content": "你好,今天天气怎么样?"},
            {"role": "ai", "content": "今天晴。", "think": "天气问题。"},
        ],
        "code": 200,
    }


async def test_the_seed_httpie_calls(email: Email, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.scenario = Scenario(content="今天晴。")
    http = [sys.executable, "-m", "httpie", "--ignore-stdin"]
    host = email.url.removeprefix("http://")
    chat = await run(*http, "POST", f"{host}/api/chat", "email=user@example.com", "inp=你好,今天天气怎么样?")
    assert json.loads(chat) == {"status": True, "code": 200, "exit": 0}
    record = json.loads(await run(*http, "POST", f"{host}/api/record", "email=user@example.com"))
    assert [(e["role"], e["content"]) for e in record["text"]] == [
        ("user", "你好,今天天气怎么样?"),
        ("ai", "今天晴。"),
    ]


# --- interrupt ---


async def wait_for_partial(email: Email, address: str, showing: str = "") -> dict[str, Any]:
    """The record once the reply being generated shows some text (``showing``, when given)."""
    async with asyncio.timeout(10):
        while True:
            record = await email.record(address)
            partial = record["text"][-1]["content"] if record["text"] else ""
            if record["code"] == 201 and partial and showing in partial:
                return record
            await asyncio.sleep(0.02)


async def test_a_newer_chat_interrupts_and_answers_with_the_partial_exchange_in_context(
    email: Email, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.script(
        Scenario(content=" ".join(f"word{i}" for i in range(400)), token_delay=0.01, reasoning="r"),
        Scenario(content="Second answer.", reasoning="r2"),
    )
    first = asyncio.create_task(email.chat("a@example.com", "Tell me a long story"))
    # Wait for two words, not one: on a busy machine the first flush may hold only "word0".
    await wait_for_partial(email, "a@example.com", showing="word1")
    second = await email.chat("a@example.com", "Stop, answer this instead")
    # The interrupted caller hears exit 1; the upstream saw its request go away.
    assert (await first).json() == {"status": True, "code": 200, "exit": 1}
    assert second.json() == {"status": True, "code": 200, "exit": 0}
    assert len(fake_deepseek.disconnects) == 1
    record = await email.record("a@example.com")
    assert record["code"] == 200
    roles = [(e["role"], e.get("status")) for e in record["text"]]
    assert roles == [("user", None), ("ai", "interrupted"), ("user", None), ("ai", None)]
    partial = record["text"][1]["content"]
    assert partial.startswith("word0 word1")
    assert not partial.endswith("word399")
    # The new reply was asked with the partial exchange before it (reasoning never sent back).
    sent = chat_requests(fake_deepseek)[1]["messages"]
    assert sent == [
        {"role": "user", "content": "Tell me a long story"},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "Stop, answer this instead"},
    ]


async def test_twenty_emails_chat_at_once_each_in_their_own_conversation(
    email: Email, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(token_delay=0.005, tokens=20, reasoning_tokens=2)
    addresses = [f"user{i}@example.com" for i in range(20)]
    answers = await asyncio.gather(*(email.chat(a, f"I am {a}, hello") for a in addresses))
    assert [r.json() for r in answers] == [{"status": True, "code": 200, "exit": 0}] * 20
    assert fake_deepseek.disconnects == []
    for address in addresses:
        record = await email.record(address)
        assert [e["role"] for e in record["text"]] == ["user", "ai"]
        assert record["text"][0]["content"] == f"I am {address}, hello"
        # The fake's default reply repeats the question's first words: this email's, no one else's.
        assert record["text"][1]["content"].startswith(f"You said I am {address},")
        assert "status" not in record["text"][1]


# --- live record ---


async def test_the_record_grows_while_generating_then_is_complete(
    email: Email, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(content=" ".join(f"w{i}" for i in range(100)), token_delay=0.02)
    chat = asyncio.create_task(email.chat("live@example.com", "count slowly"))
    seen = [await wait_for_partial(email, "live@example.com")]
    while seen[-1]["code"] == 201:
        await asyncio.sleep(0.1)
        seen.append(await email.record("live@example.com"))
    assert (await chat).json()["exit"] == 0
    growing = [r["text"][-1]["content"] for r in seen if r["code"] == 201]
    # Each poll shows at least what the last one did, and the reply was seen growing; a busy
    # machine may stall a flush past one poll, so two polls may show the same text.
    assert all(b.startswith(a) for a, b in itertools.pairwise(growing))
    assert len(set(growing)) >= 2
    assert seen[-1]["text"][-1]["content"] == " ".join(f"w{i}" for i in range(100))
    assert all("status" not in r["text"][-1] for r in seen)


# --- access and bad input ---


async def test_the_allow_list_matches_exact_addresses_and_domains_case_insensitively(
    email_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    config = email_config('allow = ["Boss@Example.com", "*@Team.example"]\n')
    email = Email(await gateway_factory(config))  # type: ignore[arg-type,misc]
    for allowed in ("boss@example.com", "BOSS@EXAMPLE.COM", "anyone@team.example", "x@TEAM.EXAMPLE"):
        assert (await email.chat(allowed, "hi")).json()["status"] is True
    for refused in ("other@example.com", "boss@example.org", "a@sub.team.example"):
        for path in ("/api/chat", "/api/record", "/api/clear"):
            response = await email.http.post(path, json={"email": refused, "inp": "hi"})
            assert response.status_code == 403
            assert response.json() == {
                "status": False,
                "code": 403,
                "error": f"{refused} is not allowed to use this service; ask the operator to add it",
            }
    # One conversation per address, whatever its case.
    record = await email.record("Boss@example.COM")
    assert [e["role"] for e in record["text"]] == ["user", "ai", "user", "ai"]
    assert await email.gateway.services.accounts.find_user("other@example.com") is None


NO_INP = "field 'inp' is missing or empty; send the message as a string"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", 'the request body is not valid JSON (JSON is malformed: object keys must be strings (byte 1)); send a JSON object like {"email": "you@example.com"}'),  # noqa: E501
        (b"[]", 'the body must be a JSON object like {"email": "you@example.com"}'),
        (b'{"inp": "hi"}', "field 'email' is missing"),
        (b'{"email": "nobody", "inp": "hi"}', "field 'email' must be an email address, got 'nobody'"),
        (b'{"email": 7, "inp": "hi"}', "field 'email' must be an email address, got 7"),
        (b'{"email": "a@example.com"}', NO_INP),
        (b'{"email": "a@example.com", "inp": "  "}', NO_INP),
        (b'{"email": "a@example.com", "inp": ["hi"]}', NO_INP),
        (b'{"email": "a@x.io", "inp": "hi", "stream": 1}', "field 'stream' must be true or false, got 1"),
    ],
)  # fmt: skip
async def test_bad_input_is_400_naming_the_field_and_writes_nothing(
    email: Email, fake_deepseek: FakeUpstream, body: bytes, error: str
) -> None:
    response = await email.http.post("/api/chat", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"status": False, "code": 400, "error": error}
    assert fake_deepseek.requests == []
    assert await email.gateway.services.accounts.list_users() == []


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"email": ["x" * 1000] * 900, "inp": "hi"}, "field 'email' must be an email address, got ['xxxx"),
        (
            {"email": "a@x.io", "inp": "hi", "stream": "y" * 900_000},
            "field 'stream' must be true or false, got 'yy",
        ),
    ],
)
async def test_a_huge_bad_value_is_echoed_cut_short(
    email: Email, fake_deepseek: FakeUpstream, body: dict[str, Any], error: str
) -> None:
    raw = json.dumps(body).encode()
    assert len(raw) > 800_000  # under the 1 MB limit on bodies
    response = await email.http.post("/api/chat", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    answer = response.json()
    assert (answer["status"], answer["code"]) == (False, 400)
    assert answer["error"].startswith(error)
    assert answer["error"].endswith("…")
    assert len(answer["error"]) < 120
    assert len(response.content) < 300
    assert fake_deepseek.requests == []
    assert await email.gateway.services.accounts.list_users() == []


async def test_an_input_larger_than_the_context_is_400_and_interrupts_nothing(
    email_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    small = MODELS.replace(
        "context_tokens = 65536\nmax_output_tokens = 4096", "context_tokens = 600\nmax_output_tokens = 100"
    )
    email = Email(await gateway_factory(email_config(models=small)))  # type: ignore[arg-type,misc]
    fake_deepseek.scenario = Scenario(content=" ".join(f"w{i}" for i in range(90)), token_delay=0.01)
    running = asyncio.create_task(email.chat("a@example.com", "hello"))
    await wait_for_partial(email, "a@example.com")
    response = await email.chat("a@example.com", "word " * 3000)
    assert response.status_code == 400
    assert response.json()["error"].startswith("field 'inp' is too long: the input needs about")
    # The reply that was running finished undisturbed, and nothing was added.
    assert (await running).json() == {"status": True, "code": 200, "exit": 0}
    record = await email.record("a@example.com")
    assert [(e["role"], e.get("status")) for e in record["text"]] == [("user", None), ("ai", None)]
    assert fake_deepseek.disconnects == []


async def test_an_oversized_body_is_413_in_the_seed_shape(email: Email) -> None:
    oversized = json.dumps({"email": "a@example.com", "inp": "x" * 2_000_000})
    response = await email.http.post(
        "/api/chat", content=oversized, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"] == "the request body is larger than this server's limit of 1048576 bytes"


def test_without_an_allow_list_only_a_loopback_client_without_proxy_headers_is_local() -> None:
    # The client addresses a real server on this machine cannot be called from (the
    # real-HTTP tests below cover loopback callers, proxy headers and proxies).
    from litestar import Request

    def local(client: tuple[str, int] | None, *headers: tuple[bytes, bytes]) -> bool:
        scope = {"type": "http", "client": client, "server": ("127.0.0.1", 8000), "headers": list(headers)}
        return local_caller(Request(scope))  # type: ignore[arg-type]

    assert local(("127.0.0.1", 5000))
    assert local(("127.0.0.5", 5000))
    assert local(("::1", 5000))
    assert local(("::ffff:127.0.0.1", 5000))
    assert local(None)  # a Unix socket
    assert not local(("10.0.0.5", 5000))  # whatever address the server listens on
    assert not local(("203.0.113.7", 5000))
    assert not local(("testclient", 5000))
    for header in PROXY_HEADERS:
        assert not local(("127.0.0.1", 5000), (header, b"127.0.0.1"))
    assert local(("127.0.0.1", 5000), (b"user-agent", b"curl/8.5"), (b"accept", b"*/*"))


# --- long memory ---

SMALL = MODELS.replace(
    "context_tokens = 65536\nmax_output_tokens = 4096", "context_tokens = 700\nmax_output_tokens = 100"
)
BUDGET = 600
UNLIMITED = "requests_per_minute = 0\ntokens_per_day = 0\n"  # long conversations, faster than any email


def summarizer(body: dict[str, Any]) -> Scenario | None:
    """A faithful summarizer: keeps every ``fact-N`` it is shown (the summary so far included)."""
    if not is_summary(body):
        return None
    facts = sorted(set(re.findall(r"fact-\d+", body["messages"][-1]["content"])), key=lambda f: int(f[5:]))
    return Scenario(content=" ".join(facts), thinking=False)


def prompt_tokens(body: dict[str, Any]) -> int:
    return estimate_prompt_tokens(
        [ChatMessage(role=m["role"], content=m["content"]) for m in body["messages"]]
    )


async def test_a_long_conversation_fits_the_budget_and_remembers_its_start(
    email_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    config = email_config(
        'system_prompt = "You are terse."\n' + UNLIMITED, model="deepseek-chat", models=SMALL
    )
    email = Email(await gateway_factory(config))  # type: ignore[arg-type,misc]
    fake_deepseek.responder = summarizer
    fake_deepseek.scenario = Scenario(tokens=12)
    for turn in range(120):
        response = await email.chat("long@example.com", f"Remember fact-{turn}: item {turn} is blue.")
        assert response.json()["exit"] == 0, response.text
    bodies = [r.body for r in fake_deepseek.requests]
    replies = chat_requests(fake_deepseek)
    assert len(replies) == 120
    assert 2 <= len(bodies) - len(replies) <= 40  # folded now and then, not on every turn
    for body in replies:
        assert prompt_tokens(body) <= BUDGET
        assert body["messages"][0] == {"role": "system", "content": "You are terse."}
        assert all("reasoning_content" not in m for m in body["messages"])
    for body in bodies:
        assert prompt_tokens(body) <= BUDGET
    # The last turn still carries the first: through the summary the model wrote.
    last = replies[-1]["messages"]
    assert last[1]["role"] == "system"
    assert last[1]["content"].startswith(SUMMARY_PREAMBLE)
    assert "fact-0 " in last[1]["content"]
    assert "fact-1 " in last[1]["content"]
    assert last[-1] == {"role": "user", "content": "Remember fact-119: item 119 is blue."}
    # The record keeps every message; the summary only shortens what goes upstream.
    assert len((await email.record("long@example.com"))["text"]) == 240


async def test_without_summaries_the_oldest_turns_are_dropped(
    email_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    config = email_config("summarize = false\n" + UNLIMITED, model="deepseek-chat", models=SMALL)
    email = Email(await gateway_factory(config))  # type: ignore[arg-type,misc]
    fake_deepseek.scenario = Scenario(tokens=12)
    for turn in range(40):
        assert (await email.chat("drop@example.com", f"fact-{turn} here")).json()["exit"] == 0
    replies = chat_requests(fake_deepseek)
    assert len(replies) == len(fake_deepseek.requests) == 40
    assert all(prompt_tokens(b) <= BUDGET for b in replies)
    last = replies[-1]["messages"]
    assert last[0]["content"] != "fact-0 here"
    assert last[0]["role"] == "user"
    assert last[-1]["content"] == "fact-39 here"
    assert len(last) < 79


async def test_a_failed_summary_drops_turns_for_now_and_folds_them_later(
    email_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    config = email_config(UNLIMITED, model="deepseek-chat", models=SMALL)
    email = Email(await gateway_factory(config))  # type: ignore[arg-type,misc]
    broken = {"on": True}

    def flaky(body: dict[str, Any]) -> Scenario | None:
        if is_summary(body) and broken["on"]:
            return Scenario(status=503)
        return summarizer(body)

    fake_deepseek.responder = flaky
    fake_deepseek.scenario = Scenario(tokens=12)
    for turn in range(80):
        assert (await email.chat("flaky@example.com", f"fact-{turn} noted")).json()["exit"] == 0
        if any(is_summary(r.body) for r in fake_deepseek.requests):
            break
    else:
        pytest.fail("80 turns never needed a summary")
    assert prompt_tokens(chat_requests(fake_deepseek)[-1]) <= BUDGET
    broken["on"] = False
    assert (await email.chat("flaky@example.com", "and now?")).json()["exit"] == 0
    last = chat_requests(fake_deepseek)[-1]["messages"]
    assert last[0]["content"].startswith(SUMMARY_PREAMBLE)
    assert "fact-0 " in last[0]["content"]


# --- failures ---


async def test_an_upstream_failure_is_500_and_keeps_the_record_consistent(
    email: Email, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.script(Scenario(content="First answer."), Scenario(status=503, message="Server overloaded"))
    assert (await email.chat("f@example.com", "one")).json()["exit"] == 0
    response = await email.chat("f@example.com", "two")
    assert response.status_code == 500
    body = response.json()
    assert body["status"] is False
    assert body["code"] == 500
    assert "Server overloaded" in body["error"]
    assert "sk-" not in body["error"]
    record = await email.record("f@example.com")
    assert [(e["role"], e["content"], e.get("status")) for e in record["text"]] == [
        ("user", "one", None),
        ("ai", "First answer.", None),
        ("user", "two", None),
        ("ai", "", "error"),
    ]
    # A later question goes up without the failed, empty reply.
    fake_deepseek.scenario = Scenario(content="Third answer.")
    assert (await email.chat("f@example.com", "three")).json()["exit"] == 0
    assert [m["content"] for m in chat_requests(fake_deepseek)[-1]["messages"]] == [
        "one",
        "First answer.",
        "two\n\nthree",
    ]


async def test_a_stream_broken_midway_keeps_its_partial_reply_marked_error(
    email: Email, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(
        content="one two three four five six", disconnect_after=4, thinking=False
    )
    response = await email.chat("cut@example.com", "go")
    assert response.status_code == 500
    [_, reply] = (await email.record("cut@example.com"))["text"]
    assert reply["status"] == "error"
    assert reply["content"] == "one two three"


async def test_the_record_survives_a_restart(
    email_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    config = email_config()
    first = Email(await gateway_factory(config))  # type: ignore[arg-type,misc]
    fake_deepseek.scenario = Scenario(content="Kept.", reasoning="Thought.")
    assert (await first.chat("r@example.com", "remember me")).json()["exit"] == 0
    before = await first.record("r@example.com")
    second = Email(await gateway_factory(config))  # type: ignore[arg-type,misc]
    assert await second.record("r@example.com") == before


# --- beyond the seed ---


async def test_clear_starts_a_fresh_context(email: Email, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.scenario = Scenario(content="Noted.")
    assert (await email.chat("c@example.com", "my name is Ada")).json()["exit"] == 0
    response = await email.http.post("/api/clear", json={"email": "C@example.com"})
    assert response.json() == {"status": True, "code": 200}
    assert await email.record("c@example.com") == {"text": [], "code": 200}
    assert (await email.chat("c@example.com", "what is my name?")).json()["exit"] == 0
    assert chat_requests(fake_deepseek)[-1]["messages"] == [{"role": "user", "content": "what is my name?"}]
    # Clearing twice in a row makes one fresh conversation, not two.
    await email.http.post("/api/clear", json={"email": "c@example.com"})
    await email.http.post("/api/clear", json={"email": "c@example.com"})
    user = await email.gateway.services.accounts.find_user("c@example.com")
    assert user is not None
    assert len(await email.gateway.services.conversations.list(user.id, "email")) == 3


def events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: ")]


async def test_a_streamed_chat_sends_think_and_content_deltas_then_the_end(
    email: Email, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(content="Hello there friend", reasoning="Greet back.")
    async with email.http.stream(
        "POST", "/api/chat", json={"email": "s@example.com", "inp": "hi", "stream": True}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        received = events((await response.aread()).decode())
    assert "".join(e.get("think", "") for e in received) == "Greet back."
    assert "".join(e.get("content", "") for e in received) == "Hello there friend"
    assert received[-1] == {"status": True, "code": 200, "exit": 0}
    record = await email.record("s@example.com")
    assert record["text"][-1] == {"role": "ai", "content": "Hello there friend", "think": "Greet back."}


async def test_a_streamed_chat_is_interrupted_like_any_other(
    email: Email, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.script(
        Scenario(content=" ".join(f"w{i}" for i in range(300)), token_delay=0.01), Scenario(content="ok")
    )

    async def stream() -> list[dict[str, Any]]:
        body = {"email": "si@example.com", "inp": "long", "stream": True}
        async with email.http.stream("POST", "/api/chat", json=body) as response:
            return events((await response.aread()).decode())

    first = asyncio.create_task(stream())
    await wait_for_partial(email, "si@example.com")
    assert (await email.chat("si@example.com", "short")).json()["exit"] == 0
    received = await first
    assert received[-1] == {"status": True, "code": 200, "exit": 1}
    assert len("".join(e.get("content", "") for e in received)) > 0


PRICED = MODELS.replace(
    'provider = "deepseek"\n', 'provider = "deepseek"\ninput_price = 1000\noutput_price = 2000\n'
)


async def settled_ledger(services: Any, user_id: int) -> list[Any]:
    """The user's ledger, newest first, once no reservation of it is still open."""
    async with asyncio.timeout(10):
        while True:
            ledger = await services.billing.store.list_ledger(user_id)
            if ledger and not any(e.kind == "reservation" for e in ledger):
                return ledger  # type: ignore[no-any-return]
            await asyncio.sleep(0.01)


async def test_an_email_never_spends_the_balance_of_the_key_holder_with_its_address(
    email_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    email = Email(await gateway_factory(email_config(model="deepseek-chat", models=PRICED)))  # type: ignore[arg-type,misc]
    services = email.gateway.services
    key, _ = await services.accounts.create_key("holder@example.com")
    await services.billing.top_up(key.user_id, 100_000_000)
    fake_deepseek.scenario = Scenario(content="Free for you.")
    assert (await email.chat("holder@example.com", "hi there")).json() == {
        "status": True,
        "code": 200,
        "exit": 0,
    }
    ledger = await settled_ledger(services, key.user_id)
    assert (await services.accounts.get_user(key.user_id)).balance == 100_000_000
    [usage, topup] = ledger
    assert topup.kind == "topup"
    # Recorded under the email, keyless, at its real tokens, model and provider: at no cost.
    assert (usage.kind, usage.amount, usage.key_id) == ("charge", 0, None)
    assert (usage.model, usage.provider, usage.outcome) == ("deepseek-chat", "deepseek", "ok")
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.balance_after == 100_000_000


async def test_a_new_email_chats_on_a_priced_model_with_nothing_in_its_balance(
    email_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    email = Email(await gateway_factory(email_config(model="deepseek-chat", models=PRICED)))  # type: ignore[arg-type,misc]
    fake_deepseek.scenario = Scenario(content="Welcome.")
    assert (await email.chat("new@example.com", "hi")).json() == {"status": True, "code": 200, "exit": 0}
    record = await email.record("new@example.com")
    assert [(e["role"], e["content"]) for e in record["text"]] == [("user", "hi"), ("ai", "Welcome.")]
    services = email.gateway.services
    user = await services.accounts.find_user("new@example.com")
    assert user is not None
    [usage] = await settled_ledger(services, user.id)
    assert (usage.amount, usage.key_id, usage.model) == (0, None, "deepseek-chat")
    assert (await services.accounts.get_user(user.id)).balance == 0


async def test_past_its_requests_per_minute_an_email_gets_429_and_nothing_is_stored(
    email_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    email = Email(await gateway_factory(email_config("requests_per_minute = 2\n")))  # type: ignore[arg-type,misc]
    long = " ".join(f"w{i}" for i in range(200))
    fake_deepseek.script(Scenario(content="ok"), Scenario(content=long, token_delay=0.01))
    assert (await email.chat("busy@example.com", "one")).json()["exit"] == 0
    # The email's second chat is a long reply, still running when its third is refused:
    # a chat the quota refuses interrupts nothing, not even its own email's reply.
    running = asyncio.create_task(email.chat("busy@example.com", "two"))
    await wait_for_partial(email, "busy@example.com", showing="w1")
    response = await email.chat("busy@example.com", "three")
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    body = response.json()
    assert (body["status"], body["code"]) == (False, 429)
    assert body["error"].startswith("too many requests: this email may send 2 a minute; retry in ")
    assert (await running).json() == {"status": True, "code": 200, "exit": 0}
    record = await email.record("busy@example.com")
    assert record["code"] == 200
    assert [(e["role"], e["content"], e.get("status")) for e in record["text"]] == [
        ("user", "one", None),
        ("ai", "ok", None),
        ("user", "two", None),
        ("ai", long, None),
    ]
    assert len(chat_requests(fake_deepseek)) == 2
    assert fake_deepseek.disconnects == []
    # Each email has its own minute.
    fake_deepseek.scenario = Scenario(content="ok")
    assert (await email.chat("other@example.com", "again")).json()["exit"] == 0


async def test_an_admitted_question_cancelled_again_while_giving_back_its_reservation_still_does(
    email: Email, fake_deepseek: FakeUpstream
) -> None:
    # Only a stopping server cancels a handler, and not twice on cue: the conversations service
    # is driven directly, in the gateway's own process and loop, with its real store.
    services = email.gateway.services
    store = services.billing.store
    route = services.catalog.route("deepseek-reasoner")
    user = await services.accounts.ensure_user("twice@example.com")
    conversation = await services.conversations.create(user.id, "email")
    payer = Payer(quota=Quota(requests_per_minute=5))
    admitted = await services.conversations.admit(user.id, route, "hi", payer=payer)
    assert admitted is not None
    # Another connection's transaction holds the store's writes back, and one write waits
    # taken up: whatever the question writes next stays queued, and a queued write whose
    # caller is cancelled is skipped.
    other = sqlite3.connect(store.path, isolation_level=None)  # type: ignore[attr-defined]
    other.execute("BEGIN IMMEDIATE")
    try:
        held = asyncio.ensure_future(services.billing.top_up(user.id, 1))
        await asyncio.sleep(0)  # its write is queued
        async with asyncio.timeout(5):
            while True:
                if store._worker._queue.empty():  # type: ignore[attr-defined]  # and taken up
                    break
                await asyncio.sleep(0.001)
        asking = asyncio.ensure_future(
            services.conversations.ask(conversation, route, "hi", payer=payer, admitted=admitted)
        )
        await asyncio.sleep(0)  # it runs until it waits
        async with asyncio.timeout(10):
            while not asking.done():  # cancelled, then again whatever it waits for next
                asking.cancel()
                await asyncio.sleep(0)
        assert asking.cancelled()
    finally:
        other.rollback()
        other.close()
    await held
    async with asyncio.timeout(10):
        while True:
            entry = await store.get_ledger_entry(admitted.entry.id)
            if entry.kind != "reservation":
                break
            await asyncio.sleep(0.01)
    assert (entry.amount, entry.outcome) == (0, "not_sent")
    assert await services.conversations.messages(conversation) == []


async def test_past_its_tokens_per_day_an_email_gets_429(
    email_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    email = Email(await gateway_factory(email_config("tokens_per_day = 50\n")))  # type: ignore[arg-type,misc]
    fake_deepseek.scenario = Scenario(content=" ".join(f"word{i}" for i in range(60)), thinking=False)
    assert (await email.chat("wordy@example.com", "talk")).json()["exit"] == 0
    user = await email.gateway.services.accounts.find_user("wordy@example.com")
    assert user is not None
    [usage] = await settled_ledger(email.gateway.services, user.id)
    assert usage.prompt_tokens + usage.completion_tokens >= 50
    response = await email.chat("wordy@example.com", "more")
    assert response.status_code == 429
    assert 23 * 3600 < int(response.headers["Retry-After"]) <= 24 * 3600
    assert "this email has used its 50 tokens of the last 24 hours" in response.json()["error"]
    assert [e["content"] for e in (await email.record("wordy@example.com"))["text"]][0::2] == ["talk"]
    assert len(chat_requests(fake_deepseek)) == 1


async def test_an_address_over_254_characters_is_400_short_and_creates_nothing(
    email: Email, fake_deepseek: FakeUpstream
) -> None:
    address = "a" * 288 + "@example.com"
    for path in ("/api/chat", "/api/record", "/api/clear"):
        response = await email.http.post(path, json={"email": address, "inp": "hi"})
        assert response.status_code == 400
        assert response.json() == {
            "status": False,
            "code": 400,
            "error": "field 'email' is longer than 254 characters",
        }
    assert await email.gateway.services.accounts.list_users() == []
    assert fake_deepseek.requests == []
    assert (await email.chat("b" * 242 + "@example.com", "hi")).status_code == 200  # 254 exactly


async def test_a_new_email_refused_for_a_too_long_input_is_not_created(
    email_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    email = Email(await gateway_factory(email_config(model="deepseek-chat", models=SMALL)))  # type: ignore[arg-type,misc]
    response = await email.chat("verbose@example.com", "word " * 3000)
    assert response.status_code == 400
    assert response.json()["error"].startswith("field 'inp' is too long")
    assert await email.gateway.services.accounts.list_users() == []
    assert fake_deepseek.requests == []


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/json"],
)
async def test_a_body_not_declared_json_is_415_and_writes_nothing(
    email: Email, fake_deepseek: FakeUpstream, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = json.dumps({"email": "a@example.com", "inp": "hi"})
    for path in ("/api/chat", "/api/record", "/api/clear"):
        response = await email.http.post(path, content=body, headers=headers)
        assert response.status_code == 415
        error = response.json()["error"]
        assert response.json() == {"status": False, "code": 415, "error": error}
        assert "Content-Type: application/json" in error
    assert await email.gateway.services.accounts.list_users() == []
    assert fake_deepseek.requests == []


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", "application/x+json"]
)
async def test_json_content_types_with_parameters_or_a_json_suffix_are_accepted(
    email: Email, content_type: str
) -> None:
    body = json.dumps({"email": "a@example.com", "inp": "hi"})
    response = await email.http.post("/api/chat", content=body, headers={"Content-Type": content_type})
    assert response.json() == {"status": True, "code": 200, "exit": 0}


# --- who is calling ---


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-Forwarded-For", "127.0.0.1"),
        ("Forwarded", "for=127.0.0.1"),
        ("X-Real-IP", "127.0.0.1"),
        ("Via", "1.1 proxy"),
        ("X-Forwarded-Host", "chat.example.com"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Port", "443"),
        ("X-Client-IP", "127.0.0.1"),
        ("CF-Connecting-IP", "127.0.0.1"),
        ("True-Client-IP", "127.0.0.1"),
        ("X-Cluster-Client-IP", "127.0.0.1"),
        ("Forwarded-For", "127.0.0.1"),
    ],
)
async def test_without_an_allow_list_a_request_with_a_proxy_header_is_403_and_writes_nothing(
    email: Email, fake_deepseek: FakeUpstream, header: str, value: str
) -> None:
    for path in ("/api/chat", "/api/record", "/api/clear"):
        response = await email.http.post(
            path, json={"email": "a@example.com", "inp": "hi"}, headers={header: value}
        )
        assert response.status_code == 403
        assert response.json() == {
            "status": False,
            "code": 403,
            "error": "a@example.com is not allowed to use this service; ask the operator to add it",
        }
    assert await email.gateway.services.accounts.list_users() == []
    assert fake_deepseek.requests == []
    # The same request from this machine, without the header, is let in.
    assert (await email.chat("a@example.com", "hi")).json() == {"status": True, "code": 200, "exit": 0}


@asynccontextmanager
async def proxy(target: str, header: bytes) -> AsyncIterator[str]:
    """A reverse proxy in miniature on loopback: passes each connection on to ``target``, adding
    ``header`` to its request, as nginx adds X-Forwarded-For; yields its base URL."""
    host, port = target.removeprefix("http://").split(":")

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        request_line, _, rest = (await reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
        up_writer.write(request_line + b"\r\n" + header + b"\r\n" + rest)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port_ = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port_}"
    finally:
        server.close()


async def test_behind_a_proxy_without_an_allow_list_everyone_is_refused(
    email: Email, fake_deepseek: FakeUpstream
) -> None:
    async with (
        proxy(email.url, b"X-Forwarded-For: 203.0.113.7") as url,
        httpx.AsyncClient(base_url=url, headers={"Connection": "close"}) as client,
    ):
        for path in ("/api/chat", "/api/record", "/api/clear"):
            response = await client.post(path, json={"email": "a@example.com", "inp": "hi"})
            assert response.status_code == 403
            assert response.json()["error"].startswith("a@example.com is not allowed")
    assert await email.gateway.services.accounts.list_users() == []
    assert fake_deepseek.requests == []


async def test_behind_a_proxy_the_allow_list_decides(
    email_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    email = Email(await gateway_factory(email_config('allow = ["*@example.com"]\n')))  # type: ignore[arg-type,misc]
    fake_deepseek.scenario = Scenario(content="Through the proxy.", thinking=False)
    async with (
        proxy(email.url, b"X-Forwarded-For: 203.0.113.7") as url,
        httpx.AsyncClient(base_url=url, headers={"Connection": "close"}, timeout=30) as client,
    ):
        response = await client.post("/api/chat", json={"email": "a@example.com", "inp": "hi"})
        assert response.json() == {"status": True, "code": 200, "exit": 0}
        record = (await client.post("/api/record", json={"email": "a@example.com"})).json()
        assert [e["content"] for e in record["text"]] == ["hi", "Through the proxy."]
        refused = await client.post("/api/chat", json={"email": "a@example.org", "inp": "hi"})
        assert refused.status_code == 403
    assert await email.gateway.services.accounts.find_user("a@example.org") is None


async def test_a_server_stopped_mid_reply_keeps_the_partial_reply_interrupted(
    email_config: Callable[..., Path], server_process: Servers, fake_deepseek: FakeUpstream
) -> None:
    config = email_config()
    config.write_text(config.read_text().replace("[server]\n", "[server]\nshutdown_grace = 1\n"))
    url = await asyncio.to_thread(server_process, config)
    fake_deepseek.scenario = Scenario(content=" ".join(f"w{i}" for i in range(2000)), token_delay=0.005)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        chat = asyncio.create_task(
            client.post("/api/chat", json={"email": "stop@example.com", "inp": "go on"})
        )
        async with asyncio.timeout(10):
            while True:
                record = (await client.post("/api/record", json={"email": "stop@example.com"})).json()
                if record["code"] == 201 and len(record["text"][-1]["content"]) > 20:
                    break
                await asyncio.sleep(0.05)
        seen = record["text"][-1]["content"]
        await asyncio.to_thread(server_process.stop, url)
        # The caller hears that its reply was interrupted, in the seed's shape.
        assert (await chat).json() == {"status": True, "code": 200, "exit": 1}
    url = await asyncio.to_thread(server_process, config)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        record = (await client.post("/api/record", json={"email": "stop@example.com"})).json()
    assert record["code"] == 200
    [question, reply] = record["text"]
    assert question == {"role": "user", "content": "go on"}
    assert reply["status"] == "interrupted"
    assert reply["content"].startswith("w0 w1 w2")
    assert reply["content"].startswith(seen)


async def test_two_first_messages_at_once_make_one_conversation(
    email: Email, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(content=" ".join(f"w{i}" for i in range(30)), token_delay=0.01)
    answers = await asyncio.gather(*(email.chat("twin@example.com", f"question {i}") for i in range(2)))
    assert sorted(r.json()["exit"] for r in answers) == [0, 1]
    record = await email.record("twin@example.com")
    assert sorted(e["content"] for e in record["text"] if e["role"] == "user") == ["question 0", "question 1"]
    user = await email.gateway.services.accounts.find_user("twin@example.com")
    assert user is not None
    assert len(await email.gateway.services.conversations.list(user.id, "email")) == 1


async def test_clear_during_a_reply_interrupts_it_and_keeps_it_in_the_old_conversation(
    email: Email, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(content=" ".join(f"w{i}" for i in range(300)), token_delay=0.01)
    chat = asyncio.create_task(email.chat("busy@example.com", "talk a while"))
    await wait_for_partial(email, "busy@example.com")
    assert (await email.http.post("/api/clear", json={"email": "busy@example.com"})).status_code == 200
    assert (await chat).json() == {"status": True, "code": 200, "exit": 1}
    assert await email.record("busy@example.com") == {"text": [], "code": 200}
    services = email.gateway.services
    user = await services.accounts.find_user("busy@example.com")
    assert user is not None
    old, new = await services.conversations.list(user.id, "email")
    messages = await services.conversations.messages(old)
    assert [(m.role, m.status) for m in messages] == [("user", "complete"), ("assistant", "interrupted")]
    assert await services.conversations.messages(new) == []


async def test_a_newer_question_does_not_wait_for_an_older_ones_summary(
    email_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    email = Email(await gateway_factory(email_config(UNLIMITED, model="deepseek-chat", models=SMALL)))  # type: ignore[arg-type,misc]
    slow = {"left": 1}

    def responder(body: dict[str, Any]) -> Scenario | None:
        if is_summary(body) and slow["left"]:
            slow["left"] -= 1
            return Scenario(content="slow summary", delay=5)
        return summarizer(body)

    fake_deepseek.responder = responder
    fake_deepseek.scenario = Scenario(tokens=12)
    for turn in range(80):
        older = asyncio.create_task(email.chat("sum@example.com", f"fact-{turn} noted"))
        done, _ = await asyncio.wait({older}, timeout=1)
        if not done:
            break  # this question is waiting for its context's summary
    else:
        pytest.fail("80 turns never needed a summary")
    started = asyncio.get_running_loop().time()
    newer = await email.chat("sum@example.com", "newer question")
    assert asyncio.get_running_loop().time() - started < 4
    assert (await older).json() == {"status": True, "code": 200, "exit": 1}
    assert newer.json() == {"status": True, "code": 200, "exit": 0}
    await fake_deepseek.wait_for_disconnect(1)  # the slow summary request was closed
    texts = [(e["role"], e["content"]) for e in (await email.record("sum@example.com"))["text"]]
    assert texts[-3:-1] == [("user", f"fact-{turn} noted"), ("user", "newer question")]
    last = chat_requests(fake_deepseek)[-1]["messages"]
    assert last[-1] == {"role": "user", "content": f"fact-{turn} noted\n\nnewer question"}
