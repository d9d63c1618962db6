"""Passed-through Messages and Responses as the upstream sent them: SSE framing byte for
byte (CRLF, comments, `event:` lines; only the model name and the cost changed), errors and
headers, the client's `anthropic-beta`/`anthropic-version`, and one `cost`.

Over real HTTP on 127.0.0.1: recorded real provider streams (tests/wire/fixtures) replayed by
a tiny server (tests/api/replay.py) behind a gateway whose producer speaks the route's format,
and upstream-sim's Messages and Responses with its `crlf` and `rate_limited` faults.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import msgspec
import openai
import pytest

from tests.api.dialects_setup import dialect_gateway
from tests.api.replay import FIXTURES, Recorded, cassette, replaying
from tests.conftest import ADMIN_KEY, Gateway, Sim, database_named, running_gateway
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


# -- errors and headers on /v1/messages ------------------------------------------------------

ANTHROPIC_HEADERS = [
    ("request-id", "req_011CaUpstream"),
    ("anthropic-ratelimit-requests-limit", "50"),
    ("anthropic-ratelimit-requests-remaining", "0"),
    ("anthropic-organization-id", "org-gateway-owner"),
]
RATE_LIMITED = {
    "type": "error",
    "error": {
        "type": "rate_limit_error",
        "message": "Number of requests has exceeded your rate limit",
    },
    "request_id": "req_011CaUpstream",
}


def _anthropic_client(gw: Gateway, key: str, **kwargs: object) -> anthropic.Anthropic:
    kwargs.setdefault("max_retries", 0)
    return anthropic.Anthropic(api_key=key, base_url=gw.url, **kwargs)  # type: ignore[arg-type]


def _assert_anthropic_headers(headers: httpx.Headers) -> None:
    assert headers["x-upstream-request-id"] == "req_011CaUpstream"
    assert headers["x-upstream-ratelimit-requests-limit"] == "50"
    assert headers["x-upstream-ratelimit-requests-remaining"] == "0"
    assert "anthropic-organization-id" not in headers  # the gateway's account stays behind
    assert not [name for name in headers if name.startswith("anthropic-ratelimit-")]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_an_anthropic_4xx_reaches_the_anthropic_sdk_as_sent(database: str, stream: bool) -> None:
    recorded = cassette("anthropic_error_400.yaml")
    recorded.headers += ANTHROPIC_HEADERS
    with replaying(recorded) as url, gateway_on(database, url, "kind: anthropic") as gw:
        client = _anthropic_client(gw, gw.create_key()["key"])
        with pytest.raises(anthropic.BadRequestError) as err:
            client.messages.create(model="m", max_tokens=64, messages=HELLO, stream=stream)
        e = err.value
        assert e.status_code == 400
        # As Anthropic sent it: its type, its message and its own request_id.
        assert e.body == msgspec.json.decode(recorded.body)
        assert e.body["request_id"] == "req_011Ca7jT9AHpgXgdv8igm4z9"
        _assert_anthropic_headers(e.response.headers)
        [record] = gw.records()
        assert record.status == 400


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("status", [401, 403])
def test_an_anthropic_producer_refusing_the_gateways_key_is_a_502_in_anthropics_shape(
    database: str, status: int, stream: bool
) -> None:
    body = {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
    }
    recorded = Recorded(status, [("content-type", "application/json")], msgspec.json.encode(body))
    with replaying(recorded) as url, gateway_on(database, url, "kind: anthropic") as gw:
        # The SDK would retry a 5xx twice; `x-should-retry: false` tells it not to.
        client = _anthropic_client(gw, gw.create_key()["key"], max_retries=2)
        with pytest.raises(anthropic.InternalServerError) as err:
            client.messages.create(model="m", max_tokens=64, messages=HELLO, stream=stream)
        e = err.value
        assert e.status_code == 502  # never a 401: the client's own key is fine
        assert e.body["type"] == "error" and e.body["error"]["type"] == "api_error"
        message = e.body["error"]["message"]
        assert "producer 'up'" in message and "not your API key" in message
        assert e.response.headers["x-should-retry"] == "false"
        assert len(recorded.requests) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_an_anthropic_429_passes_as_sent_and_the_sdk_waits_its_retry_after_ms(
    database: str, stream: bool
) -> None:
    headers = [("content-type", "application/json"), ("retry-after", "1")]
    headers += [("retry-after-ms", "200"), *ANTHROPIC_HEADERS]
    recorded = Recorded(429, headers, msgspec.json.encode(RATE_LIMITED))
    waits: list[float] = []

    class Spy(anthropic.Anthropic):
        def _calculate_retry_timeout(self, *args: Any, **kwargs: Any) -> float:
            wait = super()._calculate_retry_timeout(*args, **kwargs)
            waits.append(wait)
            return wait

    with replaying(recorded) as url, gateway_on(database, url, "kind: anthropic") as gw:
        client = Spy(api_key=gw.create_key()["key"], base_url=gw.url, max_retries=1)
        with pytest.raises(anthropic.RateLimitError) as err:
            client.messages.create(model="m", max_tokens=64, messages=HELLO, stream=stream)
        e = err.value
        assert e.status_code == 429 and e.body == RATE_LIMITED
        assert e.response.headers["retry-after-ms"] == "200"
        assert e.response.headers["retry-after"] == "1"
        _assert_anthropic_headers(e.response.headers)
        # 0.2 s from retry-after-ms, not the 1 s of retry-after nor the SDK's own backoff.
        assert waits == [0.2]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_anthropic_headers_pass_on_answers_and_streams(database: str, stream: bool) -> None:
    if stream:
        # (the recorded file lacks the blank line that ends its last event)
        body = (FIXTURES / "anthropic_tool_use_stream.txt").read_bytes().rstrip(b"\n") + b"\n\n"
        content_type = "text/event-stream"
    else:
        body = cassette("anthropic_tool_use.yaml").body
        content_type = "application/json"
    recorded = Recorded(200, [("content-type", content_type), *ANTHROPIC_HEADERS], body)
    with replaying(recorded) as url, gateway_on(database, url, "kind: anthropic") as gw:
        client = _anthropic_client(gw, gw.create_key()["key"])
        raw = client.messages.with_raw_response.create(
            model="m", max_tokens=64, messages=HELLO, stream=stream
        )
        _assert_anthropic_headers(raw.headers)
        assert raw.headers["x-request-id"].startswith("req_")  # the gateway's own id
        if stream:
            assert [e.type for e in raw.parse()][-1] == "message_stop"
        else:
            assert raw.parse().stop_reason == "tool_use"


def test_an_anthropic_error_on_an_openai_route_is_in_openais_shape(database: str) -> None:
    """The same 400 reaching an `openai` SDK client (chat completions translated to
    Messages): OpenAI's shape, Anthropic's message and type kept."""
    recorded = cassette("anthropic_error_400.yaml")
    with replaying(recorded) as url, gateway_on(database, url, "kind: anthropic") as gw:
        client = openai.OpenAI(base_url=gw.v1, api_key=gw.create_key()["key"], max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="m", messages=HELLO)
        e = err.value
        assert e.status_code == 400 and e.type == "invalid_request_error"
        assert "This model does not support effort level 'xhigh'" in e.message
        assert e.body["message"].startswith("This model does not support")
        assert {"message", "type", "param", "code"} <= set(e.body)  # OpenAI's error fields


# -- the client's anthropic-beta and anthropic-version --------------------------------------

BETAS = "prompt-caching-2024-07-31,token-efficient-tools-2025-02-19"


def _sent_headers(recorded: Recorded) -> dict[str, str]:
    [headers] = recorded.request_headers
    return headers


@pytest.mark.parametrize("route", ["plain", "stream", "count_tokens"])
def test_anthropic_beta_and_version_go_on_to_an_anthropic_producer(
    database: str, route: str
) -> None:
    if route == "stream":
        body = (FIXTURES / "anthropic_tool_use_stream.txt").read_bytes().rstrip(b"\n") + b"\n\n"
        recorded = Recorded(200, [("content-type", "text/event-stream")], body)
    elif route == "plain":
        recorded = cassette("anthropic_tool_use.yaml")
    else:
        recorded = Recorded(200, [("content-type", "application/json")], b'{"input_tokens":12}')
    with replaying(recorded) as url, gateway_on(database, url, "kind: anthropic") as gw:
        key = gw.create_key()["key"]
        client = _anthropic_client(
            gw,
            key,
            default_headers={
                "anthropic-beta": BETAS,
                "anthropic-version": "2023-01-01",
                "anthropic-dangerous-direct-browser-access": "true",
            },
        )
        if route == "count_tokens":
            assert client.messages.count_tokens(model="m", messages=HELLO).input_tokens == 12
        else:
            reply = client.messages.create(
                model="m", max_tokens=64, messages=HELLO, stream=route == "stream"
            )
            if route == "stream":
                assert [event.type for event in reply][-1] == "message_stop"  # type: ignore[union-attr]
        sent = _sent_headers(recorded)
        assert sent["anthropic-beta"] == BETAS
        assert sent["anthropic-version"] == "2023-01-01"
        # Only those two: not the client's key, nor any other header of its own.
        assert key not in sent.values()
        assert "anthropic-dangerous-direct-browser-access" not in sent
        assert not [name for name in sent if name.startswith("x-stainless")]


def test_without_the_clients_headers_an_anthropic_producer_gets_the_gateways_version(
    database: str,
) -> None:
    recorded = cassette("anthropic_tool_use.yaml")
    with replaying(recorded) as url, gateway_on(database, url, "kind: anthropic") as gw:
        key = gw.create_key()["key"]
        body = {"model": "m", "max_tokens": 64, "messages": HELLO}
        r = httpx.post(f"{gw.url}/v1/messages", json=body, headers={"x-api-key": key})
        assert r.status_code == 200
        sent = _sent_headers(recorded)
        assert sent["anthropic-version"] == "2023-06-01" and "anthropic-beta" not in sent


def test_anthropic_beta_does_not_go_to_a_producer_the_request_is_translated_for(
    database: str,
) -> None:
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "upstream-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Sunny."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }
    recorded = Recorded(200, [("content-type", "application/json")], msgspec.json.encode(answer))
    with replaying(recorded) as url, gateway_on(database, url, "formats: [chat]") as gw:
        client = _anthropic_client(
            gw, gw.create_key()["key"], default_headers={"anthropic-beta": BETAS}
        )
        reply = client.messages.create(model="m", max_tokens=64, messages=HELLO)
        assert reply.content[0].text == "Sunny."  # type: ignore[union-attr]
        sent = _sent_headers(recorded)
        assert "anthropic-beta" not in sent and "anthropic-version" not in sent


# -- one cost ---------------------------------------------------------------------------------

UPSTREAM_COST = 0.0123  # an upstream's own figure (OpenRouter's credits), a JSON number


def _messages_answer(stream: bool) -> bytes:
    """A recorded Messages answer whose usage carries the upstream's own `cost`."""
    if stream:
        body = (FIXTURES / "anthropic_tool_use_stream.txt").read_bytes().rstrip(b"\n") + b"\n\n"
        body = body.replace(b'"service_tier":"standard"}', b'"service_tier":"standard","cost":0}')
        return body.replace(
            b'"usage":{"output_tokens":65}', b'"usage":{"output_tokens":65,"cost":0.0123}'
        )
    answer = msgspec.json.decode(cassette("anthropic_tool_use.yaml").body)
    answer["usage"]["cost"] = UPSTREAM_COST
    return msgspec.json.encode(answer)


def _responses_answer(stream: bool) -> bytes:
    if stream:
        body = cassette("responses_stream.yaml").body
        at = body.index(b'"type":"response.completed"')
        usage = body.index(b'"usage":{', at) + len(b'"usage":{')
        return body[:usage] + b'"cost":0.0123,' + body[usage:]
    answer = msgspec.json.decode(cassette("responses_tool_call.yaml").body)
    answer["usage"]["cost"] = UPSTREAM_COST
    return msgspec.json.encode(answer)


def _one_cost(event: bytes, price_nano: int) -> None:
    """`event` (a body or an SSE event) has one `cost`, the price; the upstream's apart."""
    data = event[event.index(b"{") : event.rindex(b"}") + 1]
    assert data.count(b'"cost"') == 1, data
    obj = msgspec.json.decode(data)
    usage = obj["usage"] if "usage" in obj else obj["response"]["usage"]
    assert usage["cost"] == format_nano(price_nano)
    assert usage["upstream_cost"] == UPSTREAM_COST


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("route", ["messages", "responses"])
def test_the_gateways_price_is_the_one_cost_on_a_passed_through_dialect(
    database: str, route: str, stream: bool
) -> None:
    if route == "messages":
        body, producer = _messages_answer(stream), "kind: anthropic"
        request: dict[str, Any] = {"model": "m", "max_tokens": 64, "messages": HELLO}
        closing = b'"type":"message_delta"'
    else:
        body, producer = _responses_answer(stream), "formats: [responses]"
        request = {"model": "m", "input": "What is the capital of France?"}
        closing = b'"type":"response.completed"'
    content_type = "text/event-stream" if stream else "application/json"
    recorded = Recorded(200, [("content-type", content_type)], body)
    with replaying(recorded) as url, gateway_on(database, url, producer) as gw:
        key = gw.create_key()["key"]
        auth = {"x-api-key": key, "Authorization": f"Bearer {key}"}
        r = httpx.post(f"{gw.v1}/{route}", json=dict(request, stream=stream), headers=auth)
        assert r.status_code == 200, r.text
        [record] = gw.records()
        assert not record.usage.estimated
        if not stream:
            _one_cost(r.content, record.price_nano)
            return
        [event] = [e for e in r.content.split(b"\n\n") if closing in e]
        _one_cost(event, record.price_nano)
        assert r.content.count(b'"cost"') == 1  # no other event shows the upstream's as cost


# -- the same against upstream-sim (its Messages and Responses, its `crlf` and error faults) --


@pytest.fixture
def dgw(sims: tuple[Sim, Sim], database: str) -> Iterator[Gateway]:
    with dialect_gateway(database, *sims) as gateway:
        yield gateway


@pytest.mark.parametrize(
    ("route", "model", "closing"),
    [
        ("messages", "m-claude", b"event: message_delta\r\n"),
        # (completed, or incomplete when it reaches max_output_tokens)
        ("responses", "m-native", b"event: response."),
    ],
)
def test_a_crlf_stream_from_the_sim_reaches_the_client_in_its_framing(
    dgw: Gateway, sims: tuple[Sim, Sim], route: str, model: str, closing: bytes
) -> None:
    sims[0].fault("crlf")
    key = dgw.create_key()["key"]
    body: dict[str, Any] = {"model": model, "stream": True}
    if route == "messages":
        body.update(max_tokens=5, messages=HELLO)
    else:
        body.update(max_output_tokens=16, input="Say hello")
    auth = {"x-api-key": key, "Authorization": f"Bearer {key}"}
    with httpx.stream("POST", f"{dgw.v1}/{route}", json=body, headers=auth) as r:
        raw = r.read()
    assert raw.startswith(b": OPENROUTER PROCESSING\r\n\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")  # every line end is CRLF
    assert raw.endswith(b"\r\n\r\n")
    [record] = dgw.records()
    cost = b'"cost":"' + format_nano(record.price_nano).encode() + b'"'
    [last] = [e for e in raw.split(b"\r\n\r\n") if cost in e]
    assert last.startswith(closing)
    assert f'"model":"{model}"'.encode() in raw


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_rate_limited_anthropic_producer_on_the_sim_reaches_the_sdk_with_its_headers(
    dgw: Gateway, sims: tuple[Sim, Sim], stream: bool
) -> None:
    sims[0].fault("rate_limited", count=3)  # the gateway's own 3 attempts, each refused
    client = _anthropic_client(dgw, dgw.create_key()["key"])
    try:
        with pytest.raises(anthropic.RateLimitError) as err:
            client.messages.create(model="m-claude", max_tokens=5, messages=HELLO, stream=stream)
    finally:
        sims[0].clear_faults()
    e = err.value
    assert e.status_code == 429
    assert e.body["type"] == "error" and e.body["error"]["type"] == "rate_limit_error"
    assert "Rate limit reached for m-claude" in e.body["error"]["message"]
    headers = e.response.headers
    assert headers["retry-after-ms"] == "200" and headers["retry-after"] == "1"
    assert headers["x-upstream-request-id"]
    assert headers["x-upstream-ratelimit-limit-requests"] == "500"
    assert not [name for name in headers if name.startswith(("anthropic-", "x-ratelimit-"))]


# -- what the gateway writes into a passed-through stream follows its line ends ---------------


def _crlf_anthropic_stream() -> list[bytes]:
    recorded = (FIXTURES / "anthropic_tool_use_stream.txt").read_bytes()
    return _frames(recorded, b"claude-sonnet-4-20250514")


def _stream_messages(gw: Gateway) -> bytes:
    key = gw.create_key()["key"]
    body = {"model": "m", "max_tokens": 64, "messages": HELLO, "stream": True}
    with httpx.stream("POST", f"{gw.url}/v1/messages", json=body, headers={"x-api-key": key}) as r:
        return r.read()


def test_a_crlf_stream_cut_short_ends_with_an_error_event_in_crlf(database: str) -> None:
    frames = _crlf_anthropic_stream()[:4]  # no message_delta, no message_stop
    sent = _framed(frames, b"\r\n")
    upstream = Recorded(200, [("content-type", "text/event-stream")], sent)
    with replaying(upstream) as url, gateway_on(database, url, "kind: anthropic") as gw:
        raw = _stream_messages(gw)
    assert raw.startswith(sent.replace(b'"model":"upstream-model"', b'"model":"m"'))
    assert b"\r\n\r\nevent: error\r\ndata: " in raw  # the gateway's own event, in CRLF
    assert raw.endswith(b"\r\n\r\n") and b"\n" not in raw.replace(b"\r\n", b"")
    assert b'"type":"api_error"' in raw


def test_a_crlf_stream_without_counts_shows_the_estimate_charged_in_crlf(database: str) -> None:
    frames = [
        f.replace(b'"output_tokens":65', b'"output_tokens":0').replace(
            b'"usage":{"input_tokens":377,"cache_creation_input_tokens":0,'
            b'"cache_read_input_tokens":0,"output_tokens":1,"service_tier":"standard"}',
            b'"usage":null',
        )
        for f in _crlf_anthropic_stream()
    ]
    assert not [f for f in frames if b'"input_tokens"' in f]  # and no output counted
    upstream = Recorded(200, [("content-type", "text/event-stream")], _framed(frames, b"\r\n"))
    with replaying(upstream) as url, gateway_on(database, url, "kind: anthropic") as gw:
        raw = _stream_messages(gw)
        [record] = gw.records()
    assert record.usage.estimated
    assert b"\n" not in raw.replace(b"\r\n", b"")  # every line end is CRLF
    [delta] = [e for e in raw.split(b"\r\n\r\n") if e.startswith(b"event: message_delta")]
    usage = msgspec.json.decode(delta.split(b"data: ", 1)[1])["usage"]
    assert usage["output_tokens"] == record.usage.output_tokens
    assert usage["cost"] == format_nano(record.price_nano)
    assert raw.endswith(b'event: message_stop\r\ndata: {"type":"message_stop"}\r\n\r\n')
