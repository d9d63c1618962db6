"""Passed-through Messages and Responses as the upstream sent them: SSE framing byte for
byte (CRLF, comments, `event:` lines; only the model name and the cost changed), errors and
headers, the client's `anthropic-beta`/`anthropic-version`, and one `cost`.

Over real HTTP on 127.0.0.1: recorded real provider streams (tests/wire/fixtures) replayed by
a tiny server (tests/api/replay.py) behind a gateway whose producer speaks the route's format.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.api.replay import FIXTURES, Recorded, cassette, replaying
from tests.conftest import ADMIN_KEY, Gateway, database_named, running_gateway
from tokenworks.money import format_nano

COST = '{input_per_mtok: "1.00", output_per_mtok: "2.00"}'
HELLO = [{"role": "user", "content": "Weather in Paris?"}]


@contextlib.contextmanager
def gateway_on(database: str, url: str, producer: str) -> Iterator[Gateway]:
    """A gateway whose model `m` goes to `url`, a producer described by `producer` (YAML
    fields: its kind or formats)."""
    db = database_named(database, "gw")
    config = f"""\
database: {db}
admin_key: {ADMIN_KEY}
producers:
  - {{name: up, base_url: "{url}/v1", timeout_s: 5, {producer}}}
models:
  - name: m
    deployments: [{{producer: up, model: upstream-model, cost: {COST}}}]
"""
    with running_gateway(config, db) as gw:
        yield gw


def _framed(frames: list[bytes], line_end: bytes) -> bytes:
    """Recorded LF events re-framed in `line_end`s, with a comment first and between."""
    out = [b": keep-alive\n\n"]
    for i, frame in enumerate(frames):
        out.append(frame + b"\n\n")
        if i == 1:
            out.append(b": still here\n\n")
    return b"".join(out).replace(b"\n", line_end)


def _frames(body: bytes, model: bytes) -> list[bytes]:
    """A recorded LF stream's events, its model renamed `upstream-model`."""
    body = body.replace(b'"model":"' + model + b'"', b'"model":"upstream-model"')
    return [f.strip(b"\n") for f in body.split(b"\n\n") if f.strip()]


def _expected(sent: bytes, price_nano: int, closing_type: bytes) -> bytes:
    """What the client must get: the bytes sent, the model renamed `m`, and the charged price
    as `cost` first in the usage of the event that closes the stream."""
    out = sent.replace(b'"model":"upstream-model"', b'"model":"m"')
    at = out.index(b'"type":"' + closing_type + b'"')
    usage = out.index(b'"usage":{', at) + len(b'"usage":{')
    cost = b'"cost":"' + format_nano(price_nano).encode() + b'",'
    return out[:usage] + cost + out[usage:]


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_a_passed_through_messages_stream_keeps_its_framing_byte_for_byte(
    database: str, line_end: bytes
) -> None:
    recorded = (FIXTURES / "anthropic_tool_use_stream.txt").read_bytes()
    sent = _framed(_frames(recorded, b"claude-sonnet-4-20250514"), line_end)
    upstream = Recorded(200, [("content-type", "text/event-stream")], sent)
    with replaying(upstream) as url, gateway_on(database, url, "kind: anthropic") as gw:
        key = gw.create_key()["key"]
        body = {"model": "m", "max_tokens": 64, "messages": HELLO, "stream": True}
        with httpx.stream(
            "POST", f"{gw.url}/v1/messages", json=body, headers={"x-api-key": key}
        ) as r:
            raw = r.read()
        [record] = gw.records()
        assert (record.usage.input_tokens, record.usage.output_tokens) == (377, 65)
        assert raw == _expected(sent, record.price_nano, b"message_delta")
        # The SDK reads it as any stream.
        client = anthropic.Anthropic(api_key=key, base_url=gw.url, max_retries=0)
        with client.messages.stream(model="m", max_tokens=64, messages=HELLO) as stream:
            final = stream.get_final_message()
        assert final.stop_reason == "tool_use" and final.content[1].input == {"location": "Paris"}


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_a_passed_through_responses_stream_keeps_its_framing_byte_for_byte(
    database: str, line_end: bytes
) -> None:
    recorded = cassette("responses_stream.yaml").body
    sent = _framed(_frames(recorded, b"gpt-4o-2024-08-06"), line_end)
    upstream = Recorded(200, [("content-type", "text/event-stream")], sent)
    with replaying(upstream) as url, gateway_on(database, url, "formats: [responses]") as gw:
        key = gw.create_key()["key"]
        body = {"model": "m", "input": "What is the capital of France?", "stream": True}
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.stream("POST", f"{gw.v1}/responses", json=body, headers=auth) as r:
            raw = r.read()
        [record] = gw.records()
        assert not record.usage.estimated
        assert raw == _expected(sent, record.price_nano, b"response.completed")
