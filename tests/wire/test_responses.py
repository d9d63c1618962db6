"""Responses <-> chat completions, on recorded traffic, read back by the openai SDK's own
Response model and its Responses stream accumulator."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from tokenworks.wire import PreviousResponseUnsupported, Untranslatable
from tokenworks.wire import responses as wire
from tokenworks.wire.sse import SSESplitter, data_of

FIXTURES = Path(__file__).parent / "fixtures"


def cassette(name: str) -> list[dict[str, Any]]:
    return yaml.safe_load((FIXTURES / name).read_text())["interactions"]


def recorded_sse(name: str, interaction: int = 0) -> bytes:
    if name.endswith(".txt"):
        return (FIXTURES / name).read_bytes()
    return cassette(name)[interaction]["response"]["body"]["string"].encode()


def frames(raw: bytes) -> list[bytes]:
    splitter = SSESplitter()
    out = splitter.feed(raw)
    if splitter.rest().strip():
        raise AssertionError("recorded stream ends inside an event")
    return out


def events_of(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for frame in frames(raw):
        data = data_of(frame)
        if data is not None and data != b"[DONE]":
            out.append(json.loads(data))
    return out


def openai_client(body: bytes) -> openai.OpenAI:
    base = importlib.import_module("openai._base_client")
    http = getattr(base, "httpx2", None) or base.httpx

    def handler(request: Any) -> Any:
        return http.Response(200, content=body, headers={"content-type": "text/event-stream"})

    client = http.Client(transport=http.MockTransport(handler))
    return openai.OpenAI(api_key="k", http_client=client, max_retries=0)


def accumulate_chat(raw: bytes) -> dict[str, Any]:
    """The whole chat completion a recorded chat stream adds up to (the reference answer).

    Written out here rather than taken from the SDK's accumulator, which rejects OpenRouter's
    repeated `role` deltas and raises on a `length` finish.
    """
    text, reasoning, calls = [], [], {}
    finish, usage, head = None, None, {}
    for chunk in events_of(raw):
        head = head or chunk
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text.append(delta.get("content") or "")
            reasoning.append(delta.get("reasoning_content") or delta.get("reasoning") or "")
            for call in delta.get("tool_calls") or ():
                entry = calls.setdefault(
                    call["index"],
                    {"id": None, "type": "function", "function": {"name": None, "arguments": ""}},
                )
                entry["id"] = call.get("id") or entry["id"]
                entry["function"]["name"] = (
                    call["function"].get("name") or entry["function"]["name"]
                )
                entry["function"]["arguments"] += call["function"].get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        message["tool_calls"] = list(calls.values())
    if "".join(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    chat = {
        "id": head["id"],
        "object": "chat.completion",
        "created": head["created"],
        "model": head["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    }
    ChatCompletion.model_validate(chat)
    return chat


# --- requests ----------------------------------------------------------------------------------


def test_recorded_tool_loop_request_becomes_chat() -> None:
    for interaction in cassette("responses_stream.yaml"):
        body = interaction["request"]["parsed_body"]
        chat = wire.responses_request_to_chat(body)
        assert chat["model"] == "gpt-4o" and chat["tool_choice"] == "auto"
        assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
        assert chat["tools"][0]["function"]["name"] == "get_capital"
        assert chat["tools"][0]["function"]["strict"] is True
        assert chat["messages"][0] == {"role": "user", "content": "What is the capital of France?"}
    # The second turn carries the call and its output: an assistant tool call, then the answer.
    _, call, output = chat["messages"]
    items = body["input"]
    assert call["tool_calls"][0]["id"] == items[1]["call_id"]
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {"country": "France"}
    assert output == {"role": "tool", "tool_call_id": items[2]["call_id"], "content": "Paris"}


def test_recorded_reasoning_request_becomes_chat() -> None:
    body = cassette("responses_reasoning_summary.yaml")[0]["request"]["parsed_body"]
    chat = wire.responses_request_to_chat(body)
    assert body["reasoning"]["effort"] is None and "reasoning_effort" not in chat
    assert "truncation" not in chat and "instructions" not in chat
    assert chat["messages"] == [{"role": "user", "content": body["input"][0]["content"]}]
    effort = dict(body, reasoning={"effort": "high", "summary": "concise"})
    assert wire.responses_request_to_chat(effort)["reasoning_effort"] == "high"


def test_request_fields_map() -> None:
    body = {
        "model": "m",
        "instructions": "be brief",
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "see"},
                    {
                        "type": "input_image",
                        "image_url": "data:image/png;base64,AA",
                        "detail": "low",
                    },
                ],
            },
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "calling two"}],
            },
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "1"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [{"type": "input_text", "text": "2"}],
            },
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ],
        "text": {
            "format": {
                "type": "json_schema",
                "name": "answer",
                "schema": {"type": "object"},
                "strict": True,
            }
        },
        "reasoning": {"effort": "low", "summary": "auto"},
        "max_output_tokens": 99,
        "tool_choice": {"type": "function", "name": "f"},
        "temperature": 0.5,
        "store": True,
    }
    chat = wire.responses_request_to_chat(body)
    assert chat["messages"][0] == {"role": "system", "content": "be brief"}
    assert chat["messages"][1]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,AA", "detail": "low"},
    }
    assistant = chat["messages"][2]
    assert [c["id"] for c in assistant["tool_calls"]] == ["c1", "c2"]  # one turn, two calls
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "tool", "tool"]
    assert chat["messages"][4]["content"] == "2"
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    }
    assert (
        chat["reasoning_effort"] == "low"
        and chat["max_tokens"] == 99
        and chat["temperature"] == 0.5
    )
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert "store" not in chat


def test_previous_response_id_is_its_own_clear_error() -> None:
    body = cassette("responses_stream.yaml")[0]["request"]["parsed_body"]
    with pytest.raises(PreviousResponseUnsupported) as caught:
        wire.responses_request_to_chat(dict(body, previous_response_id="resp_1"))
    assert caught.value.param == "previous_response_id" and isinstance(caught.value, Untranslatable)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
            "input.0.content.0",
        ),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"tool_choice": {"type": "web_search"}}, "tool_choice"),
    ],
)
def test_what_chat_cannot_do_is_refused(change: dict[str, Any], param: str) -> None:
    with pytest.raises(Untranslatable) as caught:
        wire.responses_request_to_chat({"model": "m", "input": "hi", **change})
    assert caught.value.param == param


# --- responses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["openai_chat_tool_calls.yaml", "deepseek_reasoning.yaml", "openrouter_cached.yaml"]
)
def test_recorded_chat_completions_become_valid_responses(name: str) -> None:
    request = {
        "model": "m",
        "input": "x",
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
    }
    for interaction in cassette(name):
        chat = interaction["response"]["parsed_body"]
        response = Response.model_validate(wire.chat_response_to_responses(chat, request))
        message = chat["choices"][0]["message"]
        assert response.output_text == (message.get("content") or "")
        calls = [item for item in response.output if item.type == "function_call"]
        assert [(c.call_id, c.name, c.arguments) for c in calls] == [
            (t["id"], t["function"]["name"], t["function"]["arguments"])
            for t in message.get("tool_calls") or []
        ]
        reasoning = [item for item in response.output if item.type == "reasoning"]
        if message.get("reasoning_content"):
            assert reasoning[0].summary[0].text == message["reasoning_content"]
        else:
            assert reasoning == []
        usage = chat["usage"]
        assert response.usage is not None
        assert response.usage.input_tokens == usage["prompt_tokens"]
        assert response.usage.output_tokens == usage["completion_tokens"]
        assert response.usage.total_tokens == usage["total_tokens"]
        assert response.usage.input_tokens_details.cached_tokens == usage.get(
            "prompt_tokens_details", {}
        ).get("cached_tokens", 0)
        reasoning_tokens = usage.get("completion_tokens_details", {}).get("reasoning_tokens", 0)
        assert response.usage.output_tokens_details.reasoning_tokens == reasoning_tokens
        assert response.status == "completed" and response.model == chat["model"]


def test_truncated_answer_is_an_incomplete_response() -> None:
    chat = accumulate_chat(recorded_sse("openai_chat_length_stream.txt"))
    response = Response.model_validate(wire.chat_response_to_responses(chat, {"model": "m"}))
    assert response.status == "incomplete"
    assert (
        response.incomplete_details is not None
        and response.incomplete_details.reason == "max_output_tokens"
    )


# --- streams -----------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A dump of the SDK's parsed response without the fields its parse helpers add."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if k not in ("parsed", "parsed_arguments")}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _sdk_final(body: bytes, request: dict[str, Any]) -> tuple[Response, list[Any]]:
    """What the openai SDK's Responses stream makes of our bytes: the final response (from
    `response.completed`, or the last lifecycle event of an incomplete one) and every event."""
    client = openai_client(body)
    with client.responses.stream(**request) as stream:
        seen = list(stream)
        if seen[-1].type == "response.incomplete":
            return Response.model_validate(seen[-1].response.model_dump()), seen
        return stream.get_final_response(), seen


@pytest.mark.parametrize(
    "name",
    [
        "openai_chat_parallel_tools_stream.txt",
        "openai_chat_text_stream.txt",
        "openrouter_reasoning_stream.yaml",
        "openai_chat_length_stream.txt",
    ],
)
def test_recorded_chat_streams_are_read_by_the_openai_responses_stream(name: str) -> None:
    raw = recorded_sse(name)
    request = {
        "model": "public",
        "input": "x",
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
    }
    translator = wire.ChatToResponsesStream(request, created_at=7)
    body = b"".join(translator.feed_sse(frame) for frame in frames(raw))
    final, seen = _sdk_final(body, {"model": "public", "input": "x"})

    # Streaming and non-streaming must agree: the stream's final response equals the whole
    # answer the same recording adds up to, translated at once.
    whole = Response.model_validate(
        wire.chat_response_to_responses(accumulate_chat(raw), request, created_at=7)
    )
    assert plain(final.model_dump()) == whole.model_dump()
    assert final.output_text == whole.output_text
    assert final.usage is not None and final.usage == whole.usage
    numbers = [event.sequence_number for event in seen]
    assert numbers == list(range(len(numbers)))
    assert translator.usage() is not None


def _shape(kinds: list[str]) -> list[str]:
    """Event types with runs of one delta type collapsed: recordings differ in chunking."""
    out: list[str] = []
    for kind in kinds:
        if kind.endswith(".delta") and out and out[-1] == kind:
            continue
        out.append(kind)
    return out


def test_event_sequence_matches_what_openai_itself_sends() -> None:
    """Same event grammar as a recorded real Responses stream: a function call, then text."""
    recorded = [events_of(recorded_sse("responses_stream.yaml", i)) for i in range(2)]
    chunks_call = [
        {
            "id": "c1",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_capital", "arguments": ""},
                            }
                        ],
                    },
                    "finish_reason": None,
                }
            ],
        },
        {
            "id": "c1",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [{"index": 0, "function": {"arguments": '{"country":'}}]
                    },
                    "finish_reason": None,
                }
            ],
        },
        {
            "id": "c1",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"France"}'}}]},
                    "finish_reason": "tool_calls",
                }
            ],
        },
        {
            "id": "c1",
            "model": "m",
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        },
    ]
    chunks_text = [
        {
            "id": "c2",
            "model": "m",
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ],
        },
        {
            "id": "c2",
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "The capital"}, "finish_reason": None}],
        },
        {
            "id": "c2",
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": " is Paris."}, "finish_reason": "stop"}],
        },
    ]
    for chunks, real in zip((chunks_call, chunks_text), recorded, strict=True):
        translator = wire.ChatToResponsesStream({"model": "m"})
        ours = [e for c in chunks for e in translator.feed(c)] + translator.finish()
        assert _shape([e["type"] for e in ours]) == _shape([e["type"] for e in real])
    done = next(e for e in ours if e["type"] == "response.output_text.done")
    assert done["text"] == "The capital is Paris."


def test_a_cut_stream_never_completes() -> None:
    raw = recorded_sse("openai_chat_text_stream.txt")
    translator = wire.ChatToResponsesStream({"model": "m"})
    body = b"".join(translator.feed_sse(f) for f in frames(raw) if b"[DONE]" not in f)
    assert b"response.output_text.delta" in body and b"response.completed" not in body


def test_our_responses_have_the_shape_of_recorded_ones() -> None:
    """A recorded Responses tool loop: its requests translate, and the Response objects we
    build carry every output-item and usage field the real ones carry."""
    interactions = cassette("responses_tool_call.yaml")
    second = wire.responses_request_to_chat(interactions[1]["request"]["parsed_body"])
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "tool"]
    real_call, real_text = (i["response"]["parsed_body"] for i in interactions)
    call = real_call["output"][0]
    chat = {
        "id": "chatcmpl-1",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call["call_id"],
                            "type": "function",
                            "function": {"name": call["name"], "arguments": call["arguments"]},
                        }
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    ours = wire.chat_response_to_responses(chat, interactions[0]["request"]["parsed_body"])
    assert set(call) <= set(ours["output"][0])
    assert set(real_call["usage"]) <= set(ours["usage"])
    chat["choices"][0] = {
        "index": 0,
        "finish_reason": "stop",
        "message": {"role": "assistant", "content": real_text["output"][0]["content"][0]["text"]},
    }
    ours = wire.chat_response_to_responses(chat, interactions[1]["request"]["parsed_body"])
    real_message = real_text["output"][0]
    assert set(real_message) <= set(ours["output"][0])
    assert set(real_message["content"][0]) <= set(ours["output"][0]["content"][0])
    assert Response.model_validate(ours).output_text == real_message["content"][0]["text"]


@pytest.mark.parametrize(
    "name", ["openai_chat_text_stream.txt", "openrouter_reasoning_stream.yaml"]
)
def test_the_template_fast_path_says_what_the_general_path_says(name: str) -> None:
    raw = recorded_sse(name)
    fast_stream = wire.ChatToResponsesStream({"model": "m"}, created_at=1)
    fast = [
        json.loads(data_of(f) or b"")
        for f in frames(b"".join(fast_stream.feed_sse(f) for f in frames(raw)))
    ]
    general = wire.ChatToResponsesStream({"model": "m"}, created_at=1)
    slow = [e for c in events_of(raw) for e in general.feed(c)] + general.finish()
    assert fast == slow
