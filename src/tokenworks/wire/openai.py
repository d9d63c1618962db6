"""OpenAI chat completions, completions and embeddings as the relay passes them through.

The relay forwards an upstream's answer byte for byte; this module is everything it knows
about those bytes: how a stream splits into events (`SSEReader`) and where an event's data is
(`event_data`), which first event is an error, the byte splices that put the public model name
(`MODEL_FIELD`, `rewrite_model`) and the charged price (`with_cost`) into an answer without
re-encoding it, where usage sits in an answer or a chunk (`reported_usage`), the usage object
and chunk the gateway writes itself (`usage_object`, `usage_chunk`), and the answer's texts
an estimate counts (`response_texts`).

What is plausible usage, and the offline estimate, are metering's rules (`metering.extract`).
Nothing here does I/O of its own: `SSEReader` is handed the function that reads the upstream.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from tokenworks.metering.usage import Usage
from tokenworks.money import format_nano
from tokenworks.wire.sse import SSEError as SSEError  # SSEReader's, defined with the splitter
from tokenworks.wire.sse import data_of

MAX_SSE_EVENT_BYTES = 4 * 1024 * 1024

# The first `"model": "..."` of an answer or chunk: where the public model name goes.
MODEL_FIELD = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
# `"usage": null` in a chunk: upstreams add it to every chunk once usage is asked for.
USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null')
_USAGE_OPEN = re.compile(rb'"usage"\s*:\s*\{\s*(\}?)')
_decode = msgspec.json.decode
_encode = msgspec.json.encode


class SSEReader:
    """Splits an upstream byte stream into SSE events (`...\\n\\n`), bounded in size.

    CRLF line ends are read as LF, so every event comes back in LF framing: for a consumer
    that re-encodes. The relay passes events through as sent (`wire.sse.FrameReader`)."""

    def __init__(self, read: Callable[[], Awaitable[bytes]]) -> None:
        self._read = read  # the next bytes the upstream sent, b"" at its end
        self._buffer = b""
        self._eof = False

    def buffered(self) -> bytes | None:
        """The next whole event if one is already buffered; never waits."""
        while (end := self._buffer.find(b"\n\n")) >= 0:
            event, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            if event.strip():
                return event
        return None

    async def next(self) -> bytes | None:
        """The next whole event without its trailing blank line; None at a clean end."""
        while True:
            end = self._buffer.find(b"\n\n")
            if end >= 0:
                event, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                if event.strip():
                    return event
                continue
            if self._eof:
                if self._buffer.strip():
                    raise SSEError("stream ended inside an event")
                return None
            if len(self._buffer) > MAX_SSE_EVENT_BYTES:
                raise SSEError("event too large")
            chunk = await self._read()
            if not chunk:
                self._eof = True
                continue
            if b"\r" in chunk:
                chunk = chunk.replace(b"\r\n", b"\n")
            self._buffer += chunk


def event_data(event: bytes) -> bytes | None:
    """The payload of an event's `data:` line(s); None for comments and other fields."""
    if event.startswith(b"data:") and b"\ndata:" not in event:
        return event[5:].lstrip(b" ")
    parts = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


def is_error_event(event: bytes) -> bool:
    """An event carrying an error object instead of choices (some upstreams answer 200 and
    put their error in the stream), or a Responses or Messages `error` event (`"type":
    "error"`; Responses puts its code and message at the top, with no `error` object)."""
    data = data_of(event)
    if data is None or b'"error"' not in data:
        return False
    try:
        chunk = _decode(data)
    except msgspec.DecodeError:
        return False  # a malformed first chunk is the stream's problem, handled by the pump
    if not isinstance(chunk, dict):
        return False
    return ("error" in chunk and "choices" not in chunk) or chunk.get("type") == "error"


def model_field(public_model: str) -> bytes:
    """The `"model":"..."` that replaces an upstream's own model name."""
    return b'"model":' + _encode(public_model)


def rewrite_model(data: bytes, public_model: str) -> bytes:
    return MODEL_FIELD.sub(b'"model":' + _encode(public_model), data, count=1)


def with_cost(data: bytes, price_nano: int) -> bytes:
    """Add `"cost": "<decimal>"` (the price charged) to the first `usage` object, as OpenRouter
    does. An upstream's own `cost` there (OpenRouter's) becomes `upstream_cost`: JSON parsers
    keep the last of two equal keys, so a second `cost` would show the client the upstream's
    figure, not its price. Works on a body and on an SSE event in any framing."""
    match = _USAGE_OPEN.search(data)
    if match is None:
        return data
    if data.find(b'"cost"', match.end()) >= 0:  # a memchr-speed test; rare when true
        replaced = upstream_cost_renamed(data, price_nano)
        if replaced is not None:
            return replaced
    field = b'"cost":"' + format_nano(price_nano).encode() + b'"'
    insert_at = match.start(1)
    separator = b"" if match.group(1) else b","
    return data[:insert_at] + field + separator + data[insert_at:]


def upstream_cost_renamed(data: bytes, price_nano: int | None = None) -> bytes | None:
    """`data` (a body, or an SSE event in any framing) with its usage's `cost` renamed
    `upstream_cost`, and our price as `cost` when given: a re-encode of the JSON object, the
    bytes around it kept. None when its usage has no `cost` key. A stream chunk that carries
    choices and usage (OpenRouter's last) passes before the charge is known: it loses its
    `cost`, and the gateway's usage chunk after it shows the price. The usage may also sit
    one level down, as in Responses events (`response.usage`) and Messages' `message_start`
    (`message.usage`)."""
    start, end = data.find(b"{"), data.rfind(b"}") + 1
    try:
        obj = _decode(data[start:end])
    except msgspec.DecodeError:
        return None
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if usage is None and isinstance(obj, dict):
        holder = obj.get("response") or obj.get("message")
        usage = holder.get("usage") if isinstance(holder, dict) else None
    if not isinstance(usage, dict) or "cost" not in usage:
        return None
    usage["upstream_cost"] = usage.pop("cost")
    if price_nano is not None:
        usage["cost"] = format_nano(price_nano)
    return data[:start] + _encode(obj) + data[end:]


def reported_usage(obj: dict[str, Any]) -> Any:
    """The usage object of an answer or a stream chunk: `usage`, else `x_groq.usage` (Groq's
    streams report it there). One dict probe more per chunk without usage."""
    raw = obj.get("usage")
    if raw is None:
        groq = obj.get("x_groq")
        if isinstance(groq, dict):
            return groq.get("usage")
    return raw


def usage_object(endpoint: str, usage: Usage, price_nano: int | None) -> dict[str, Any]:
    """`usage` in OpenAI's shape, with the price charged as `cost` (a decimal string)."""
    out: dict[str, Any] = {"prompt_tokens": usage.input_tokens}
    if endpoint != "embeddings":
        out["completion_tokens"] = usage.output_tokens
    out["total_tokens"] = usage.input_tokens + usage.output_tokens
    if usage.cached_input_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_input_tokens}
    if usage.reasoning_tokens:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    if price_nano is not None:
        out["cost"] = format_nano(price_nano)
    return out


def usage_chunk(
    first_event: bytes,
    endpoint: str,
    public_model: str,
    usage: Usage,
    price_nano: int | None,
    *,
    default_id: str,
) -> bytes:
    """A stream's usage chunk written by the gateway, as its own event: the id and creation
    time of the stream's first chunk (else `default_id` and now), no choices."""
    head = _chunk_head(first_event)
    rid, created = head.get("id"), head.get("created")
    chunk: dict[str, Any] = {
        "id": rid if isinstance(rid, str) else default_id,
        "object": "chat.completion.chunk" if endpoint == "chat" else "text_completion",
        "created": created if type(created) is int else int(time.time()),
        "model": public_model,
        "choices": [],
        "usage": usage_object(endpoint, usage, price_nano),
    }
    return b"data: " + _encode(chunk) + b"\n\n"


def _chunk_head(event: bytes) -> dict[str, Any]:
    """The first chunk of a stream, decoded (for the id and creation time it carries)."""
    try:
        chunk = _decode(data_of(event) or b"null")
    except msgspec.DecodeError:
        return {}
    return chunk if isinstance(chunk, dict) else {}


def response_texts(parsed: dict[str, Any]) -> list[str]:
    """The texts of an answer's choices (message content or completion text)."""
    texts: list[str] = []
    for choice in parsed.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            texts.append(message["content"])
        elif isinstance(choice.get("text"), str):
            texts.append(choice["text"])
    return texts
