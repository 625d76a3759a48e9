"""The SSE decoder against a recorded ChatKit stream, split every possible way."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from healthagent_service.upstream.sse import SSEDecoder, SSEProtocolError

RECORDED = (Path(__file__).parent / "data" / "chatkit_turn.sse").read_bytes()


def expected_events(stream: bytes) -> list[bytes]:
    return [frame[len(b"data: ") :] for frame in stream.split(b"\n\n") if frame]


def decode(pieces: list[bytes], decoder: SSEDecoder | None = None) -> list[bytes]:
    decoder = decoder or SSEDecoder()
    events: list[bytes] = []
    for piece in pieces:
        events.extend(decoder.feed(piece))
    events.extend(decoder.finish())
    assert not decoder.has_partial_event
    return events


def test_recorded_stream_has_multibyte_text() -> None:
    assert "👋".encode() in RECORDED and "心拍数".encode() in RECORDED
    assert len(expected_events(RECORDED)) == 24


def test_split_at_every_byte_boundary() -> None:
    expected = expected_events(RECORDED)
    for cut in range(len(RECORDED) + 1):
        assert decode([RECORDED[:cut], RECORDED[cut:]]) == expected, cut


def test_one_byte_at_a_time() -> None:
    pieces = [RECORDED[i : i + 1] for i in range(len(RECORDED))]
    assert decode(pieces) == expected_events(RECORDED)


def test_crlf_and_cr_line_endings_split_everywhere() -> None:
    for ending in (b"\r\n", b"\r"):
        stream = RECORDED.replace(b"\n", ending)
        expected = expected_events(RECORDED)
        for cut in range(0, len(stream) + 1, 7):
            assert decode([stream[:cut], stream[cut:]]) == expected, (ending, cut)
        # a CRLF pair split exactly between reads must not count as two line ends
        first_crlf = stream.find(b"\r\n")
        if first_crlf >= 0:
            cut = first_crlf + 1
            assert decode([stream[:cut], stream[cut:]]) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=40))
def test_any_partition(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    bounds = [0, *points, len(RECORDED)]
    pieces = [RECORDED[a:b] for a, b in itertools.pairwise(bounds)]
    assert decode(pieces) == expected_events(RECORDED)


def test_multi_line_data_comments_and_other_fields() -> None:
    stream = b": keep-alive\nevent: x\nid: 1\nretry: 10\ndata: a\ndata:b\ndata\n\n"
    assert decode([stream]) == [b"a\nb\n"]


def test_long_line_across_many_reads() -> None:
    payload = b'{"type":"x","blob":"' + b"y" * (3 * 1024 * 1024) + b'"}'
    stream = b"data: " + payload + b"\n\n"
    pieces = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
    assert decode(pieces) == [payload]


def test_oversized_event_is_refused() -> None:
    decoder = SSEDecoder(max_event_bytes=1024)
    with pytest.raises(SSEProtocolError):
        decoder.feed(b"data: " + b"x" * 2048)
    decoder = SSEDecoder(max_event_bytes=1024)
    with pytest.raises(SSEProtocolError):
        for _ in range(3):
            decoder.feed(b"data: " + b"x" * 500 + b"\n")


def test_partial_event_is_reported() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"type":"a"}\n\ndata: {"ty') == [b'{"type":"a"}']
    assert decoder.has_partial_event
    decoder = SSEDecoder()
    decoder.feed(b'data: {"type":"a"}\n')
    assert decoder.has_partial_event  # the blank line that ends the event never came


def test_recorded_stream_an_event_per_read() -> None:
    # how upstreams frame events (an HTTP chunk each): the decoder's whole-events path
    frames = [frame + b"\n\n" for frame in RECORDED.split(b"\n\n") if frame]
    assert decode(frames) == expected_events(RECORDED)
    assert decode([b"".join(frames[:5]), *frames[5:]]) == expected_events(RECORDED)


_LINES = st.sampled_from(
    [b"data: a", b"data:b", b"data", b"data: ", b": keep", b"event: x", b"id: 7", b"", b"data: c\r"]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(_LINES, max_size=4), max_size=12),
    st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_whole_event_reads_decode_as_byte_at_a_time(
    blocks: list[list[bytes]], cuts: list[int]
) -> None:
    # Reads that end on blank lines take the whole-events path when they can; whatever the
    # blocks hold (several fields, comments, CRs, empty values) it must agree with the
    # line-by-line path, here forced by feeding a byte at a time.
    stream = b"".join(b"".join(line + b"\n" for line in block) + b"\n" for block in blocks)
    one_byte = decode([stream[i : i + 1] for i in range(len(stream))])
    boundaries = [i + 2 for i in range(len(stream) - 1) if stream[i : i + 2] == b"\n\n"]
    points = sorted({boundaries[c % len(boundaries)] for c in cuts} if boundaries else set())
    bounds = [0, *points, len(stream)]
    assert decode([stream[a:b] for a, b in itertools.pairwise(bounds)]) == one_byte


def test_whole_event_read_over_the_limit_is_refused() -> None:
    decoder = SSEDecoder(max_event_bytes=10)
    assert decoder.feed(b"data: " + b"x" * 9 + b"\n\n") == [b"x" * 9]  # 9 bytes and its LF
    with pytest.raises(SSEProtocolError):
        decoder.feed(b"data: " + b"x" * 10 + b"\n\n")
