"""The SSE splitter hands back events byte for byte, whatever the framing and chunking."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from tokenworks.wire.sse import (
    FrameReader,
    SSEError,
    SSESplitter,
    data_of,
    encode_event,
    parse_event,
)

FIXTURES = Path(__file__).parent / "fixtures"


def recorded(name: str) -> bytes:
    if name.endswith(".txt"):
        return (FIXTURES / name).read_bytes()
    interactions = yaml.safe_load((FIXTURES / name).read_text())["interactions"]
    return interactions[0]["response"]["body"]["string"].encode()


def with_line_ends(raw: bytes, line_end: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", line_end)


def split_all(raw: bytes, piece_bytes: int) -> tuple[list[bytes], bytes]:
    splitter = SSESplitter()
    events: list[bytes] = []
    for start in range(0, len(raw), piece_bytes):
        events.extend(splitter.feed(raw[start : start + piece_bytes]))
    return events, splitter.rest()


RECORDINGS = [
    "anthropic_tool_use_stream.txt",
    "openai_chat_parallel_tools_stream.txt",
    "responses_stream.yaml",
    "openrouter_reasoning_stream.yaml",  # has `: OPENROUTER PROCESSING` comment events
]


@pytest.mark.parametrize("name", RECORDINGS)
@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("piece_bytes", [1, 3, 64, 1 << 20])
def test_recorded_streams_split_into_their_exact_events(
    name: str, line_end: bytes, piece_bytes: int
) -> None:
    raw = with_line_ends(recorded(name), line_end)
    if not raw.endswith(line_end * 2):
        raw = raw.rstrip(b"\r\n") + line_end * 2
    events, rest = split_all(raw, piece_bytes)
    assert b"".join(events) + rest == raw  # nothing rewritten, nothing lost
    if line_end == b"\r":  # a final CR may yet be followed by LF: the last event waits in rest()
        events.append(rest)
    else:
        assert rest == b""
    whole_events = [e + line_end * 2 for e in raw.split(line_end * 2) if e]
    assert events == whole_events
    assert all(e.endswith(line_end * 2) for e in events)
    for event in events:  # the data each event carries reads the same in every framing
        expected = parse_event(event.replace(line_end, b"\n")).data
        got = data_of(event)
        assert (got.decode() if got is not None else None) == expected


def test_fields_of_an_event_with_comments_ids_and_several_data_lines() -> None:
    frame = b': keep-alive\r\nevent: message_delta\r\nid: 7\r\nretry: 250\r\ndata: {"a":\r\ndata:1}\r\n\r\n'
    fields = parse_event(frame)
    assert (fields.event, fields.data, fields.id, fields.retry_ms) == (
        "message_delta",
        '{"a":\n1}',
        "7",
        250,
    )
    assert data_of(frame) == b'{"a":\n1}'
    assert (
        parse_event(b": only a comment\n\n").data is None
        and data_of(b": only a comment\n\n") is None
    )
    assert data_of(b"data:[DONE]\n\n") == b"[DONE]"  # the space after the colon is optional


def test_a_crlf_split_between_its_cr_and_lf_is_not_cut_early() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b"data: 1\r\n\r") == []
    assert splitter.feed(b"\n") == [b"data: 1\r\n\r\n"]
    assert splitter.feed(b"data: 2\r\r") == []  # may still become CR CRLF
    assert splitter.feed(b"\ndata: 3") == [b"data: 2\r\r\n"]
    assert splitter.rest() == b"data: 3"


def test_an_event_that_never_ends_is_bounded() -> None:
    splitter = SSESplitter(max_event_bytes=1024)
    splitter.feed(b"data: " + b"x" * 1000)
    with pytest.raises(ValueError, match="1024 bytes"):
        splitter.feed(b"x" * 100)


def test_encode_event_frames() -> None:
    assert encode_event(b"{}") == b"data: {}\n\n"
    assert encode_event(b"{}", "ping") == b"event: ping\ndata: {}\n\n"


def frames_of(chunks: list[bytes], max_event_bytes: int = 1 << 20) -> list[bytes]:
    """Every event a FrameReader reads from `chunks`, read as the relay does: what is
    already buffered first, then waiting for more."""

    async def run() -> list[bytes]:
        parts = iter(chunks)

        async def read() -> bytes:
            return next(parts, b"")

        reader = FrameReader(read, max_event_bytes)
        out: list[bytes] = []
        for _ in range(10_000):
            frame = reader.buffered() or await reader.next()
            if frame is None:
                return out
            out.append(frame)
        raise AssertionError("unbounded")

    return asyncio.run(run())


STREAM_LF = b': hello\n\nid: 1\nevent: chunk\ndata: {"a":1}\n\ndata: [DONE]\n\n'


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_the_frame_reader_gives_back_each_event_as_sent(line_end: bytes, size: int) -> None:
    stream = STREAM_LF.replace(b"\n", line_end)
    chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
    frames = frames_of(chunks)
    assert b"".join(frames) == stream
    assert len(frames) == 3
    assert [data_of(f) for f in frames] == [None, b'{"a":1}', b"[DONE]"]


def test_the_frame_reader_refuses_a_cut_or_endless_event() -> None:
    with pytest.raises(SSEError, match="inside an event"):
        frames_of([b"data: {}\n\n", b"data: {"])
    with pytest.raises(SSEError, match="too large"):
        frames_of([b"data: " + b"x" * 64] * 4, max_event_bytes=100)


@pytest.mark.parametrize(
    ("frame", "data"),
    [
        (b'data: {"a":1}\n\n', b'{"a":1}'),
        (b'data: {"a":1}\r\n\r\n', b'{"a":1}'),
        (b'data: {"a":1}\r\n\n', b'{"a":1}'),  # a mixed blank line: no CR in the data
        (b'data:{"a":1}\n\n', b'{"a":1}'),
        (b"data: a\ndata: b\n\n", b"a\nb"),
        (b"event: error\ndata: x\n\n", b"x"),
        (b": comment\n\n", None),
    ],
)
def test_data_of_a_frame_in_any_framing(frame: bytes, data: bytes | None) -> None:
    assert data_of(frame) == data
