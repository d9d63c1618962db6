"""Anthropic Messages <-> OpenAI chat completions: requests, responses, streams, errors, usage.

Two directions, one module:
- a Messages client (the `anthropic` SDK, Claude Code) on a chat-completions producer:
  `messages_request_to_chat`, then `chat_response_to_messages` or `ChatToMessagesStream`;
- a chat-completions client (the `openai` SDK) on an Anthropic producer:
  `chat_request_to_messages`, then `messages_response_to_chat` or `MessagesToChatStream`.

Token accounting differs between the two: Anthropic's `input_tokens` excludes cache reads and
cache writes, OpenAI's `prompt_tokens` includes cache reads (and, where a proxy reports them,
cache writes). The conversions keep the totals exact both ways.
"""

from __future__ import annotations

import time
from typing import Any

from tokenworks.metering.usage import Usage
from tokenworks.wire.common import (
    Untranslatable,
    as_int,
    decode,
    dumps_str,
    encode,
    parse_arguments,
    plain_text_delta,
    text_of,
)
from tokenworks.wire.sse import data_of

# --- stop reasons and error types --------------------------------------------------------------

FINISH_TO_STOP_REASON: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
STOP_REASON_TO_FINISH: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
STATUS_TO_ERROR_TYPE: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# Anthropic error types as an OpenAI client reads them: (type, code).
_ERROR_TYPE_TO_OPENAI: dict[str, tuple[str, str | None]] = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "permission_error": ("invalid_request_error", "permission_denied"),
    "not_found_error": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("requests", "rate_limit_exceeded"),
    "api_error": ("server_error", None),
    "timeout_error": ("server_error", "timeout"),
    "overloaded_error": ("server_error", "overloaded"),
}

# reasoning_effort <-> thinking budget. Budgets are what Anthropic's docs use as examples for
# light, moderate and deep thinking; the inverse takes the band a budget falls in.
_EFFORT_TO_BUDGET = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384}


def _effort_of_budget(budget_tokens: int) -> str:
    if budget_tokens < 4096:
        return "low"
    if budget_tokens < 16384:
        return "medium"
    return "high"


# --- requests: Messages -> chat ----------------------------------------------------------------


def messages_request_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages request body as a chat completions request body.

    Dropped because chat has no place for them: `cache_control` marks (the producer caches on
    its own), thinking blocks in the history, `top_k` is kept (vLLM and SGLang read it).
    """
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        text = system if isinstance(system, str) else _system_text(system)
        messages.append({"role": "system", "content": text})
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list):
        raise Untranslatable("messages must be a list", "messages")
    for index, message in enumerate(raw_messages):
        if not isinstance(message, dict):
            raise Untranslatable("each message must be an object", f"messages.{index}")
        role = message.get("role")
        if role == "user":
            _user_to_chat(message.get("content"), messages, index)
        elif role == "assistant":
            messages.append(_assistant_to_chat(message.get("content"), index))
        else:
            raise Untranslatable(f"unknown role {role!r}", f"messages.{index}.role")

    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if "max_tokens" in body:
        out["max_tokens"] = body["max_tokens"]
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    stops = body.get("stop_sequences")
    if stops:
        out["stop"] = stops
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool_to_chat(tool, i) for i, tool in enumerate(tools)]
    tool_choice = body.get("tool_choice")
    if isinstance(tool_choice, dict):
        _tool_choice_to_chat(tool_choice, out)
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        out["reasoning_effort"] = _effort_of_budget(as_int(thinking.get("budget_tokens")))
    output_config = body.get("output_config")
    if isinstance(output_config, dict):
        effort = output_config.get("effort")
        if isinstance(effort, str):
            out["reasoning_effort"] = "high" if effort in ("xhigh", "max") else effort
        fmt = output_config.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            out["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": fmt.get("schema"), "strict": True},
            }
    return out


def _system_text(blocks: Any) -> str:
    if not isinstance(blocks, list):
        raise Untranslatable("system must be a string or a list of text blocks", "system")
    return "\n\n".join(
        block["text"] for block in blocks if isinstance(block, dict) and "text" in block
    )


def _user_to_chat(content: Any, messages: list[dict[str, Any]], index: int) -> None:
    if isinstance(content, str):
        messages.append({"role": "user", "content": content})
        return
    if not isinstance(content, list):
        raise Untranslatable("content must be a string or a list", f"messages.{index}.content")
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        where = f"messages.{index}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result":
            # Tool answers are their own messages in chat, and must directly follow the
            # assistant turn that called them: they go before the rest of this user turn.
            text, images = _tool_result_content(block.get("content"), where)
            if block.get("is_error") and text and not text.startswith("Error"):
                text = "Error: " + text
            messages.append(
                {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}
            )
            parts.extend(images)
        else:
            parts.append(_user_part_to_chat(block, where))
    if parts:
        if all(part["type"] == "text" for part in parts) and len(parts) == 1:
            messages.append({"role": "user", "content": parts[0]["text"]})
        else:
            messages.append({"role": "user", "content": parts})


def _user_part_to_chat(block: Any, where: str) -> dict[str, Any]:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        return {"type": "text", "text": block.get("text", "")}
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": _source_url(block.get("source"), where)}}
    if kind == "document":
        source = block.get("source") or {}
        if source.get("type") == "text":
            return {"type": "text", "text": source.get("data", "")}
        if source.get("type") == "base64":
            file: dict[str, Any] = {"file_data": _source_url(source, where)}
            if isinstance(block.get("title"), str):
                file["filename"] = block["title"]
            return {"type": "file", "file": file}
    raise Untranslatable(f"content block type {kind!r} has no chat completions form", where)


def _source_url(source: Any, where: str) -> str:
    if isinstance(source, dict):
        if source.get("type") == "base64":
            return f"data:{source.get('media_type')};base64,{source.get('data')}"
        if source.get("type") == "url":
            return str(source.get("url"))
    raise Untranslatable("only base64 and url sources translate", where)


def _tool_result_content(content: Any, where: str) -> tuple[str, list[dict[str, Any]]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and block.get("type") == "text":
            texts.append(block.get("text", ""))
        elif isinstance(block, dict) and block.get("type") == "image":
            images.append(
                {"type": "image_url", "image_url": {"url": _source_url(block.get("source"), where)}}
            )
        else:
            raise Untranslatable("tool results carry text and images only", where)
    return "\n".join(texts), images


def _assistant_to_chat(content: Any, index: int) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for j, block in enumerate(content if isinstance(content, list) else []):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            tool_calls.append(_tool_call(block))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # signed for Anthropic only; another producer cannot verify or reuse it
        else:
            raise Untranslatable(
                f"assistant block type {kind!r} has no chat completions form",
                f"messages.{index}.content.{j}",
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _tool_to_chat(tool: Any, index: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise Untranslatable(f"server tool {kind!r} runs at Anthropic only", f"tools.{index}")
    function: dict[str, Any] = {
        "name": tool.get("name"),
        "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
    }
    if tool.get("description"):
        function["description"] = tool["description"]
    if tool.get("strict") is not None:
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _tool_choice_to_chat(choice: dict[str, Any], out: dict[str, Any]) -> None:
    kind = choice.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    else:
        raise Untranslatable(f"unknown tool_choice type {kind!r}", "tool_choice")
    if choice.get("disable_parallel_tool_use"):
        out["parallel_tool_calls"] = False


# --- requests: chat -> Messages ----------------------------------------------------------------


def chat_request_to_messages(
    body: dict[str, Any], default_max_tokens: int = 4096
) -> dict[str, Any]:
    """A chat completions request body as a Messages request body.

    Anthropic requires `max_tokens`; `default_max_tokens` stands in when the client sent none.
    Temperatures above Anthropic's 1.0 are clamped to it.
    """
    if as_int(body.get("n")) > 1:
        raise Untranslatable("n > 1 is not available on this model", "n")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list):
        raise Untranslatable("messages must be a list", "messages")
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(raw_messages):
        if not isinstance(message, dict):
            raise Untranslatable("each message must be an object", f"messages.{index}")
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(text_of(message.get("content")))
        elif role == "user":
            _append_turn(turns, "user", _chat_user_blocks(message.get("content"), index))
        elif role == "assistant":
            _append_turn(turns, "assistant", _chat_assistant_blocks(message, index))
        elif role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id"),
                "content": text_of(message.get("content")),
            }
            _append_turn(turns, "user", [block])
        else:
            raise Untranslatable(f"unknown role {role!r}", f"messages.{index}.role")

    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    out: dict[str, Any] = {"model": body.get("model"), "max_tokens": max_tokens, "messages": turns}
    if system:
        out["system"] = "\n\n".join(system)
    temperature = body.get("temperature")
    if isinstance(temperature, int | float):
        out["temperature"] = min(float(temperature), 1.0)
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("stream"):
        out["stream"] = True
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    tools = body.get("tools")
    if tools:
        out["tools"] = [_chat_tool_to_messages(tool, i) for i, tool in enumerate(tools)]
    choice = _chat_tool_choice_to_messages(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False and tools:
        choice = choice or {"type": "auto"}
        choice["disable_parallel_tool_use"] = True
    if choice:
        out["tool_choice"] = choice
    effort = body.get("reasoning_effort")
    if isinstance(effort, str) and effort in _EFFORT_TO_BUDGET:
        budget = _EFFORT_TO_BUDGET[effort]
        if budget >= max_tokens:  # Anthropic requires budget_tokens < max_tokens
            budget = max_tokens - 1
        if budget >= 1024:  # and at least 1024
            out["thinking"] = {"type": "enabled", "budget_tokens": budget}
            out.pop("temperature", None)  # thinking refuses a temperature other than 1
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        out["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        raise Untranslatable(
            "json_object mode has no Messages form; use json_schema", "response_format"
        )
    return out


def _append_turn(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    # Messages alternates roles; consecutive chat messages of one role become one turn.
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _chat_user_blocks(content: Any, index: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content if isinstance(content, list) else []):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"messages.{index}.content.{j}"
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url") or {}
            url = image.get("url") if isinstance(image, dict) else image
            blocks.append({"type": "image", "source": _url_source(str(url))})
        elif kind == "file":
            data = (part.get("file") or {}).get("file_data")
            if not isinstance(data, str):
                raise Untranslatable("only inline file_data translates", where)
            blocks.append({"type": "document", "source": _url_source(data)})
        else:
            raise Untranslatable(f"content part type {kind!r} has no Messages form", where)
    return blocks


def _url_source(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";", 1)[0]
        return {"type": "base64", "media_type": media_type, "data": data}
    return {"type": "url", "url": url}


def _chat_assistant_blocks(message: dict[str, Any], index: int) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = text_of(message.get("content"))
    if text:
        blocks.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": parse_arguments(function.get("arguments")),
            }
        )
    return blocks


def _chat_tool_to_messages(tool: Any, index: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise Untranslatable("only function tools translate", f"tools.{index}")
    function = tool.get("function") or {}
    out: dict[str, Any] = {
        "name": function.get("name"),
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        out["description"] = function["description"]
    if function.get("strict") is not None:
        out["strict"] = function["strict"]
    return out


def _chat_tool_choice_to_messages(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    raise Untranslatable(f"tool_choice {choice!r} has no Messages form", "tool_choice")


# --- usage -------------------------------------------------------------------------------------


def chat_usage_to_messages(usage: Any) -> dict[str, int]:
    """OpenAI usage counts in Anthropic's split (input excludes cache reads and writes)."""
    if not isinstance(usage, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    prompt = as_int(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details") or {}
    cached = as_int(details.get("cached_tokens")) or as_int(usage.get("prompt_cache_hit_tokens"))
    written = as_int(details.get("cache_write_tokens")) or as_int(
        usage.get("cache_creation_input_tokens")
    )
    cached = min(cached, prompt)
    written = min(written, prompt - cached)
    return {
        "input_tokens": prompt - cached - written,
        "output_tokens": as_int(usage.get("completion_tokens")),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": cached,
    }


def messages_usage_to_chat(usage: Any) -> dict[str, Any]:
    """Anthropic usage counts as OpenAI's: prompt_tokens includes cache reads and writes."""
    counts = usage_from_messages(usage)
    out: dict[str, Any] = {
        "prompt_tokens": counts.input_tokens,
        "completion_tokens": counts.output_tokens,
        "total_tokens": counts.input_tokens + counts.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": counts.cached_input_tokens,
            "cache_write_tokens": counts.cache_write_tokens,
        },
    }
    return out


def usage_from_messages(usage: Any) -> Usage:
    """A Messages `usage` object (a response's, or a stream's latest) as the gateway's Usage."""
    if not isinstance(usage, dict):
        return Usage()
    fresh = as_int(usage.get("input_tokens"))
    read = as_int(usage.get("cache_read_input_tokens"))
    written = as_int(usage.get("cache_creation_input_tokens"))
    creation = usage.get("cache_creation")
    written_1h = (
        as_int(creation.get("ephemeral_1h_input_tokens")) if isinstance(creation, dict) else 0
    )
    return Usage(
        input_tokens=fresh + read + written,
        cached_input_tokens=read,
        cache_write_tokens=written,
        cache_write_1h_tokens=min(written_1h, written),
        output_tokens=as_int(usage.get("output_tokens")),
    )


class MessagesUsageCollector:
    """The usage of a Messages stream, read from its events as they pass.

    `message_start` carries the input side, each `message_delta` the running totals (which, on
    newer API versions, may also restate the input side); the last one seen wins per field.
    """

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, Any] = {}

    def feed(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start":
            usage = (event.get("message") or {}).get("usage")
        elif kind == "message_delta":
            usage = event.get("usage")
        else:
            return
        if isinstance(usage, dict):
            for name, value in usage.items():
                if value is not None:
                    self.counts[name] = value

    def usage(self) -> Usage:
        return usage_from_messages(self.counts)


# --- responses ---------------------------------------------------------------------------------


def chat_response_to_messages(chat: dict[str, Any]) -> dict[str, Any]:
    """A chat completion as a Messages response."""
    choices = chat.get("choices") or [{}]
    choice = choices[0] or {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = text_of(message.get("content"))
    if text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": parse_arguments(function.get("arguments")),
            }
        )
    finish = choice.get("finish_reason")
    return {
        "id": chat.get("id"),
        "type": "message",
        "role": "assistant",
        "model": chat.get("model"),
        "content": content,
        "stop_reason": FINISH_TO_STOP_REASON.get(finish, "end_turn") if finish else None,
        "stop_sequence": None,
        "usage": chat_usage_to_messages(chat.get("usage")),
    }


def messages_response_to_chat(
    message: dict[str, Any], created: int | None = None
) -> dict[str, Any]:
    """A Messages response as a chat completion."""
    texts: list[str] = []
    thinking: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in message.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "thinking":
            thinking.append(block.get("thinking", ""))
        elif kind == "tool_use":
            tool_calls.append(_tool_call(block))
    out_message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not tool_calls else None,
        "refusal": None,
    }
    if tool_calls:
        out_message["tool_calls"] = tool_calls
    if thinking:
        out_message["reasoning_content"] = "".join(thinking)
    stop = message.get("stop_reason")
    return {
        "id": message.get("id"),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": out_message,
                "logprobs": None,
                "finish_reason": STOP_REASON_TO_FINISH.get(stop, "stop") if stop else "stop",
            }
        ],
        "usage": messages_usage_to_chat(message.get("usage")),
    }


# --- errors ------------------------------------------------------------------------------------


def openai_error_to_anthropic(status: int, body: Any) -> tuple[int, dict[str, Any]]:
    """An OpenAI-shaped error (any status) as Anthropic's; the status is kept."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or "")
    elif isinstance(error, str):
        message = error
    else:
        message = "upstream error"
    kind = STATUS_TO_ERROR_TYPE.get(status)
    if kind is None:
        kind = "api_error" if status >= 500 else "invalid_request_error"
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def anthropic_error_to_openai(status: int, body: Any) -> tuple[int, dict[str, Any]]:
    """An Anthropic-shaped error as OpenAI's; the status is kept, the type read as a code."""
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    kind = error.get("type")
    if not isinstance(kind, str):
        kind = STATUS_TO_ERROR_TYPE.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
    openai_type, code = _ERROR_TYPE_TO_OPENAI.get(kind, ("invalid_request_error", kind))
    return status, {
        "error": {
            "message": str(error.get("message") or ""),
            "type": openai_type,
            "param": None,
            "code": code,
        }
    }


# --- streams: chat chunks -> Messages events ---------------------------------------------------

_EVENT_PREFIX = {
    name: b"event: " + name.encode() + b"\ndata: "
    for name in (
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
        "ping",
        "error",
    )
}


def encode_messages_event(event: dict[str, Any]) -> bytes:
    """One Messages event in Anthropic's framing (`event:` line naming the type, then data)."""
    return _EVENT_PREFIX[event["type"]] + encode(event) + b"\n\n"


class ChatToMessagesStream:
    """Chat completion chunks in, Anthropic Messages stream events out.

    Feed each upstream chunk (`feed`, or `feed_sse` with the raw event); on the upstream's
    `[DONE]` call `finish` for the closing events. An upstream that stops without `[DONE]` is a
    cut stream: the route sends `error_event` instead, and the client sees no `message_stop`.
    Blocks are sequential as Anthropic's are: a new kind of output closes the open block.
    """

    __slots__ = (
        "_block",
        "_block_kind",
        "_done",
        "_finish",
        "_next_index",
        "_started",
        "_text_prefix",
        "_tool_blocks",
        "_usage",
        "model",
    )

    def __init__(self, model: str | None = None) -> None:
        self.model = model  # the public model name the client asked for, if the route knows it
        self._started = False
        self._done = False
        self._block = -1  # index of the open content block, -1 when none
        self._block_kind = ""
        self._next_index = 0
        self._tool_blocks: dict[int, int] = {}  # chat tool_call index -> block index
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._text_prefix = b""

    def feed_sse(self, frame: bytes) -> bytes:
        """One raw upstream SSE event in, the translated events' bytes out."""
        data = data_of(frame)
        if data is None:
            return b""
        if data == b"[DONE]":
            return b"".join(map(encode_messages_event, self.finish()))
        return self.feed_decoded(decode(data))

    def feed_decoded(self, chunk: dict[str, Any]) -> bytes:
        """`feed_sse` for a chunk its caller has decoded already (the relay reads usage)."""
        if self._block_kind == "text":
            text = plain_text_delta(chunk)
            if text is not None:  # the common case, from a template
                return self._text_prefix + encode(text) + b"}}\n\n"
        return b"".join(map(encode_messages_event, self.feed(chunk)))

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if "error" in chunk and "choices" not in chunk:
            return [self.error_event(chunk.get("error"))]
        events: list[dict[str, Any]] = []
        if not self._started:
            events.extend(self._start(chunk))
        usage = chunk.get("usage")
        if usage:
            self._usage = usage
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning and isinstance(reasoning, str):
                self._open(
                    "thinking", events, {"type": "thinking", "thinking": "", "signature": ""}
                )
                events.append(self._delta({"type": "thinking_delta", "thinking": reasoning}))
            content = delta.get("content")
            if content:
                self._open("text", events, {"type": "text", "text": ""})
                events.append(self._delta({"type": "text_delta", "text": content}))
            refusal = delta.get("refusal")
            if refusal:
                self._open("text", events, {"type": "text", "text": ""})
                events.append(self._delta({"type": "text_delta", "text": refusal}))
            for call in delta.get("tool_calls") or ():
                self._tool_delta(call, events)
            finish = choice.get("finish_reason")
            if finish:
                self._finish = finish
        return events

    def _start(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        self._started = True
        message: dict[str, Any] = {
            "id": chunk.get("id"),
            "type": "message",
            "role": "assistant",
            "model": self.model or chunk.get("model"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # Chat streams report usage only at the end; message_delta carries the totals.
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def _open(self, kind: str, events: list[dict[str, Any]], block: dict[str, Any]) -> None:
        if self._block_kind == kind and self._block >= 0:
            return
        self._close(events)
        self._block = self._next_index
        self._block_kind = kind
        self._next_index += 1
        events.append({"type": "content_block_start", "index": self._block, "content_block": block})
        if kind == "text":
            self._text_prefix = (
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                b'"delta":{"type":"text_delta","text":' % self._block
            )

    def _close(self, events: list[dict[str, Any]]) -> None:
        if self._block >= 0:
            events.append({"type": "content_block_stop", "index": self._block})
            self._block = -1
            self._block_kind = ""

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self._block, "delta": delta}

    def _tool_delta(self, call: dict[str, Any], events: list[dict[str, Any]]) -> None:
        position = call.get("index", 0)
        function = call.get("function") or {}
        block = self._tool_blocks.get(position)
        if block is None:
            self._close(events)
            block = self._block = self._next_index
            self._block_kind = "tool_use"
            self._next_index += 1
            self._tool_blocks[position] = block
            start: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": {},
            }
            events.append({"type": "content_block_start", "index": block, "content_block": start})
        arguments = function.get("arguments")
        if arguments:
            # Arguments of an earlier call arriving late (rare) still go to that call's block.
            events.append(
                {
                    "type": "content_block_delta",
                    "index": block,
                    "delta": {"type": "input_json_delta", "partial_json": arguments},
                }
            )

    def finish(self) -> list[dict[str, Any]]:
        """The closing events, once the upstream said `[DONE]`."""
        if self._done:
            return []
        self._done = True
        events: list[dict[str, Any]] = []
        if not self._started:
            events.extend(self._start({}))
        self._close(events)
        stop = FINISH_TO_STOP_REASON.get(self._finish, "end_turn") if self._finish else "end_turn"
        events.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": chat_usage_to_messages(self._usage),
            }
        )
        events.append({"type": "message_stop"})
        return events

    @staticmethod
    def error_event(error: Any) -> dict[str, Any]:
        """A mid-stream failure as Anthropic's `error` event."""
        message = error.get("message") if isinstance(error, dict) else str(error or "")
        return {"type": "error", "error": {"type": "api_error", "message": str(message or "")}}

    def usage(self) -> Usage | None:
        """What the upstream reported (None when it did not): the route meters this."""
        if self._usage is None:
            return None
        counts = chat_usage_to_messages(self._usage)
        return usage_from_messages(counts)


# --- streams: Messages events -> chat chunks ---------------------------------------------------


_CHUNK_TAIL = b'},"logprobs":null,"finish_reason":null}]}\n\n'


class MessagesToChatStream:
    """Anthropic Messages stream events in, chat completion chunks out.

    `feed_sse` returns the chunks' SSE bytes, ending with the usage chunk (when asked for) and
    `data: [DONE]` after `message_stop`. A stream that ends before `message_stop` gets no
    `[DONE]`, so the client can tell a cut answer from a finished one.
    """

    __slots__ = (
        "_base",
        "_created",
        "_finish",
        "_id",
        "_include_usage",
        "_model",
        "_tools",
        "collector",
    )

    def __init__(
        self, include_usage: bool = True, created: int | None = None, model: str | None = None
    ) -> None:
        self._include_usage = include_usage
        self._created = int(time.time()) if created is None else created
        self._model = model
        self._id: str | None = None
        self._finish = "stop"
        self._tools: dict[int, int] = {}  # block index -> chat tool_call index
        self._base: bytes = b""
        self.collector = MessagesUsageCollector()

    def feed_sse(self, frame: bytes) -> bytes:
        data = data_of(frame)
        if data is None:
            return b""
        return self.feed_decoded(decode(data))

    def feed_decoded(self, event: dict[str, Any]) -> bytes:
        """`feed_sse` for an event its caller has decoded already (the relay reads usage)."""
        if event.get("type") == "content_block_delta" and self._base:
            delta = event.get("delta")
            if type(delta) is dict and delta.get("type") == "text_delta":  # the common case
                return self._base + encode(delta.get("text", "")) + _CHUNK_TAIL
        chunks = self.feed(event)
        out = b"".join(b"data: " + encode(chunk) + b"\n\n" for chunk in chunks)
        if event.get("type") == "message_stop":
            out += b"data: [DONE]\n\n"
        return out

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            dkind = delta.get("type")
            if dkind == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if dkind == "input_json_delta":
                position = self._tools.get(event.get("index", -1))
                partial = delta.get("partial_json")
                if position is None or not partial:
                    return []
                return [
                    self._chunk(
                        {"tool_calls": [{"index": position, "function": {"arguments": partial}}]}
                    )
                ]
            if dkind == "thinking_delta":
                return [self._chunk({"reasoning_content": delta.get("thinking", "")})]
            return []  # signature and citation deltas have no chat form
        if kind == "message_start":
            self.collector.feed(event)
            message = event.get("message") or {}
            self._id = message.get("id")
            self._model = self._model or message.get("model")
            head = encode(self._chunk({"content": ""}))
            # Everything of a text chunk before its text: `...,"delta":{"content":`
            self._base = b"data: " + head[: head.index(b'"content":') + len(b'"content":')]
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                position = len(self._tools)
                self._tools[event.get("index", -1)] = position
                call = {
                    "index": position,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return [self._chunk({"tool_calls": [call]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "message_delta":
            self.collector.feed(event)
            stop = (event.get("delta") or {}).get("stop_reason")
            if stop:
                self._finish = STOP_REASON_TO_FINISH.get(stop, "stop")
            return []
        if kind == "message_stop":
            chunks = [self._chunk({}, self._finish)]
            if self._include_usage:
                final = self._chunk({})
                final["choices"] = []
                final["usage"] = messages_usage_to_chat(self.collector.counts)
                chunks.append(final)
            return chunks
        if kind == "error":
            error = event.get("error") or {}
            _, body = anthropic_error_to_openai(500, {"error": error})
            return [body]
        return []  # ping, content_block_stop

    def usage(self) -> Usage:
        return self.collector.usage()


def _tool_call(block: dict[str, Any]) -> dict[str, Any]:
    """A Messages `tool_use` block as a chat completion's tool call."""
    return {
        "id": block.get("id"),
        "type": "function",
        "function": {"name": block.get("name"), "arguments": dumps_str(block.get("input", {}))},
    }
