"""The OpenAI wire helpers the relay passes answers through: the SSE reader on any chunking,
the byte splices of the model name and the cost, and the usage chunk the gateway writes."""

from __future__ import annotations

import asyncio
import json

import pytest

from tokenworks.metering.usage import Usage
from tokenworks.wire.openai import (
    MAX_SSE_EVENT_BYTES,
    SSEError,
    SSEReader,
    event_data,
    is_error_event,
    reported_usage,
    response_texts,
    rewrite_model,
    upstream_cost_renamed,
    usage_chunk,
    usage_object,
    with_cost,
)

STREAM = (
    b'data: {"id":"c1","model":"up","choices":[{"delta":{"content":"Hi"}}]}\n\n'
    b": keep-alive\n\n"
    b"\n\n"  # an empty event: skipped
    b'data: {"id":"c1","model":"up","choices":[],"usage":{"prompt_tokens":3}}\n\n'
    b"data: [DONE]\n\n"
)
EVENTS = [
    b'data: {"id":"c1","model":"up","choices":[{"delta":{"content":"Hi"}}]}',
    b": keep-alive",
    b'data: {"id":"c1","model":"up","choices":[],"usage":{"prompt_tokens":3}}',
    b"data: [DONE]",
]


def reader_of(chunks: list[bytes]) -> SSEReader:
    pending = list(chunks)

    async def read() -> bytes:
        return pending.pop(0) if pending else b""

    return SSEReader(read)


def read_all(chunks: list[bytes]) -> list[bytes]:
    async def drain() -> list[bytes]:
        events = reader_of(chunks)
        out: list[bytes] = []
        for _ in range(len(chunks) + 10):  # bounded: one event per chunk at most, and the end
            event = await events.next()
            if event is None:
                return out
            out.append(event)
            while (more := events.buffered()) is not None:
                out.append(more)
        raise AssertionError("the reader did not end")

    return asyncio.run(drain())


@pytest.mark.parametrize("piece_bytes", [1, 2, 3, 7, 64, len(STREAM)])
def test_the_reader_returns_whole_events_however_the_stream_is_cut(piece_bytes: int) -> None:
    chunks = [STREAM[i : i + piece_bytes] for i in range(0, len(STREAM), piece_bytes)]
    assert read_all(chunks) == EVENTS


def test_the_reader_reads_crlf_events_as_lf() -> None:
    crlf = STREAM.replace(b"\n", b"\r\n")
    assert read_all([crlf]) == EVENTS
    assert read_all([crlf[:40], crlf[40:]]) == EVENTS  # cut inside an event, not in a CRLF


def test_buffered_never_reads() -> None:
    async def run() -> tuple[bytes | None, bytes | None, bytes | None]:
        events = reader_of([b"data: 1\n\ndata: 2\n\ndata: 3"])
        assert events.buffered() is None  # nothing read yet, and it does not read
        first = await events.next()
        return first, events.buffered(), events.buffered()

    assert asyncio.run(run()) == (b"data: 1", b"data: 2", None)


def test_a_stream_that_ends_inside_an_event_is_broken() -> None:
    with pytest.raises(SSEError, match="inside an event"):
        read_all([b"data: 1\n\n", b'data: {"cut'])


def test_an_event_past_the_bound_is_refused_before_more_is_read() -> None:
    piece = b"data: " + b"x" * (1024 * 1024)
    chunks = [piece] * (MAX_SSE_EVENT_BYTES // len(piece) + 2)
    with pytest.raises(SSEError, match="too large"):
        read_all(chunks)
    # Right at the bound, an event is still taken.
    exact = b"data: " + b"y" * (MAX_SSE_EVENT_BYTES - 6)
    assert read_all([exact, b"\n\n"]) == [exact]


def test_event_data() -> None:
    assert event_data(b'data: {"a":1}') == b'{"a":1}'
    assert event_data(b"data:[DONE]") == b"[DONE]"
    assert event_data(b"data: line1\ndata: line2") == b"line1\nline2"
    assert event_data(b"event: ping\ndata: x") == b"x"
    assert event_data(b": comment") is None
    assert event_data(b"event: ping") is None


def test_an_error_event_is_one_with_an_error_and_no_choices() -> None:
    assert is_error_event(b'data: {"error":{"message":"overloaded"}}')
    assert not is_error_event(b'data: {"error":null,"choices":[]}')
    assert not is_error_event(b'data: {"choices":[{"text":"error"}]}')
    assert not is_error_event(b'data: {"error": broken')
    assert not is_error_event(b": error")
    # Responses' and Messages' own error events (Responses has no `error` object in it).
    assert is_error_event(b'event: error\ndata: {"type":"error","code":"server_error"}\n\n')
    assert is_error_event(b'event: error\ndata: {"type":"error","error":{"type":"x"}}\n\n')
    assert not is_error_event(b'data: {"type":"response.created","response":{"error":null}}\n\n')


def test_rewrite_model_replaces_the_first_model_field_only() -> None:
    data = b'{"model" : "up\\"stream","choices":[{"model":"inner"}]}'
    out = rewrite_model(data, 'pub"lic')
    assert json.loads(out) == {"model": 'pub"lic', "choices": [{"model": "inner"}]}
    assert rewrite_model(b'{"id":"x"}', "m") == b'{"id":"x"}'


def test_with_cost_splices_the_price_into_the_first_usage_object() -> None:
    data = b'{"usage": {"prompt_tokens":1},"x":{"usage":{"a":1}}}'
    out = with_cost(data, 1_500_000_000)
    assert out == b'{"usage": {"cost":"1.5","prompt_tokens":1},"x":{"usage":{"a":1}}}'
    assert json.loads(with_cost(b'{"usage":{ }}', 1))["usage"] == {"cost": "0.000000001"}
    assert with_cost(b'{"usage":null}', 5) == b'{"usage":null}'
    assert with_cost(b'{"id":"x"}', 5) == b'{"id":"x"}'


def test_reported_usage_reads_groq_usage_when_there_is_no_usage() -> None:
    assert reported_usage({"usage": {"prompt_tokens": 1}}) == {"prompt_tokens": 1}
    assert reported_usage({"x_groq": {"usage": {"prompt_tokens": 2}}}) == {"prompt_tokens": 2}
    assert reported_usage({"usage": None, "x_groq": "odd"}) is None
    assert reported_usage({}) is None


def test_usage_object_in_openai_shape() -> None:
    usage = Usage(input_tokens=10, cached_input_tokens=4, output_tokens=5, reasoning_tokens=2)
    assert usage_object("chat", usage, 1_000) == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 2},
        "cost": "0.000001",
    }
    assert usage_object("embeddings", Usage(input_tokens=7), None) == {
        "prompt_tokens": 7,
        "total_tokens": 7,
    }


def test_the_usage_chunk_carries_the_first_chunks_id_and_creation_time() -> None:
    first = b'data: {"id":"chatcmpl-1","created":1700000000,"model":"up","choices":[]}'
    usage = Usage(input_tokens=3, output_tokens=2)
    out = usage_chunk(first, "chat", "m", usage, 2_000_000_000, default_id="req_1")
    assert out.startswith(b"data: ") and out.endswith(b"\n\n")
    assert json.loads(out[6:]) == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "cost": "2"},
    }


def test_the_usage_chunk_falls_back_to_the_request_id_and_now() -> None:
    for first in (b"data: not json", b'data: {"id":7,"created":"soon"}', b": comment"):
        chunk = json.loads(
            usage_chunk(first, "completions", "m", Usage(), None, default_id="r")[6:]
        )
        assert chunk["id"] == "r" and chunk["object"] == "text_completion"
        assert type(chunk["created"]) is int and chunk["created"] > 1_700_000_000
        assert "cost" not in chunk["usage"]


def test_response_texts() -> None:
    parsed = {
        "choices": [
            {"message": {"content": "a"}},
            {"text": "b"},
            {"message": {"content": None}},
            "odd",
        ]
    }
    assert response_texts(parsed) == ["a", "b"]
    assert response_texts({"choices": None}) == []


def test_an_upstream_cost_is_kept_apart_and_ours_is_the_one_cost() -> None:
    body = b'{"id":"x","usage":{"prompt_tokens":3,"cost":0.5,"is_byok":false}}'
    out = json.loads(with_cost(body, 1_500_000_000))
    assert out["usage"] == {
        "prompt_tokens": 3,
        "is_byok": False,
        "upstream_cost": 0.5,
        "cost": "1.5",
    }
    frame = b'data: {"choices":[{"delta":{}}],"usage":{"cost":0.5}}\r\n\r\n'
    renamed = upstream_cost_renamed(frame)
    assert renamed == b'data: {"choices":[{"delta":{}}],"usage":{"upstream_cost":0.5}}\r\n\r\n'
    # Without an upstream cost: the splice as before, no re-encode.
    plain = b'{"usage": {"prompt_tokens": 3}}'
    assert with_cost(plain, 1) == b'{"usage": {"cost":"0.000000001","prompt_tokens": 3}}'
