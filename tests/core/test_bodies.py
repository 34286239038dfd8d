"""The shared body decoder, and bodies Litestar decodes itself (a third-party surface's ``data``)."""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Request, Router, post
from litestar.exceptions import HTTPException
from litestar.params import JSONBody
from litestar.response import Response

from core import RateLimits
from core.bodies import decode_body
from core.errors import InvalidBody
from core.hookspecs import hookimpl
from core.surface import Surface
from tests.conftest import RunningGateway

DEEP = b"[" * 50_000 + b"]" * 50_000


class Limits(msgspec.Struct, forbid_unknown_fields=True):
    email: str
    limits: RateLimits | None = None


@pytest.mark.parametrize(
    ("raw", "reason", "field"),
    [
        (b"", "empty", None),
        (b" \n", "empty", None),
        (b"{", "syntax", None),
        (DEEP, "depth", None),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "depth", None),
    ],
)
def test_every_bad_body_is_one_typed_error(raw: bytes, reason: str, field: str | None) -> None:
    with pytest.raises(InvalidBody) as caught:
        decode_body(raw)
    assert (caught.value.reason, caught.value.field) == (reason, field)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"{}", "email"),
        (b'{"email": 1}', "email"),
        (b'{"email": "a@b.c", "colour": 1}', "colour"),
        (b'{"email": "a@b.c", "limits": {"requests_per_minute": "ten"}}', "limits.requests_per_minute"),
        (b'{"email": "a@b.c", "limits": {"per_fortnight": 1}}', "limits.per_fortnight"),
        (b"[]", None),
    ],
)
def test_a_body_of_the_wrong_shape_names_the_field(raw: bytes, field: str | None) -> None:
    with pytest.raises(InvalidBody) as caught:
        decode_body(raw, Limits)
    assert (caught.value.reason, caught.value.field) == ("shape", field)
    if field:
        assert f"'{field}'" in str(caught.value)


def test_a_good_body_decodes() -> None:
    assert decode_body(b'{"email": "a@b.c"}', Limits) == Limits("a@b.c")
    assert decode_body(b"[" * 100 + b"]" * 100) is not None


class Item(msgspec.Struct):
    name: str


class Parrot(Surface):
    """A third-party surface whose handlers take ``data`` decoded by Litestar, in a shape of its own."""

    name = "parrot"

    def route_handlers(self, services: Any) -> Any:
        @post("/parrot/dict", status_code=200)
        async def as_dict(data: JSONBody[dict[str, Any]]) -> dict[str, Any]:
            return data

        @post("/parrot/struct", status_code=200)
        async def as_struct(data: JSONBody[Item]) -> Item:
            return data

        @post("/parrot/bug", status_code=200)
        async def bug() -> None:
            def forever(n: int) -> int:
                return forever(n + 1)

            forever(0)

        @post("/plain/dict", status_code=200)
        async def plain(data: JSONBody[dict[str, Any]]) -> dict[str, Any]:
            return data

        def own_shape(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
            return Response({"squawk": exc.detail}, status_code=exc.status_code)

        return [
            Router(
                "/", route_handlers=[as_dict, as_struct, bug], exception_handlers={HTTPException: own_shape}
            ),
            plain,
        ]


@pytest.fixture
async def parrot(write_config: Callable[..., Path], gateway_factory: Callable[..., object]) -> RunningGateway:
    plugin = types.SimpleNamespace(__name__="parrot", register_surfaces=hookimpl(lambda: [Parrot]))
    return await gateway_factory(write_config("[surfaces.parrot]\n"), extra_plugins=[plugin])  # type: ignore[no-any-return,misc]


async def test_a_deep_body_litestar_decodes_is_a_400_in_the_surfaces_own_shape(
    parrot: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    for path in ("/parrot/dict", "/parrot/struct"):
        response = await parrot.client.post(path, content=DEEP, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert "too deeply" in response.json()["squawk"]
    response = await parrot.client.post(
        "/plain/dict", content=DEEP, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert "too deeply" in response.json()["detail"]  # Litestar's own shape where the surface has none
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert (await parrot.client.post("/parrot/struct", json={"name": "polly"})).json() == {"name": "polly"}


async def test_a_recursion_bug_in_a_handler_is_still_a_500_in_the_log(
    parrot: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    response = await parrot.client.post("/parrot/bug")
    assert response.status_code == 500
    assert [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], RecursionError)]
