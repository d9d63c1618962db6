"""Messages <-> chat completions, checked on recorded provider traffic and by the official SDKs.

The SDKs read our output through their own parsers and accumulators: an `httpx.MockTransport`
stands in for the network, so `anthropic.Anthropic().messages.stream(...)` and
`openai.OpenAI().chat.completions.stream(...)` consume exactly the bytes a route would send.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import anthropic
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletion

from tokenworks.wire import Untranslatable
from tokenworks.wire import anthropic as wire
from tokenworks.wire.sse import SSESplitter, data_of

FIXTURES = Path(__file__).parent / "fixtures"


def cassette(name: str) -> list[dict[str, Any]]:
    return yaml.safe_load((FIXTURES / name).read_text())["interactions"]


def recorded_sse(name: str) -> bytes:
    if name.endswith(".txt"):
        return (FIXTURES / name).read_bytes()
    return cassette(name)[0]["response"]["body"]["string"].encode()


def frames(raw: bytes) -> list[bytes]:
    splitter = SSESplitter()
    out = splitter.feed(raw)
    rest = splitter.rest()
    if rest.strip():
        out.append(rest + b"\n\n")  # some recordings omit the final blank line
    return out


def translate(stream: Any, raw: bytes) -> bytes:
    return b"".join(stream.feed_sse(frame) for frame in frames(raw))


def sse_transport(sdk: ModuleType, body: bytes, status: int = 200) -> Any:
    """An HTTP client of the SDK's own HTTP library (httpx, or httpx2 in newer SDKs) that
    answers every request with `body`: the SDK parses exactly the bytes a route would send."""
    base = importlib.import_module(sdk.__name__ + "._base_client")
    http = getattr(base, "httpx2", None) or base.httpx
    kind = "text/event-stream" if status == 200 else "application/json"

    def handler(request: Any) -> Any:
        return http.Response(status, content=body, headers={"content-type": kind})

    return http.Client(transport=http.MockTransport(handler))


def anthropic_client(body: bytes, status: int = 200) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="k", http_client=sse_transport(anthropic, body, status), max_retries=0
    )


def openai_client(body: bytes, status: int = 200) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="k", http_client=sse_transport(openai, body, status), max_retries=0
    )


def chat_stream_events(raw: bytes) -> list[dict[str, Any]]:
    events = []
    for frame in frames(raw):
        data = data_of(frame)  # None for comment-only events (OpenRouter's keep-alives)
        if data is not None and data != b"[DONE]":
            events.append(json.loads(data))
    return events


# --- requests ----------------------------------------------------------------------------------


def test_recorded_tool_loop_request_becomes_chat() -> None:
    body = cassette("anthropic_tool_use.yaml")[1]["request"]["parsed_body"]
    chat = wire.messages_request_to_chat(body)
    assert chat["max_tokens"] == 4096 and "stream" not in chat
    assert chat["tool_choice"] == "required"  # Anthropic "any"
    assert [t["function"]["name"] for t in chat["tools"]] == ["get_user_country", "final_result"]
    assert chat["tools"][1]["function"]["parameters"]["required"] == ["city", "country"]
    user, assistant, tool = chat["messages"]
    assert user == {"role": "user", "content": "What is the largest city in the user country?"}
    call = assistant["tool_calls"][0]
    use = body["messages"][1]["content"][0]
    assert call["id"] == use["id"] and call["function"]["name"] == use["name"]
    assert json.loads(call["function"]["arguments"]) == use["input"]
    assert tool == {"role": "tool", "tool_call_id": call["id"], "content": "Mexico"}


def test_recorded_system_blocks_and_thinking_become_chat() -> None:
    cached = cassette("anthropic_cache.yaml")[0]["request"]["parsed_body"]
    chat = wire.messages_request_to_chat(cached)
    assert chat["messages"][0] == {"role": "system", "content": cached["system"]}
    as_blocks = dict(
        cached,
        system=[
            {"type": "text", "text": cached["system"], "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Second."},
        ],
    )
    assert (
        wire.messages_request_to_chat(as_blocks)["messages"][0]["content"]
        == cached["system"] + "\n\nSecond."
    )
    # cache_control marks on content blocks are dropped, the text kept.
    assert "cache_control" not in json.dumps(chat)
    thinking = cassette("anthropic_thinking_stream.yaml")[0]["request"]["parsed_body"]
    chat = wire.messages_request_to_chat(thinking)
    assert chat["reasoning_effort"] == "low"  # budget 1024
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}


def test_request_fields_map_both_ways() -> None:
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 300,
        "system": "be brief",
        "stop_sequences": ["END"],
        "temperature": 0.3,
        "top_p": 0.9,
        "metadata": {"user_id": "u-7"},
        "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": True},
        "tools": [
            {
                "name": "f",
                "description": "d",
                "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
            }
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/a.png"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "calling"},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": [{"type": "text", "text": "2"}],
                    },
                    {"type": "text", "text": "and?"},
                ],
            },
        ],
    }
    chat = wire.messages_request_to_chat(body)
    assert chat["stop"] == ["END"] and chat["user"] == "u-7" and chat["temperature"] == 0.3
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["parallel_tool_calls"] is False
    image_parts = chat["messages"][1]["content"][1:]
    assert image_parts[0]["image_url"]["url"] == "data:image/png;base64,iVBO"
    assert image_parts[1]["image_url"]["url"] == "https://example.com/a.png"
    # The tool answer directly follows the assistant's call; the user's text comes after it.
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "tool", "user"]

    back = wire.chat_request_to_messages(chat)
    assert back["system"] == "be brief" and back["stop_sequences"] == ["END"]
    assert back["metadata"] == {"user_id": "u-7"} and back["max_tokens"] == 300
    assert back["tool_choice"] == {"type": "tool", "name": "f", "disable_parallel_tool_use": True}
    assert back["tools"] == body["tools"]
    assert back["messages"][0]["content"] == body["messages"][0]["content"]
    assert back["messages"][1] == body["messages"][1]
    result, text = back["messages"][2]["content"]
    assert result == {"type": "tool_result", "tool_use_id": "t1", "content": "2"}
    assert text == {"type": "text", "text": "and?"}


def test_recorded_chat_tool_request_becomes_messages() -> None:
    body = cassette("openai_chat_tool_calls.yaml")[1]["request"]["parsed_body"]
    out = wire.chat_request_to_messages(body)
    assert out["max_tokens"] == 4096  # Anthropic requires it; the client sent none
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["user", "assistant", "user"]  # alternating, tool answer in a user turn
    call = next(b for b in out["messages"][1]["content"] if b["type"] == "tool_use")
    source = body["messages"][1]["tool_calls"][0]
    assert call["id"] == source["id"] and call["input"] == json.loads(
        source["function"]["arguments"]
    )
    assert out["messages"][2]["content"][0]["tool_use_id"] == source["id"]
    assert out["tool_choice"] == {"type": "any"}
    assert (
        wire.messages_request_to_chat(out)["messages"][1]["tool_calls"][0]["function"]["name"]
        == source["function"]["name"]
    )


def test_reasoning_effort_becomes_a_thinking_budget_below_max_tokens() -> None:
    out = wire.chat_request_to_messages(
        {
            "model": "m",
            "messages": [],
            "reasoning_effort": "high",
            "max_tokens": 2000,
            "temperature": 0.2,
        }
    )
    assert out["thinking"] == {"type": "enabled", "budget_tokens": 1999}
    assert "temperature" not in out
    assert "thinking" not in wire.chat_request_to_messages(
        {"model": "m", "messages": [], "reasoning_effort": "low", "max_tokens": 500}
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "tools.0",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "search_result", "content": []}]}]},
            "messages.0.content.0",
        ),
        ({"messages": [{"role": "narrator", "content": "x"}]}, "messages.0.role"),
        ({"messages": "hi"}, "messages"),
    ],
)
def test_what_chat_cannot_say_is_a_clear_error(body: dict[str, Any], param: str) -> None:
    with pytest.raises(Untranslatable) as caught:
        wire.messages_request_to_chat(body)
    assert caught.value.param == param


def test_chat_only_features_are_refused_for_messages() -> None:
    with pytest.raises(Untranslatable, match="n > 1"):
        wire.chat_request_to_messages({"messages": [], "n": 2})
    with pytest.raises(Untranslatable):
        wire.chat_request_to_messages({"messages": [], "tools": [{"type": "custom", "custom": {}}]})


# --- responses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["openai_chat_tool_calls.yaml", "deepseek_reasoning.yaml", "openrouter_cached.yaml"],
)
def test_recorded_chat_completions_become_valid_messages(name: str) -> None:
    for interaction in cassette(name):
        chat = interaction["response"]["parsed_body"]
        message = anthropic.types.Message.model_validate(wire.chat_response_to_messages(chat))
        choice = chat["choices"][0]
        assert message.id == chat["id"] and message.model == chat["model"]
        if choice["message"].get("tool_calls"):
            assert message.stop_reason == "tool_use"
            uses = [b for b in message.content if b.type == "tool_use"]
            assert [u.input for u in uses] == [
                json.loads(c["function"]["arguments"]) for c in choice["message"]["tool_calls"]
            ]
        else:
            assert message.stop_reason == "end_turn"
            text = "".join(b.text for b in message.content if b.type == "text")
            assert text == choice["message"]["content"]
        if choice["message"].get("reasoning_content"):
            assert message.content[0].type == "thinking"
            assert message.content[0].thinking == choice["message"]["reasoning_content"]
        usage = chat["usage"]
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        assert message.usage.cache_read_input_tokens == cached
        assert message.usage.input_tokens + cached == usage["prompt_tokens"]
        assert message.usage.output_tokens == usage["completion_tokens"]
        # And back: the chat form of our Messages answer carries the same counts and content.
        again = ChatCompletion.model_validate(wire.messages_response_to_chat(message.model_dump()))
        assert again.usage is not None and again.usage.prompt_tokens == usage["prompt_tokens"]
        assert again.choices[0].finish_reason == choice["finish_reason"]
        assert (again.choices[0].message.content or None) == (
            choice["message"].get("content") or None
        )


@pytest.mark.parametrize("name", ["anthropic_tool_use.yaml", "anthropic_cache.yaml"])
def test_recorded_messages_become_valid_chat_completions(name: str) -> None:
    for interaction in cassette(name):
        message = interaction["response"]["parsed_body"]
        chat = ChatCompletion.model_validate(wire.messages_response_to_chat(message, created=1))
        usage = message["usage"]
        assert chat.usage is not None
        prompt = (
            usage["input_tokens"]
            + usage["cache_read_input_tokens"]
            + usage["cache_creation_input_tokens"]
        )
        assert chat.usage.prompt_tokens == prompt
        assert chat.usage.prompt_tokens_details is not None
        assert chat.usage.prompt_tokens_details.cached_tokens == usage["cache_read_input_tokens"]
        assert chat.usage.completion_tokens == usage["output_tokens"]
        tool_uses = [b for b in message["content"] if b["type"] == "tool_use"]
        calls = chat.choices[0].message.tool_calls or []
        assert [(c.id, json.loads(c.function.arguments)) for c in calls] == [
            (u["id"], u["input"]) for u in tool_uses
        ]
        assert chat.choices[0].finish_reason == ("tool_calls" if tool_uses else "stop")
        # Round trip back to Messages keeps content blocks, stop reason and the usage split.
        back = wire.chat_response_to_messages(chat.model_dump())
        assert back["stop_reason"] == message["stop_reason"]
        assert [b["type"] for b in back["content"]] == [b["type"] for b in message["content"]]
        for name_ in (
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
        ):
            assert back["usage"][name_] == usage[name_]


def test_usage_from_recorded_messages_counts_cache_writes_and_reads() -> None:
    first, second = (
        i["response"]["parsed_body"]["usage"] for i in cassette("anthropic_cache.yaml")
    )
    usage = wire.usage_from_messages(second)
    assert usage.input_tokens == 3 + 418 + 1111
    assert usage.cached_input_tokens == 1111 and usage.cache_write_tokens == 418
    assert usage.cache_write_1h_tokens == 0 and not usage.estimated
    assert wire.usage_from_messages(first).cache_write_tokens == 0
    one_hour = wire.usage_from_messages(
        {
            "input_tokens": 1,
            "cache_creation_input_tokens": 10,
            "cache_creation": {"ephemeral_1h_input_tokens": 10},
            "output_tokens": 2,
        }
    )
    assert one_hour.cache_write_1h_tokens == 10 and one_hour.input_tokens == 11


def test_usage_collector_reads_a_recorded_stream() -> None:
    collector = wire.MessagesUsageCollector()
    for frame in frames(recorded_sse("anthropic_thinking_stream.yaml")):
        collector.feed(json.loads(frame.split(b"data: ", 1)[1]))
    usage = collector.usage()
    assert usage.input_tokens == 43 and usage.output_tokens > 1  # message_delta's total wins


# --- streams: chat -> Messages ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "openai_chat_parallel_tools_stream.txt",
        "openai_chat_text_stream.txt",
        "openai_chat_length_stream.txt",
        "openrouter_reasoning_stream.yaml",
    ],
)
def test_recorded_chat_streams_are_read_by_the_anthropic_sdk(name: str) -> None:
    raw = recorded_sse(name)
    translator = wire.ChatToMessagesStream(model="public-model")
    body = translate(translator, raw)
    client = anthropic_client(body)
    with client.messages.stream(
        model="public-model", max_tokens=100, messages=[{"role": "user", "content": "x"}]
    ) as stream:
        final = stream.get_final_message()

    chunks = chat_stream_events(raw)
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    text = "".join(d.get("content") or "" for d in deltas)
    assert "".join(b.text for b in final.content if b.type == "text") == text
    reasoning = "".join(d.get("reasoning") or d.get("reasoning_content") or "" for d in deltas)
    assert "".join(b.thinking for b in final.content if b.type == "thinking") == reasoning
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        for call in d.get("tool_calls") or ():
            entry = calls.setdefault(call["index"], {"id": "", "arguments": ""})
            entry["id"] = call.get("id") or entry["id"]
            entry["arguments"] += call["function"].get("arguments") or ""
    uses = [b for b in final.content if b.type == "tool_use"]
    assert [(u.id, u.input) for u in uses] == [
        (c["id"], json.loads(c["arguments"])) for c in calls.values()
    ]
    finish = next(
        c["choices"][0]["finish_reason"]
        for c in reversed(chunks)
        if c.get("choices") and c["choices"][0]["finish_reason"]
    )
    assert final.stop_reason == wire.FINISH_TO_STOP_REASON[finish]
    usage = next(c["usage"] for c in reversed(chunks) if c.get("usage"))
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    assert (
        final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
        == usage["prompt_tokens"]
    )
    assert final.usage.cache_read_input_tokens == cached
    assert final.usage.output_tokens == usage["completion_tokens"]
    assert final.model == "public-model"
    metered = translator.usage()
    assert metered is not None and metered.input_tokens == usage["prompt_tokens"]


def test_chat_stream_events_follow_the_messages_grammar() -> None:
    translator = wire.ChatToMessagesStream()
    events: list[dict[str, Any]] = []
    for chunk in chat_stream_events(recorded_sse("openai_chat_parallel_tools_stream.txt")):
        events.extend(translator.feed(chunk))
    events.extend(translator.finish())
    assert translator.finish() == []  # a second [DONE] adds nothing
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == [
        "message_delta",
        "message_stop",
    ]
    open_block = None
    for event in events:  # blocks never overlap and indexes count up from 0
        if event["type"] == "content_block_start":
            assert open_block is None
            open_block = event["index"]
        elif event["type"] == "content_block_delta":
            assert event["index"] == open_block
        elif event["type"] == "content_block_stop":
            assert event["index"] == open_block
            open_block = None
    starts = [e["index"] for e in events if e["type"] == "content_block_start"]
    assert starts == list(range(len(starts))) == [0, 1]


def test_a_cut_chat_stream_never_says_message_stop() -> None:
    raw = recorded_sse("openai_chat_text_stream.txt")
    cut = b"".join(f for f in frames(raw) if b"[DONE]" not in f)
    out = translate(wire.ChatToMessagesStream(), cut)
    assert b"message_stop" not in out and b"content_block_delta" in out
    error = wire.encode_messages_event(
        wire.ChatToMessagesStream.error_event({"message": "upstream broke"})
    )
    assert error.startswith(b"event: error\ndata: ")
    client = anthropic_client(out + error)
    with (
        pytest.raises(anthropic.APIStatusError, match="upstream broke"),
        client.messages.stream(model="m", max_tokens=1, messages=[]) as stream,
    ):
        stream.get_final_message()


# --- streams: Messages -> chat ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["anthropic_tool_use_stream.txt", "anthropic_thinking_stream.yaml"]
)
def test_recorded_messages_streams_are_read_by_the_openai_sdk(name: str) -> None:
    raw = recorded_sse(name)
    translator = wire.MessagesToChatStream(created=1)
    body = translate(translator, raw)
    assert body.endswith(b"data: [DONE]\n\n")
    client = openai_client(body)
    with client.chat.completions.stream(
        model="m", messages=[{"role": "user", "content": "x"}]
    ) as stream:
        final = stream.get_final_completion()

    # What the anthropic SDK itself accumulates from the same recorded stream is the reference.
    with anthropic_client(raw).messages.stream(
        model="m", max_tokens=1, messages=[]
    ) as reference_stream:
        reference = reference_stream.get_final_message()
    expected = ChatCompletion.model_validate(
        wire.messages_response_to_chat(reference.model_dump(), created=1)
    )
    got, want = final.choices[0], expected.choices[0]
    assert got.finish_reason == want.finish_reason
    assert (got.message.content or "") == (want.message.content or "")
    got_calls = [
        (c.id, c.function.name, json.loads(c.function.arguments))
        for c in got.message.tool_calls or []
    ]
    want_calls = [
        (c.id, c.function.name, json.loads(c.function.arguments))
        for c in want.message.tool_calls or []
    ]
    assert got_calls == want_calls
    assert final.usage == expected.usage
    assert final.id == reference.id
    if any(b.type == "thinking" for b in reference.content):
        reasoning = "".join(
            c["choices"][0]["delta"].get("reasoning_content", "")
            for c in chat_stream_events(body)
            if c.get("choices")
        )
        assert reasoning == "".join(b.thinking for b in reference.content if b.type == "thinking")
    assert translator.usage() == wire.usage_from_messages(reference.usage.model_dump())


def test_usage_chunk_only_when_asked_and_no_done_when_cut() -> None:
    raw = recorded_sse("anthropic_tool_use_stream.txt")
    quiet = translate(wire.MessagesToChatStream(include_usage=False), raw)
    assert b'"usage"' not in quiet
    cut = b"".join(f for f in frames(raw) if b"message_stop" not in f)
    assert b"[DONE]" not in translate(wire.MessagesToChatStream(), cut)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sdk_error"),
    [
        ("openai_error_400.yaml", anthropic.BadRequestError),
        ("groq_error_404.yaml", anthropic.NotFoundError),
    ],
)
def test_recorded_openai_errors_reach_anthropic_clients_in_their_shape(
    name: str, sdk_error: type[Exception]
) -> None:
    response = cassette(name)[0]["response"]
    status, body = wire.openai_error_to_anthropic(
        response["status"]["code"], response["parsed_body"]
    )
    assert status == response["status"]["code"]
    assert body["error"]["message"] == response["parsed_body"]["error"]["message"]
    client = anthropic_client(json.dumps(body).encode(), status)
    with pytest.raises(sdk_error) as caught:
        client.messages.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body == body  # type: ignore[attr-defined]


def test_recorded_anthropic_error_reaches_openai_clients_in_their_shape() -> None:
    response = cassette("anthropic_error_400.yaml")[0]["response"]
    status, body = wire.anthropic_error_to_openai(
        response["status"]["code"], response["parsed_body"]
    )
    client = openai_client(json.dumps(body).encode(), status)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert caught.value.type == "invalid_request_error"
    assert (
        caught.value.message.endswith(response["parsed_body"]["error"]["message"])
        or response["parsed_body"]["error"]["message"] in caught.value.message
    )


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (529, "overloaded_error"),
        (422, "invalid_request_error"),
        (502, "api_error"),
    ],
)
def test_error_status_table(status: int, kind: str) -> None:
    got_status, body = wire.openai_error_to_anthropic(
        status, {"error": {"message": "m", "type": "x"}}
    )
    assert got_status == status and body == {
        "type": "error",
        "error": {"type": kind, "message": "m"},
    }
    back_status, back = wire.anthropic_error_to_openai(status, copy.deepcopy(body))
    assert back_status == status and back["error"]["message"] == "m"


def _sse_json(body: bytes) -> list[Any]:
    return [json.loads(d) for f in frames(body) if (d := data_of(f)) is not None and d != b"[DONE]"]


@pytest.mark.parametrize(
    "name",
    [
        "openai_chat_text_stream.txt",
        "openrouter_reasoning_stream.yaml",
        "openai_chat_parallel_tools_stream.txt",
    ],
)
def test_the_template_fast_path_says_what_the_general_path_says(name: str) -> None:
    raw = recorded_sse(name)
    fast = _sse_json(translate(wire.ChatToMessagesStream(model="m"), raw))
    general = wire.ChatToMessagesStream(model="m")
    slow = [e for c in chat_stream_events(raw) for e in general.feed(c)] + general.finish()
    assert fast == slow


@pytest.mark.parametrize(
    "name", ["anthropic_tool_use_stream.txt", "anthropic_thinking_stream.yaml"]
)
def test_the_chat_template_fast_path_says_what_the_general_path_says(name: str) -> None:
    raw = recorded_sse(name)
    fast = _sse_json(translate(wire.MessagesToChatStream(created=1), raw))
    general = wire.MessagesToChatStream(created=1)
    slow = [c for e in _sse_json(raw) for c in general.feed(e)]
    assert fast == slow
