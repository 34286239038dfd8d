"""The SSE decoder: whatever way the bytes are cut, the same events come out."""

from __future__ import annotations

import pytest

from providers.sse import SSEDecoder

STREAM = (
    b": keep-alive\n\n"
    b": keep-alive\r\n\r\n"
    b'data: {"a":1}\n\n'
    b'data:{"b":2}\r\n\r\n'
    b"event: message\nid: 7\nretry: 1000\n"
    b'data: {"c":\n'
    b"data: 3}\n\n"
    b"data:\n\n"
    b"event: ping\n\n"
    b"data: [DONE]\n\n"
)
EVENTS = [b'{"a":1}', b'{"b":2}', b'{"c":\n3}', b"[DONE]"]


def decode(chunks: list[bytes]) -> list[bytes]:
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + decoder.flush()


def test_whole_stream() -> None:
    assert decode([STREAM]) == EVENTS


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_any_single_cut(cut: int) -> None:
    assert decode([STREAM[:cut], STREAM[cut:]]) == EVENTS


def test_byte_by_byte() -> None:
    assert decode([bytes([b]) for b in STREAM]) == EVENTS


def test_comments_and_empty_events_produce_nothing() -> None:
    assert decode([b": keep-alive\n\n" * 5, b"data:\n\n", b"id: 1\n\n"]) == []


def test_a_last_event_without_its_blank_line_is_flushed() -> None:
    assert decode([b'data: {"x":1}\n\ndata: [DONE]']) == [b'{"x":1}', b"[DONE]"]
    assert decode([b"data: [DONE]\n"]) == [b"[DONE]"]


def test_a_leading_byte_order_mark_is_skipped() -> None:
    assert decode([b'\xef\xbb\xbfdata: {"x":1}\n\n']) == [b'{"x":1}']
