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

MAX_SSE_EVENT_BYTES = 4 * 1024 * 1024

# The first `"model": "..."` of an answer or chunk: where the public model name goes.
MODEL_FIELD = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
# `"usage": null` in a chunk: upstreams add it to every chunk once usage is asked for.
USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null')
_USAGE_OPEN = re.compile(rb'"usage"\s*:\s*\{\s*(\}?)')
_decode = msgspec.json.decode
_encode = msgspec.json.encode


class SSEError(Exception):
    """A stream that cannot be split into events: one too large, or one cut off at the end."""


class SSEReader:
    """Splits an upstream byte stream into SSE events (`...\\n\\n`), bounded in size.

    CRLF line ends are read as LF, so every event comes back in LF framing."""

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
    put their error in the stream)."""
    data = event_data(event)
    if data is None or b'"error"' not in data:
        return False
    try:
        chunk = _decode(data)
    except msgspec.DecodeError:
        return False  # a malformed first chunk is the stream's problem, handled by the pump
    return isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk


def model_field(public_model: str) -> bytes:
    """The `"model":"..."` that replaces an upstream's own model name."""
    return b'"model":' + _encode(public_model)


def rewrite_model(data: bytes, public_model: str) -> bytes:
    return MODEL_FIELD.sub(b'"model":' + _encode(public_model), data, count=1)


def with_cost(data: bytes, price_nano: int) -> bytes:
    """Add `"cost": "<decimal>"` to the first `usage` object, as OpenRouter does."""
    match = _USAGE_OPEN.search(data)
    if match is None:
        return data
    field = b'"cost":"' + format_nano(price_nano).encode() + b'"'
    insert_at = match.start(1)
    separator = b"" if match.group(1) else b","
    return data[:insert_at] + field + separator + data[insert_at:]


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
        chunk = _decode(event_data(event) or b"null")
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
