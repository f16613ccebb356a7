"""The SSE and NDJSON splitters: whole events out, whatever the reads and line ends (issue 8)."""

from __future__ import annotations

import pytest

from nexus.backends.sse import EventSplitter, LineSplitter, is_done, opens_chunks
from nexus.dialects.events import EventTooLarge

# Three events, each line end written a different way: LF, CRLF and a lone CR (all allowed by
# the SSE spec), a comment, a multi-line event, and [DONE].
MIXED = (
    b"data: one\n\n"
    b"data: two\r\n\r\n"
    b"data: three\r\r"
    b": keep-alive\r\n\n"
    b"event: x\rdata: a\r\ndata: b\n\r"
    b"data: [DONE]\r\n\r\n"
)
EXPECTED = [
    b"data: one\n\n",
    b"data: two\n\n",
    b"data: three\n\n",
    b": keep-alive\n\n",
    b"event: x\ndata: a\ndata: b\n\n",
    b"data: [DONE]\n\n",
]


def feed_all(splitter: EventSplitter, pieces: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for piece in pieces:
        out += splitter.feed(piece)
    return out


def test_whole_stream_in_one_read() -> None:
    assert feed_all(EventSplitter(), [MIXED]) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(MIXED)))
def test_every_split_into_two_reads_gives_the_same_events(cut: int) -> None:
    assert feed_all(EventSplitter(), [MIXED[:cut], MIXED[cut:]]) == EXPECTED


def test_every_split_into_three_reads_gives_the_same_events() -> None:
    for first in range(1, len(MIXED) - 1):
        for second in range(first + 1, len(MIXED)):
            pieces = [MIXED[:first], MIXED[first:second], MIXED[second:]]
            assert feed_all(EventSplitter(), pieces) == EXPECTED, (first, second)


def test_one_byte_at_a_time() -> None:
    pieces = [MIXED[i : i + 1] for i in range(len(MIXED))]
    assert feed_all(EventSplitter(), pieces) == EXPECTED


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        # a CRLF between two reads is one line end, not two: no early, empty event
        ([b"data: a\r", b"\ndata: b\r\n\r\n"], [b"data: a\ndata: b\n\n"]),
        # a CR at the end of a read followed by a CR: a blank line, the event ends
        ([b"data: a\r", b"\rdata: b\r\r"], [b"data: a\n\n", b"data: b\n\n"]),
        # a CR then an LF-only boundary in the next read
        ([b"data: a\r", b"\n", b"\n"], [b"data: a\n\n"]),
        # an empty read changes nothing
        ([b"data: a\r", b"", b"\n\r\n"], [b"data: a\n\n"]),
    ],
)
def test_crlf_split_across_reads(pieces: list[bytes], expected: list[bytes]) -> None:
    assert feed_all(EventSplitter(), pieces) == expected


def test_blank_lines_between_events_are_dropped() -> None:
    got = EventSplitter().feed(b"\n\n\ndata: a\n\n\n\n\r\ndata: b\n\n\n")
    assert got == [b"data: a\n\n", b"data: b\n\n"]


def test_tail_without_final_blank_line_is_a_last_event() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\n\ndata: b\r\n") == [b"data: a\n\n"]
    assert splitter.tail() == b"data: b\n\n"
    assert splitter.tail() is None


def test_an_event_without_end_past_the_limit_is_a_protocol_error() -> None:
    splitter = EventSplitter(limit=100)
    splitter.feed(b"data: " + b"x" * 90)
    with pytest.raises(EventTooLarge, match="longer than 100 bytes"):
        splitter.feed(b"x" * 10)


def test_a_whole_event_past_the_limit_is_a_protocol_error_too() -> None:
    with pytest.raises(EventTooLarge):
        EventSplitter(limit=100).feed(b"data: " + b"x" * 100 + b"\n\n")


def test_events_up_to_the_limit_pass() -> None:
    event = b"data: " + b"x" * 92 + b"\n\n"
    assert len(event) == 100
    assert EventSplitter(limit=100).feed(event * 3) == [event] * 3


def test_is_done() -> None:
    assert is_done(b"data: [DONE]\n\n")
    assert is_done(b"data:[DONE]\n\n")
    assert not is_done(b'data: {"x": "[DONE]"}\n\n')
    assert not is_done(b"data: [DONE] and more\n\n")
    assert not is_done(b"data: x [DONE]\n\n")


def test_is_done_for_events_that_came_together() -> None:
    assert is_done(b"data: a\n\ndata: [DONE]\n\n")
    assert is_done(b"data: " + b"x" * 100 + b"\n\ndata:[DONE]\n\n")
    assert not is_done(b"data: [DONE]\n\ndata: a\n\n")
    assert not is_done(b"data: a\ndata: [DONE]\n\n")  # a line of the same event, not its own


NDJSON = b'{"a":1}\n{"b":2}\r\n\n{"c":3}\n'


@pytest.mark.parametrize("cut", range(1, len(NDJSON)))
def test_ndjson_lines_whatever_the_split(cut: int) -> None:
    splitter = LineSplitter()
    lines = splitter.feed(NDJSON[:cut]) + splitter.feed(NDJSON[cut:])
    assert [line.strip() for line in lines] == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
    assert splitter.tail() is None


def test_ndjson_line_past_the_limit_is_a_protocol_error() -> None:
    splitter = LineSplitter(limit=50)
    assert splitter.feed(b'{"a":1}\n' + b"x" * 40) == [b'{"a":1}']
    with pytest.raises(EventTooLarge):
        splitter.feed(b"x" * 20)


@pytest.mark.parametrize(
    ("item", "opens"),
    [
        (b'data: {"id":"1","choices":[]}\n\n', True),
        (b"data: [DONE]\n\n", True),
        (b'data:{"id":"1"}\n\n', True),
        (b': keep-alive\n\ndata: {"id":"1"}\n\n', True),
        (b'event: message\nid: 7\ndata: {"id":"1"}\n\n', True),
        (b'data: {"id":\ndata: "1"}\n\n', True),  # one value over two data lines
        (b": keep-alive\n\n", None),
        (b"retry: 1000\n\n", None),
        (b"not json{\n\n", False),
        (b'{"id":"chatcmpl-1","choices":[]}\n\n', False),
        (b"this is not an event stream\nfoo: bar\n\n", False),
        (b"data: not json{\n\n", False),
        (b"data: [1, 2]\n\n", False),
        (b"<html><body>502</body></html>\n\n", False),
    ],
)
def test_a_stream_opens_with_a_chunk_or_it_is_not_one(item, opens):
    assert opens_chunks(item) is opens
