"""An incremental decoder for server-sent events, as OpenAI-style chat APIs send them.

Only what chat streams use is kept: ``data:`` fields, joined per event.
Comment lines (DeepSeek's ``: keep-alive`` while a request is queued) and the
``event:``, ``id:`` and ``retry:`` fields carry nothing a reply needs, so
they are skipped; blank lines end an event. It works on bytes, because
splitting bytes is several times cheaper than decoding text line by line and
the payloads go straight to a JSON decoder.
"""

from __future__ import annotations


class SSEDecoder:
    """Turns the byte chunks of a response into the ``data`` payloads of its events.

    Promises: chunks may split lines and events anywhere; ``\\n`` and
    ``\\r\\n`` line ends both work; an event's several ``data:`` lines are
    joined with ``\\n``; an event whose ``data`` is empty is not reported
    (clients crash on those, so nothing downstream should ever see one).
    """

    __slots__ = ("_data", "_started", "_tail")

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[bytes] = []
        self._started = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The payloads of the events that ``chunk`` completes, in order."""
        if not self._started and chunk:
            self._started = True
            if chunk.startswith(b"\xef\xbb\xbf"):  # the stream may begin with a UTF-8 BOM
                chunk = chunk[3:]
        if self._tail:
            chunk = self._tail + chunk
        lines = chunk.split(b"\n")
        self._tail = lines.pop()
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if line and line[-1] == 13:  # b"\r"
                line = line[:-1]
            if not line:
                if data:
                    payload = data[0] if len(data) == 1 else b"\n".join(data)
                    if payload:
                        events.append(payload)
                    data.clear()
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value[:1] == b" " else value)
        return events

    def flush(self) -> list[bytes]:
        """The payload of a last event the stream ended without terminating with a blank line."""
        if self._tail:
            return self.feed(b"\n\n")
        return self.feed(b"\n") if self._data else []
