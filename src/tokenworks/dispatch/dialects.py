"""Which wire format a request goes upstream in, and the answer back in the client's.

A route speaks one format (`chat`, `messages`, `responses`; `completions` and `embeddings`
ride with chat). A deployment's producer speaks some formats natively (`Producer.formats`).
The relay passes a request through when the producer speaks the route's format, and
otherwise translates it into one the producer speaks (chat completions first, Messages for a
producer that speaks only that) and the answer back (`wire.anthropic`, `wire.responses`).
Usage is read in the format the upstream answered in; what is priced is the same `Usage`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgspec

from tokenworks.config import WireFormat
from tokenworks.metering.usage import Usage
from tokenworks.money import format_nano
from tokenworks.wire import anthropic, responses
from tokenworks.wire.common import Untranslatable, decode, encode
from tokenworks.wire.openai import event_data, response_texts, usage_object

# The upstream path of each format, under the producer's base_url (which ends in /v1).
PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "messages": "/messages",
    "responses": "/responses",
}
ENDPOINTS = tuple(PATHS)
# Requests translated away from chat completions carry the chat-family bodies.
_CHAT_FAMILY = ("chat", "completions", "embeddings")
# Where a route goes when its producer does not speak it, in order of preference.
_FALLBACKS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "completions": (),
    "embeddings": (),
    "messages": ("chat",),
    "responses": ("chat", "messages"),
}


class AnswerHead(msgspec.Struct):
    """The fields a passed-through Messages or Responses answer is read for: decoding only
    these (msgspec skips the rest without building it) keeps their pass-through as cheap as
    chat's, whose answers are smaller. The whole answer is decoded only on the rare paths
    (usage missing or doubtful)."""

    usage: Any = None
    id: Any = None
    store: Any = None
    service_tier: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "usage": self.usage, "id": self.id, "store": self.store,
            "service_tier": self.service_tier,
        }  # fmt: skip


read_head = msgspec.json.Decoder(AnswerHead).decode


def upstream_formats(formats: tuple[WireFormat, ...]) -> dict[str, str | None]:
    """For each route, the format a producer speaking `formats` is sent it in (None: it
    cannot serve that route)."""
    out: dict[str, str | None] = {}
    for endpoint in ENDPOINTS:
        native = "chat" if endpoint in _CHAT_FAMILY else endpoint
        if native in formats:
            out[endpoint] = endpoint
            continue
        out[endpoint] = next((f for f in _FALLBACKS[endpoint] if f in formats), None)
    return out


def no_format(endpoint: str, producer: str) -> Untranslatable:
    return Untranslatable(f"producer {producer!r} cannot serve /v1/{endpoint}", "model")


def translated_payload(endpoint: str, payload: dict[str, Any], target: str) -> dict[str, Any]:
    """The client's body in the `target` format (model left to splice). Raises
    `Untranslatable` for what the target cannot express."""
    try:
        if endpoint == "messages":
            chat = anthropic.messages_request_to_chat(payload)
        elif endpoint == "responses":
            chat = responses.responses_request_to_chat(payload)
        else:
            chat = payload
        if target == "chat":
            return chat
        if target == "messages":
            return anthropic.chat_request_to_messages(chat)
    except Untranslatable:
        raise
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        # A block of the wrong type somewhere deep: the client's error, named as well as we can.
        raise Untranslatable(f"the request cannot be read: {exc}", None) from exc
    raise Untranslatable(f"/v1/{endpoint} cannot be sent as {target}", "model")


def messages_usage_raw(usage: Any) -> dict[str, Any] | None:
    """A Messages usage object in the OpenAI shape the plausibility check reads (input
    including cache reads and writes; the 1-hour writes kept apart). A count that is not a
    whole number is passed on as it is, for the check to name."""
    if not isinstance(usage, dict):
        return None
    fresh = usage.get("input_tokens")
    read = usage.get("cache_read_input_tokens") or 0
    written = usage.get("cache_creation_input_tokens") or 0
    prompt = fresh
    if type(fresh) is int and type(read) is int and type(written) is int:
        prompt = fresh + read + written
    raw: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": usage.get("output_tokens"),
        "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": written},
    }
    creation = usage.get("cache_creation")
    if isinstance(creation, dict):
        raw["cache_creation"] = creation
    return raw


def answer_usage(fmt: str, parsed: dict[str, Any], chat_usage: Any) -> Any:
    """The raw usage object of an upstream answer in format `fmt`, OpenAI-shaped."""
    if fmt == "messages":
        return messages_usage_raw(parsed.get("usage"))
    if fmt == "responses":
        return parsed.get("usage")
    return chat_usage


def answer_texts(fmt: str, parsed: dict[str, Any]) -> list[str]:
    """The texts of an answer in format `fmt` (what an estimate counts)."""
    if fmt == "messages":
        return [
            str(block.get("text") or block.get("thinking") or "")
            for block in parsed.get("content") or ()
            if isinstance(block, dict)
        ]
    if fmt == "responses":
        texts: list[str] = []
        for item in parsed.get("output") or ():
            if not isinstance(item, dict):
                continue
            for part in item.get("content") or item.get("summary") or ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
            if isinstance(item.get("arguments"), str):
                texts.append(item["arguments"])
        return texts
    return response_texts(parsed)


def usage_in(fmt: str, usage: Usage, price_nano: int | None) -> dict[str, Any]:
    """`usage` in format `fmt`'s own shape, with the price charged as `cost`."""
    chat = usage_object("chat", usage, None)
    details = chat.setdefault("prompt_tokens_details", {})
    details["cache_write_tokens"] = usage.cache_write_tokens
    out: dict[str, Any]
    if fmt == "messages":
        out = dict(anthropic.chat_usage_to_messages(chat))
    elif fmt == "responses":
        out = responses.chat_usage_to_responses(chat)
    else:
        out = chat
    if price_nano is not None:
        out["cost"] = format_nano(price_nano)
    return out


def with_usage(closing: bytes, endpoint: str, usage: Usage, price_nano: int | None) -> bytes:
    """A stream's closing events with the usage object replaced by what was charged (when it
    is not the upstream's: an estimate). Rare: each closing event is decoded and re-encoded."""
    out: list[bytes] = []
    for event in closing.split(b"\n\n"):
        if not event.strip():
            continue
        data = event_data(event)
        if data is None or b'"usage"' not in data:
            out.append(event + b"\n\n")
            continue
        body = decode(data)
        holder = body.get("response") if isinstance(body.get("response"), dict) else body
        if isinstance(holder, dict) and "usage" in holder:
            holder["usage"] = usage_in(endpoint, usage, price_nano)
        head = event[: event.index(b"data:")] if b"data:" in event else b""
        out.append(head + b"data: " + encode(body) + b"\n\n")
    return b"".join(out)


def translated_answer(
    endpoint: str, upstream: str, parsed: dict[str, Any], payload: dict[str, Any]
) -> dict[str, Any]:
    """An upstream answer in format `upstream` as the route `endpoint` answers."""
    chat = parsed if upstream == "chat" else anthropic.messages_response_to_chat(parsed)
    if endpoint == "messages":
        return anthropic.chat_response_to_messages(chat)
    if endpoint == "responses":
        return responses.chat_response_to_responses(chat, payload)
    return chat


class _PublicResponsesStream(responses.ChatToResponsesStream):
    """Names the public model (the request's) in every event, never the upstream's."""

    __slots__ = ()

    def _start(self, chunk: dict[str, Any], events: list[dict[str, Any]]) -> None:
        super()._start(dict(chunk, model=self._request["model"]), events)


class Translator:
    """Upstream SSE events in format `upstream` in, the route's events out (one or two
    translators chained: Messages -> chat -> Responses)."""

    __slots__ = ("_first", "_second")

    def __init__(
        self, endpoint: str, upstream: str, payload: dict[str, Any], model: str, usage: bool
    ) -> None:
        first: Any = None
        second: Any = None
        if upstream == "messages":
            # The chat client gets a usage chunk when it asked; a chain always needs one.
            first = anthropic.MessagesToChatStream(
                include_usage=usage or endpoint != "chat", model=model
            )
        if endpoint == "messages":
            second = anthropic.ChatToMessagesStream(model=model)
        elif endpoint == "responses":
            second = _PublicResponsesStream(dict(payload, model=model))
        self._first = first
        self._second = second

    def feed(self, frame: bytes, chunk: dict[str, Any] | None = None) -> bytes:
        """One whole upstream event (without its blank line) in, bytes for the client out;
        `chunk`: its data, when the caller decoded it already (then it is not decoded twice)."""
        first = self._first or self._second
        assert first is not None
        out = bytes(first.feed_sse(frame) if chunk is None else first.feed_decoded(chunk))
        if self._first is None or self._second is None or not out:
            return out
        return b"".join(self._second.feed_sse(part) for part in out.split(b"\n\n") if part.strip())


def error_event(endpoint: str, message: str, code: str | None = None, seq: int = 0) -> bytes:
    """A mid-stream failure as the route's own error event."""
    if endpoint == "messages":
        return anthropic.encode_messages_event(
            {"type": "error", "error": {"type": "api_error", "message": message}}
        )
    body: dict[str, Any] = {"type": "error", "code": code, "message": message, "param": None}
    body["sequence_number"] = seq
    return b"event: error\ndata: " + encode(body) + b"\n\n"


def decode_event(event: bytes) -> tuple[bytes | None, Any]:
    """An upstream event's data and its decoded JSON (None for a comment or `[DONE]`);
    raises `msgspec.DecodeError` for malformed JSON."""
    data = event_data(event)
    if data is None or data == b"[DONE]":
        return data, None
    return data, decode(data)


class ResponseIndex:
    """Which producer stored a response a key created (passed through with `store`), so
    `GET`/`DELETE /v1/responses/{id}` reach it. Bounded: the oldest entries go first."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._owners: OrderedDict[tuple[str, str], tuple[str, str, str]] = OrderedDict()

    def add(self, key_id: str, response_id: Any, producer: str, model: str, upstream: str) -> None:
        if not isinstance(response_id, str) or not response_id:
            return
        self._owners[(key_id, response_id)] = (producer, model, upstream)
        if len(self._owners) > self.max_entries:
            self._owners.popitem(last=False)

    def get(self, key_id: str, response_id: str) -> tuple[str, str, str] | None:
        """(producer, public model, upstream model) of a stored response."""
        return self._owners.get((key_id, response_id))

    def remove(self, key_id: str, response_id: str) -> None:
        self._owners.pop((key_id, response_id), None)
