"""The conformance suite a web search plugin passes.

Subclass :class:`WebSearchConformance` in a test module, give it a query your
backend (or a fake of it) answers with results, and an opened instance::

    class TestMySearch(WebSearchConformance):
        query = "chatgate"

        @pytest_asyncio.fixture
        async def web_search(self):
            search = MySearch("my_search", MySearch.Options(...))
            await search.open()
            yield search
            await search.aclose()

The tests rely only on :class:`core.WebSearch`'s documented promises.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest

from core import WebResult, WebSearch


class WebSearchConformance:
    """What every web search plugin promises: lists of :class:`~core.WebResult`, at most
    ``limit`` of them, each with a title and an http(s) URL, from concurrent callers too."""

    pytestmark = pytest.mark.asyncio  # its tests run under pytest-asyncio's strict mode too

    query: ClassVar[str] = "chatgate"
    """A query the plugin under test answers with at least three results."""

    @pytest.fixture
    def web_search(self) -> WebSearch:
        raise NotImplementedError("override the web_search fixture: an opened instance of your plugin")

    async def test_it_answers_with_results(self, web_search: WebSearch) -> None:
        results = await web_search.search(self.query, 3)
        assert isinstance(results, list)
        assert results, f"no results for {self.query!r}: set `query` to one your backend answers"
        assert all(isinstance(result, WebResult) for result in results)

    @pytest.mark.parametrize("limit", [1, 3])
    async def test_it_never_gives_more_than_the_limit(self, web_search: WebSearch, limit: int) -> None:
        # The topic-chat surface puts every result into the prompt: the limit is the plugin's to keep.
        assert len(await web_search.search(self.query, limit)) <= limit

    async def test_each_result_has_a_title_and_a_web_address(self, web_search: WebSearch) -> None:
        for result in await web_search.search(self.query, 3):
            assert result.title.strip(), result
            assert result.url.startswith(("http://", "https://")), result

    async def test_concurrent_searches_each_get_their_own_answer(self, web_search: WebSearch) -> None:
        answers = await asyncio.gather(*(web_search.search(self.query, limit) for limit in (1, 2, 3)))
        assert [len(answer) <= limit for answer, limit in zip(answers, (1, 2, 3), strict=True)] == [True] * 3
        assert all(answer for answer in answers)
