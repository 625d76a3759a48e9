"""Incremental Server-Sent Events decoding (the WHATWG event-stream format).

Bytes arrive in arbitrary pieces: an event, a line, a CRLF pair or a multi-byte UTF-8 character
may be split across reads. The decoder keeps the unfinished line as bytes and only hands out the
`data` of complete events, so nothing is decoded before it is whole. This is the per-chunk hot
path: the common case (`data: {...}\\n\\n`, LF line ends) is a couple of `find` calls per event.
"""

from __future__ import annotations

DEFAULT_MAX_EVENT_BYTES = 8 * 1024 * 1024


class SSEProtocolError(Exception):
    """The stream is not valid SSE, or an event is larger than allowed."""


class SSEDecoder:
    """Feed raw bytes in, get each complete event's data (bytes, lines joined by LF) out.

    Only `data` fields matter to the protocols this service speaks; `event`, `id`, `retry` and
    comment lines are accepted and ignored.
    """

    __slots__ = ("_data", "_data_size", "_max_event_bytes", "_pending")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        # The unfinished last line (may end with a lone CR); a bytearray while a long line grows.
        self._pending: bytes | bytearray = b""
        self._data: list[bytes] = []
        self._data_size = 0
        self._max_event_bytes = max_event_bytes

    @property
    def buffered(self) -> int:
        """Bytes held for events not complete yet."""
        return len(self._pending) + self._data_size

    @property
    def has_partial_event(self) -> bool:
        """True when bytes of an event that has not ended are buffered."""
        return bool(self._pending.strip(b"\r\n")) or bool(self._data)

    def finish(self) -> list[bytes]:
        """Call at end of stream: a CR held back as a possible CRLF half is a line end."""
        return self.feed(b"\n") if self._pending[-1:] == b"\r" else []

    def feed(self, chunk: bytes) -> list[bytes]:
        """Consume `chunk`; return the data of every event it completed, in order."""
        if not self._pending and not self._data and chunk.endswith(b"\n\n"):
            # Whole events and nothing held over, the way upstreams frame them (an HTTP chunk
            # per event): a single-line `data: ` field each is taken whole, at a third of the
            # line-by-line cost. Anything else, state untouched, goes the general way.
            last = len(chunk) - 2
            limit = self._max_event_bytes + 5  # the decoder's limit counts the value plus LF
            if chunk.find(b"\r") < 0 and chunk.startswith(b"data: "):
                if chunk.find(b"\n") == last:  # one event
                    if last <= limit:
                        return [chunk[6:last]]
                else:
                    events = chunk[:last].split(b"\n\n")
                    for index, block in enumerate(events):
                        if (
                            not block.startswith(b"data: ")
                            or len(block) > limit
                            or block.find(b"\n") >= 0
                        ):
                            break  # another field, a blank line too many, too long
                        events[index] = block[6:]
                    else:
                        return events
        return self._feed_lines(chunk)

    def _feed_lines(self, chunk: bytes) -> list[bytes]:
        # `find`, not `in`: `bytes.__contains__` first tries its argument as an integer and
        # formats a TypeError it then drops, which cost more than the search (once per event)
        if self._pending and chunk.find(b"\n") < 0 and chunk.find(b"\r") < 0:
            # More of a long line: grow it in place rather than copying it on every read.
            if not isinstance(self._pending, bytearray):
                self._pending = bytearray(self._pending)
            self._pending += chunk
            if len(self._pending) > self._max_event_bytes:
                raise SSEProtocolError(f"line longer than {self._max_event_bytes} bytes")
            return []
        buf = bytes(self._pending) + chunk if self._pending else chunk
        tail = b""
        if buf.find(b"\r") >= 0:
            # A CR at the very end may be the first half of a CRLF split across reads.
            if buf[-1:] == b"\r":
                buf, tail = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

        events: list[bytes] = []
        start = 0
        find = buf.find
        while (end := find(b"\n", start)) >= 0:
            line = buf[start:end]
            start = end + 1
            if not line:
                if self._data:
                    data = self._data
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    self._data = []
                    self._data_size = 0
                continue
            if line[:5] == b"data:":
                value = line[6:] if line[5:6] == b" " else line[5:]
            elif line == b"data":
                value = b""
            else:
                continue  # comment, event, id, retry or an unknown field
            self._data_size += len(value) + 1
            if self._data_size > self._max_event_bytes:
                raise SSEProtocolError(f"event larger than {self._max_event_bytes} bytes")
            self._data.append(value)

        rest = buf[start:] + tail if start else buf + tail
        if len(rest) > self._max_event_bytes:
            raise SSEProtocolError(f"line longer than {self._max_event_bytes} bytes")
        self._pending = rest
        return events
