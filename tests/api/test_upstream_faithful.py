"""What an upstream says reaches the client as it said it: its 4xx errors (status, body and
headers), its headers on answers, its SSE framing; and one `cost`, the gateway's price.

Over real HTTP on 127.0.0.1: the official openai SDK (and raw httpx where bytes matter)
against the gateway, against upstream-sim's provider faults and against recorded real
provider answers replayed by a tiny server (tests/api/replay.py).
"""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import openai
import pytest

from tests.api.replay import FIXTURES, Recorded, cassette, replaying
from tests.conftest import Gateway, Sim
from tokenworks.money import format_nano
from tokenworks.sim.faults import UPSTREAM_COST, error_reply

CHAT = [{"role": "user", "content": "Tell me about the power grid."}]


def client(gw: Gateway, secret: str, **kwargs: Any) -> openai.OpenAI:
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=gw.v1, api_key=secret, **kwargs)


def assert_provider_headers(headers: httpx.Headers, answer: bool = False) -> None:
    """The sim's provider headers as a client must see them (sim/faults.py PROVIDER_HEADERS)."""
    if answer:
        assert headers["x-request-id"].startswith("req_")  # the gateway's own id
    assert headers["x-upstream-request-id"]  # the provider's
    assert headers["openai-processing-ms"] == "7"
    assert headers["x-upstream-ratelimit-limit-requests"] == "500"
    assert headers["x-upstream-ratelimit-reset-requests"] == "120ms"
    # x-ratelimit-* are the gateway's own; the account's cookie and organisation stay behind.
    assert not [name for name in headers if name.startswith("x-ratelimit-")]
    assert "set-cookie" not in headers and "openai-organization" not in headers


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error_class", "code", "param"),
    [
        ("unsupported_parameter", openai.BadRequestError, "unsupported_parameter", "max_tokens"),
        ("model_not_found", openai.NotFoundError, "model_not_found", None),
        ("failed_generation", openai.BadRequestError, "tool_use_failed", None),
    ],
)
def test_an_upstream_4xx_reaches_the_client_as_sent(
    gateway: Gateway,
    sims: tuple[Sim, Sim],
    fault: str,
    error_class: type[openai.APIStatusError],
    code: str,
    param: str | None,
) -> None:
    _, b = sims
    key = gateway.create_key()
    with pytest.raises(error_class) as err:
        client(gateway, key["key"]).chat.completions.create(
            model="chat-fast", messages=CHAT, max_tokens=5, extra_body={"sim_fault": fault}
        )
    e = err.value
    status, body, _ = error_reply(fault, "sim-small", "unused")
    assert (e.status_code, e.code, e.param) == (status, code, param)
    # The body as the upstream sent it (Groq's failed_generation included), only the
    # upstream model's name replaced by the public one.
    sent = msgspec.json.decode(body)["error"]
    sent["message"] = sent["message"].replace("sim-small", "chat-fast")
    assert e.body == sent
    assert "sim-small" not in e.response.text
    assert_provider_headers(e.response.headers)
    # Not retried elsewhere: the request itself was refused.
    assert b.stats()["requests_total"] == 0
    [record] = gateway.records()
    assert record.status == status


def test_the_gateways_own_bad_credentials_are_a_502_naming_the_producer(
    gateway: Gateway, sims: tuple[Sim, Sim]
) -> None:
    a, b = sims
    key = gateway.create_key()
    # The SDK would retry a 502 twice; `x-should-retry: false` tells it not to.
    c = client(gateway, key["key"], max_retries=2)
    with pytest.raises(openai.InternalServerError) as err:
        c.chat.completions.create(
            model="chat-fast", messages=CHAT, max_tokens=5, extra_body={"sim_fault": "forbidden"}
        )
    e = err.value
    assert e.status_code == 502 and e.code == "upstream_credentials"
    assert "producer 'b'" in e.message and "not your API key" in e.message
    assert [r.status for r in gateway.records()] == [502]
    # Both deployments were tried: another producer's credentials may work.
    assert a.stats()["requests_total"] == 1 and b.stats()["requests_total"] == 1
    # ... and when one does, the client never hears of the other's.
    a.fault("bad_credentials")
    reply = c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=5)
    assert reply.model == "chat-fast" and reply.choices[0].message.content


def test_an_upstream_429_passes_as_sent_when_no_deployment_is_left(
    gateway: Gateway, sims: tuple[Sim, Sim]
) -> None:
    key = gateway.create_key()
    with pytest.raises(openai.RateLimitError) as err:
        client(gateway, key["key"]).chat.completions.create(
            model="chat-fast",
            messages=CHAT,
            max_tokens=5,
            extra_body={"sim_fault": "rate_limited"},
        )
    e = err.value
    assert e.code == "rate_limit_exceeded" and e.body["type"] == "requests"
    assert "Rate limit reached for chat-fast" in e.message
    assert e.response.headers["retry-after-ms"] == "200"
    assert e.response.headers["retry-after"] == "1"
    assert_provider_headers(e.response.headers)


def test_the_sdks_retry_waits_what_the_upstream_asked_in_retry_after_ms(
    gateway: Gateway, sims: tuple[Sim, Sim]
) -> None:
    a, _ = sims
    waits: list[float] = []

    class Spy(openai.OpenAI):
        def _calculate_retry_timeout(self, *args: Any, **kwargs: Any) -> float:
            wait = super()._calculate_retry_timeout(*args, **kwargs)
            waits.append(wait)
            return wait

    key = gateway.create_key()
    # The gateway retries a capacity refusal itself after the pause, as long as attempts
    # remain (max_attempts 3 here); refused every time, the client sees the 429 as sent.
    a.fault("rate_limited", count=3)
    c = Spy(base_url=gateway.v1, api_key=key["key"], max_retries=2)
    reply = c.chat.completions.create(model="chat-a-only", messages=CHAT, max_tokens=5)
    assert reply.choices[0].message.content
    # 0.2 s from retry-after-ms, not the 1 s of retry-after nor the SDK's own backoff.
    assert waits == [0.2]


# -- headers and cost on answers ------------------------------------------------------------


def test_provider_headers_pass_on_answers_and_streams(gateway: Gateway) -> None:
    key = gateway.create_key()
    raw = client(gateway, key["key"]).chat.completions.with_raw_response.create(
        model="chat-fast", messages=CHAT, max_tokens=5, extra_body={"sim_fault": "provider_headers"}
    )
    assert_provider_headers(raw.headers, answer=True)
    assert raw.headers["x-upstream-request-id"] == raw.parse().id  # the sim's id is its own
    body = {
        "model": "chat-fast",
        "messages": CHAT,
        "max_tokens": 5,
        "stream": True,
        "sim_fault": "provider_headers",
    }
    auth = {"Authorization": f"Bearer {key['key']}"}
    with httpx.stream("POST", f"{gateway.v1}/chat/completions", json=body, headers=auth) as r:
        r.read()
        assert r.status_code == 200
        assert_provider_headers(r.headers, answer=True)


def test_the_gateways_price_is_the_one_cost_and_the_upstreams_is_kept_apart(
    gateway: Gateway,
) -> None:
    key = gateway.create_key()
    auth = {"Authorization": f"Bearer {key['key']}"}
    body: dict[str, Any] = {
        "model": "chat-fast",
        "messages": CHAT,
        "max_tokens": 5,
        "sim_fault": "upstream_cost",
    }
    r = httpx.post(f"{gateway.v1}/chat/completions", json=body, headers=auth)
    assert r.status_code == 200, r.text
    assert r.content.count(b'"cost"') == 1
    usage = r.json()["usage"]
    assert usage["cost"] == r.headers["x-tokenworks-price"]
    assert usage["upstream_cost"] == UPSTREAM_COST
    # A stream's usage chunk: one cost too, the price the record says was charged.
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{gateway.v1}/chat/completions", json=body, headers=auth) as s:
        events = [e for e in s.read().split(b"\n\n") if e.startswith(b"data: {")]
    assert all(e.count(b'"cost"') <= 1 for e in events)
    [usage_event] = [e for e in events if b'"usage":{' in e]
    shown = msgspec.json.decode(usage_event[6:])["usage"]
    stream_record = next(rec for rec in gateway.records(expect=2) if rec.streamed)
    assert shown["cost"] == format_nano(stream_record.price_nano)
    assert shown["upstream_cost"] == UPSTREAM_COST


# -- SSE framing ----------------------------------------------------------------------------


def test_a_crlf_stream_with_comments_reaches_the_client_in_its_own_framing(
    gateway: Gateway,
) -> None:
    key = gateway.create_key()
    body = {
        "model": "chat-fast",
        "messages": CHAT,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
        "sim_fault": "crlf",
    }
    auth = {"Authorization": f"Bearer {key['key']}"}
    with httpx.stream("POST", f"{gateway.v1}/chat/completions", json=body, headers=auth) as r:
        raw = r.read()
    assert raw.startswith(b": OPENROUTER PROCESSING\r\n\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")  # every line end is CRLF
    assert raw.endswith(b"data: [DONE]\r\n\r\n")
    assert b'"usage":{' in raw and b'"cost":' in raw
    # The SDK reads it as any stream.
    stream = client(gateway, key["key"]).chat.completions.create(
        model="chat-fast",
        messages=CHAT,
        max_tokens=5,
        stream=True,
        extra_body={"sim_fault": "crlf"},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert len(text.split()) == 5


def _framed(recorded: bytes, line_end: bytes) -> tuple[bytes, bytes]:
    """A recorded LF stream re-framed with comments, `id:` and `event:` lines in `line_end`s;
    and what a client that did not ask for usage must get: the same bytes, the model renamed
    and the usage chunk (which the gateway asked for on its behalf) left out."""
    frames = [f for f in recorded.split(b"\n\n") if f.strip()]
    sent, expected = [b": keep-alive\n\n"], [b": keep-alive\n\n"]
    for i, frame in enumerate(frames):
        event = b"id: %d\n" % i + (b"event: chunk\n" if i == 1 else b"") + frame + b"\n\n"
        sent.append(event)
        if b'"choices":[],"usage"' not in frame:
            expected.append(event.replace(b'"model":"gpt-4o-2024-08-06"', b'"model":"chat-r"'))
    return (
        b"".join(sent).replace(b"\n", line_end),
        b"".join(expected).replace(b"\n", line_end),
    )


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_a_recorded_stream_passes_byte_for_byte_in_any_framing(
    make_gateway: Any, line_end: bytes
) -> None:
    recorded = (FIXTURES / "openai_chat_text_stream.txt").read_bytes()
    sent, expected = _framed(recorded, line_end)
    upstream = Recorded(200, [("content-type", "text/event-stream")], sent)
    models = """\
    models:
      - name: chat-r
        deployments:
          - {producer: r, model: gpt-4o-2024-08-06}
    """
    with replaying(upstream) as url, make_gateway({"r": url}, models) as gw:
        key = gw.create_key()
        body = {"model": "chat-r", "messages": CHAT, "stream": True}
        auth = {"Authorization": f"Bearer {key['key']}"}
        with httpx.stream("POST", f"{gw.v1}/chat/completions", json=body, headers=auth) as r:
            raw = r.read()
        assert raw == expected
        [record] = gw.records()
        assert (record.usage.input_tokens, record.usage.output_tokens) == (9, 2)
        assert not record.usage.estimated


# -- recorded real errors and streams -------------------------------------------------------


def test_recorded_provider_errors_reach_the_sdk_as_the_provider_sent_them(
    make_gateway: Any,
) -> None:
    models = """\
    models:
      - name: groq-chat
        deployments:
          - {producer: groq, model: non-existent}
      - name: o1
        deployments:
          - {producer: openai, model: o1-mini}
    """
    groq, oai = cassette("groq_error_404.yaml"), cassette("openai_error_400.yaml")
    with (
        replaying(groq) as groq_url,
        replaying(oai) as openai_url,
        make_gateway({"groq": groq_url, "openai": openai_url}, models) as gw,
    ):
        c = client(gw, gw.create_key()["key"])
        with pytest.raises(openai.NotFoundError) as not_found:
            c.chat.completions.create(model="groq-chat", messages=CHAT)
        e = not_found.value
        assert e.code == "model_not_found" and e.body["type"] == "invalid_request_error"
        assert e.message.endswith(
            "The model `groq-chat` does not exist or you do not have access to it."
        )
        with pytest.raises(openai.BadRequestError) as bad:
            c.chat.completions.create(model="o1", messages=CHAT)
        e2 = bad.value
        assert (e2.code, e2.param) == ("unsupported_value", "messages[0].role")
        assert e2.response.headers["openai-processing-ms"] == "157"
        assert e2.response.headers["openai-version"] == "2020-10-01"
        assert "openai-organization" not in e2.response.headers


def test_openrouters_recorded_stream_keeps_its_comments_and_shows_one_cost(
    make_gateway: Any,
) -> None:
    upstream = cassette("openrouter_reasoning_stream.yaml")
    models = """\
    models:
      - name: claude
        deployments:
          - {producer: openrouter, model: anthropic/claude-sonnet-4.5}
    """
    with replaying(upstream) as url, make_gateway({"openrouter": url}, models) as gw:
        key = gw.create_key()
        body = {
            "model": "claude",
            "messages": CHAT,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        auth = {"Authorization": f"Bearer {key['key']}"}
        with httpx.stream("POST", f"{gw.v1}/chat/completions", json=body, headers=auth) as r:
            raw = r.read()
        [record] = gw.records()
    assert raw.count(b": OPENROUTER PROCESSING\n\n") == upstream.body.count(
        b": OPENROUTER PROCESSING\n\n"
    )
    assert raw.startswith(b": OPENROUTER PROCESSING\n\n: OPENROUTER PROCESSING\n\n")
    assert b"anthropic/claude-sonnet-4.5" not in raw
    chunks = [msgspec.json.decode(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    assert all(e.count(b'"cost"') <= 1 for e in raw.split(b"\n\n"))
    # OpenRouter's own figure stays for reconciliation; the gateway's price is the one cost.
    kept = [c["usage"]["upstream_cost"] for c in chunks if "upstream_cost" in c.get("usage", {})]
    assert kept and all(cost == 0.000669 for cost in kept)
    costs = [c["usage"]["cost"] for c in chunks if "cost" in (c.get("usage") or {})]
    assert costs == [format_nano(record.price_nano)]
    assert (record.usage.input_tokens, record.usage.output_tokens) == (43, 36)
    assert record.usage.reasoning_tokens == 13 and not record.usage.estimated


def _replayed_stream(make_gateway: Any, fixture: str, upstream_model: str) -> tuple[bytes, Any]:
    """A recorded stream (tests/wire/fixtures) replayed through a gateway to a client that
    asked for usage: the bytes it got and the request's usage record."""
    upstream = Recorded(
        200, [("content-type", "text/event-stream")], (FIXTURES / fixture).read_bytes()
    )
    models = f"""\
    models:
      - name: public
        deployments:
          - {{producer: p, model: {upstream_model}}}
    """
    with replaying(upstream) as url, make_gateway({"p": url}, models) as gw:
        key = gw.create_key()
        body = {
            "model": "public",
            "messages": CHAT,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        auth = {"Authorization": f"Bearer {key['key']}"}
        with httpx.stream("POST", f"{gw.v1}/chat/completions", json=body, headers=auth) as r:
            raw = r.read()
        [record] = gw.records()
    return raw, record


def _last_usage(raw: bytes) -> dict[str, Any]:
    chunks = [msgspec.json.decode(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    return [c["usage"] for c in chunks if c.get("usage")][-1]


def test_groqs_recorded_stream_is_metered_from_its_usage_and_x_groq(make_gateway: Any) -> None:
    raw, record = _replayed_stream(
        make_gateway, "groq_x_groq_usage_stream.txt", "openai/gpt-oss-120b"
    )
    usage = record.usage
    assert (usage.input_tokens, usage.output_tokens, usage.reasoning_tokens) == (304, 49, 23)
    assert not usage.estimated
    shown = _last_usage(raw)  # the gateway's usage chunk: the counts charged, and the price
    assert (shown["prompt_tokens"], shown["completion_tokens"]) == (304, 49)
    assert shown["cost"] == format_nano(record.price_nano)
    assert raw.endswith(b"data: [DONE]\n\n")


def test_zais_recorded_stream_is_metered_from_its_last_chunk(make_gateway: Any) -> None:
    raw, record = _replayed_stream(make_gateway, "zai_thinking_stream.txt", "glm-4.7")
    usage = record.usage
    assert (usage.input_tokens, usage.output_tokens, usage.reasoning_tokens) == (13, 564, 561)
    assert not usage.estimated
    assert _last_usage(raw)["cost"] == format_nano(record.price_nano)


def test_groqs_recorded_error_event_passes_as_sent_and_the_stream_ends_cut(
    make_gateway: Any,
) -> None:
    """Groq ends a stream with `event: error` and the error (with `failed_generation`): the
    client gets that event byte for byte, and no `[DONE]`, so it knows the answer is cut."""
    raw, record = _replayed_stream(make_gateway, "groq_error_midstream.txt", "openai/gpt-oss-120b")
    recorded = (FIXTURES / "groq_error_midstream.txt").read_bytes()
    error_event = recorded[recorded.index(b"event: error\n") :]
    assert error_event in raw and b"[DONE]" not in raw
    assert b'"failed_generation":' in raw
    assert record.status == 502 and record.usage.estimated
