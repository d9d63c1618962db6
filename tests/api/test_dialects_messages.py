"""POST /v1/messages with the official `anthropic` SDK, over real HTTP, on a producer that
speaks Messages (passed through) and on one that speaks chat completions only (translated);
and the reverse: the `openai` SDK's chat completions on a `kind: anthropic` producer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.api.dialects_setup import cost_nano, dialect_gateway
from tests.conftest import Gateway, Sim

BOTH = pytest.mark.parametrize(
    ("model", "producer"), [("m-native", "native"), ("m-chat", "chatonly")]
)
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
MAX_TURNS = 5


@pytest.fixture
def gw(sims: tuple[Sim, Sim], database: str) -> Iterator[Gateway]:
    with dialect_gateway(database, *sims) as gateway:
        yield gateway


def _client(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key, base_url=gw.url, max_retries=0, timeout=30)


def _record(gw: Gateway, n: int = 1) -> Any:
    records = gw.records(n)
    assert len(records) == n, records
    return records[-1]


def _check_charged(record: Any, usage: Any, cost: Any = None) -> None:
    """The record holds exactly what the answer reported, priced by the book."""
    fresh = usage.input_tokens
    read = usage.cache_read_input_tokens or 0
    written = usage.cache_creation_input_tokens or 0
    assert record.usage.input_tokens == fresh + read + written
    assert record.usage.cached_input_tokens == read
    assert record.usage.cache_write_tokens == written
    assert record.usage.output_tokens == usage.output_tokens
    assert not record.usage.estimated
    assert record.cost_nano == cost_nano(record.usage) > 0
    # The price charged, as `cost` in the usage (a stream's in its message_delta event).
    shown = (usage if cost is None else cost).model_extra["cost"]
    assert shown == f"{record.price_nano / 1e9:.9f}".rstrip("0").rstrip(".")


@BOTH
def test_plain_message_is_answered_metered_and_priced(gw: Gateway, model: str, producer: str):
    key = gw.create_key()["key"]
    message = _client(gw, key).messages.create(
        model=model, max_tokens=64, messages=[{"role": "user", "content": "Say hello"}]
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.model == model
    assert message.content[0].type == "text" and message.content[0].text
    record = _record(gw)
    assert (record.endpoint, record.producer, record.status) == ("messages", producer, 200)
    _check_charged(record, message.usage)


@BOTH
def test_streamed_message_has_its_events_and_usage_in_message_delta(
    gw: Gateway, model: str, producer: str
):
    key = gw.create_key()["key"]
    with _client(gw, key).messages.stream(
        model=model, max_tokens=64, messages=[{"role": "user", "content": "Say hello"}]
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [event.type for event in events]
    [delta] = [event for event in events if event.type == "message_delta"]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "message_delta" in kinds and "content_block_delta" in kinds
    assert final.content[0].type == "text" and final.content[0].text
    record = _record(gw)
    assert (record.endpoint, record.producer, record.streamed) == ("messages", producer, True)
    _check_charged(record, final.usage, delta.usage)


@BOTH
def test_an_agent_loop_with_tool_use_runs_to_end_turn(gw: Gateway, model: str, producer: str):
    """Call, run the tool, send its tool_result, until the model ends its turn."""
    key = gw.create_key()["key"]
    client = _client(gw, key)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    calls: list[dict[str, Any]] = []
    for turn in range(MAX_TURNS):
        stream = turn % 2 == 1  # the turns alternate plain and streamed
        if stream:
            with client.messages.stream(
                model=model, max_tokens=64, tools=[WEATHER_TOOL], messages=messages
            ) as s:
                reply = s.get_final_message()
        else:
            reply = client.messages.create(
                model=model, max_tokens=64, tools=[WEATHER_TOOL], messages=messages
            )
        messages.append({"role": "assistant", "content": [b.model_dump() for b in reply.content]})
        if reply.stop_reason != "tool_use":
            assert reply.stop_reason in ("end_turn", "max_tokens")
            break
        results = []
        for block in reply.content:
            if block.type == "tool_use":
                calls.append({"name": block.name, "input": block.input})
                results.append(
                    {"type": "tool_result", "tool_use_id": block.id, "content": "sunny, 21 C"}
                )
        messages.append({"role": "user", "content": results})
    else:
        pytest.fail("the agent loop did not end")
    assert calls == [{"name": "get_weather", "input": {"city": "sim"}}]
    assert len(gw.records(2)) == 2


def test_cache_control_writes_then_reads_and_both_are_priced(gw: Gateway):
    key = gw.create_key()["key"]
    client = _client(gw, key)
    system = [
        {"type": "text", "text": "You are terse. " * 50, "cache_control": {"type": "ephemeral"}}
    ]
    first = client.messages.create(
        model="m-native", max_tokens=32, system=system, messages=[{"role": "user", "content": "a"}]
    )
    assert first.usage.cache_creation_input_tokens > 0
    assert first.usage.cache_read_input_tokens == 0
    _check_charged(_record(gw, 1), first.usage)
    with client.messages.stream(
        model="m-native", max_tokens=32, system=system, messages=[{"role": "user", "content": "b"}]
    ) as stream:
        second = stream.get_final_message()
    assert second.usage.cache_read_input_tokens > 0
    record = gw.records(2)[-1]
    assert record.usage.cached_input_tokens == second.usage.cache_read_input_tokens
    assert record.usage.cache_write_tokens == 0
    assert record.cost_nano == cost_nano(record.usage)


@BOTH
def test_count_tokens(gw: Gateway, model: str, producer: str):
    key = gw.create_key()["key"]
    counted = _client(gw, key).messages.count_tokens(
        model=model, messages=[{"role": "user", "content": "Count these words please"}]
    )
    assert counted.input_tokens > 0
    message = _client(gw, key).messages.create(
        model=model,
        max_tokens=8,
        messages=[{"role": "user", "content": "Count these words please"}],
    )
    if producer == "native":  # the producer's own count: what it bills
        total = message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
        assert counted.input_tokens == total


def test_images_pass_as_image_parts_on_translation(gw: Gateway):
    key = gw.create_key()["key"]
    pixel = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": pixel}},
        {"type": "text", "text": "What is this?"},
    ]
    for model in ("m-native", "m-chat"):
        message = _client(gw, key).messages.create(
            model=model, max_tokens=16, messages=[{"role": "user", "content": content}]
        )
        assert message.content[0].text


def test_errors_are_anthropic_shaped_and_typed(gw: Gateway, sims: tuple[Sim, Sim]):
    key = gw.create_key()["key"]
    hello = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.AuthenticationError) as auth:
        _client(gw, "sk-wrong").messages.create(model="m-chat", max_tokens=8, messages=hello)
    assert auth.value.body["error"]["type"] == "authentication_error"
    raw = httpx.post(f"{gw.v1}/messages", json={"model": "m-chat"}, timeout=10)
    assert raw.status_code == 401
    assert raw.json()["type"] == "error" and raw.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        _client(gw, key).messages.create(model="nope", max_tokens=8, messages=hello)
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        _client(gw, key).messages.create(
            model="m-chat",
            max_tokens=8,
            messages=hello,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],  # type: ignore[list-item]
        )
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    # A capacity refusal is tried again after its pause while attempts remain (the
    # dispatcher); refused every time, the client gets Anthropic's rate_limit_error.
    sims[1].fault("429", count=3)
    with pytest.raises(anthropic.RateLimitError) as limited:
        _client(gw, key).messages.create(model="m-chat", max_tokens=8, messages=hello)
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    sims[1].clear_faults()
    # Bearer auth works too (Claude Code's ANTHROPIC_AUTH_TOKEN).
    bearer = anthropic.Anthropic(auth_token=key, base_url=gw.url, max_retries=0)
    assert bearer.messages.create(model="m-chat", max_tokens=8, messages=hello).content


def test_budget_refusal_is_a_402_billing_error(gw: Gateway):
    _, key = gw.funded_key(10, name="poor")  # 10 nano: less than any worst case
    with pytest.raises(anthropic.APIStatusError) as refused:
        _client(gw, key["key"]).messages.create(
            model="m-chat", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.status_code == 402
    assert refused.value.body["error"]["type"] == "billing_error"


def test_failover_from_a_messages_producer_to_a_chat_one(gw: Gateway):
    key = gw.create_key()["key"]
    message = _client(gw, key).messages.create(
        model="m-failover", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].text
    record = _record(gw)
    assert record.producer == "chatonly"
    _check_charged(record, message.usage)


def test_an_openai_client_reaches_an_anthropic_producer(gw: Gateway):
    key = gw.create_key()["key"]
    client = openai.OpenAI(api_key=key, base_url=gw.v1, max_retries=0)
    answer = client.chat.completions.create(
        model="m-claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content and answer.model == "m-claude"
    record = _record(gw)
    assert (record.endpoint, record.producer) == ("chat", "claude")
    assert record.usage.input_tokens == answer.usage.prompt_tokens
    assert record.usage.output_tokens == answer.usage.completion_tokens
    assert record.cost_nano == cost_nano(record.usage)
    chunks = list(
        client.chat.completions.create(
            model="m-claude",
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "hi"}],
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None
    record = gw.records(2)[-1]
    assert record.usage.output_tokens == chunks[-1].usage.completion_tokens
    assert chunks[-1].usage.model_extra["cost"]
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    called = client.chat.completions.create(
        model="m-claude", max_tokens=16, tools=[tool], messages=[{"role": "user", "content": "?"}]
    )
    [call] = called.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and call.function.arguments == '{"city":"sim"}'
    assert called.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["m-native", "m-chat"])
def test_an_answer_without_usage_is_charged_the_estimate_and_shows_it(
    gw: Gateway, sims: tuple[Sim, Sim], model: str, stream: bool
):
    """The upstream reported no counts (zeros): implausible for an answer with text, so the
    offline estimate is charged, and the answer shows what was charged."""
    sims[0 if model == "m-native" else 1].fault("no_usage")
    key = gw.create_key()["key"]
    ask = {"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": "Hello"}]}
    if stream:
        with _client(gw, key).messages.stream(**ask) as s:  # type: ignore[arg-type]
            message = s.get_final_message()
    else:
        message = _client(gw, key).messages.create(**ask)  # type: ignore[arg-type]
    assert message.content[0].text
    record = _record(gw)
    assert record.usage.estimated and record.usage.output_tokens > 0
    assert message.usage.output_tokens == record.usage.output_tokens
    if not stream:  # a stream's input count is message_start's, sent before the estimate
        assert message.usage.input_tokens == record.usage.input_tokens
