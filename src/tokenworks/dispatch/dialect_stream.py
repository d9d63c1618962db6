"""A stream in Messages or Responses format, or one translated between formats.

The pump, the stall cut, the hold's extension and settle-before-the-last-byte are
`StreamResponse`'s; this class only knows the formats: where an upstream in `upstream` format
puts usage, text and its end (chat: `[DONE]`; Messages: `message_stop`; Responses: the
`response.completed` event), and what the client gets: the events as sent, in the upstream's
framing (`wire.sse.FrameReader`: CRLF, comments, `event:` lines; only the model name spliced
and the cost added) when the producer speaks the route's format, else the translator's (LF).
The closing events (Messages: `message_delta` and `message_stop`; Responses: the final
event; chat: the usage chunk and `[DONE]`) go out after the charge, carrying its `cost`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from tokenworks.dispatch.billing import Billing
from tokenworks.dispatch.dialects import (
    ResponseIndex,
    Translator,
    error_event,
    messages_usage_raw,
    with_usage,
)
from tokenworks.dispatch.dispatcher import Slot
from tokenworks.dispatch.stream import EventSource, StreamResponse
from tokenworks.wire.anthropic import MessagesUsageCollector
from tokenworks.wire.openai import (
    MODEL_FIELD,
    event_data,
    reported_usage,
    upstream_cost_renamed,
    with_cost,
)
from tokenworks.wire.openai_errors import error_body
from tokenworks.wire.sse import data_of

if TYPE_CHECKING:
    from tokenworks.dispatch.relay import Call

_decode = msgspec.json.decode
_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Passed-through events by name: text deltas (read only for an estimate), and events that
# carry neither usage, nor the model name, nor the end.
_TEXT_EVENTS = frozenset(
    {
        b"content_block_delta",
        b"response.output_text.delta",
        b"response.function_call_arguments.delta",
    }
)
_PLAIN_EVENTS = frozenset(
    {
        b"ping", b"content_block_start", b"content_block_stop",
        b"response.output_item.added", b"response.output_item.done",
        b"response.content_part.added", b"response.content_part.done",
        b"response.output_text.done", b"response.function_call_arguments.done",
        b"response.reasoning_summary_part.added", b"response.reasoning_summary_part.done",
        b"response.reasoning_summary_text.delta", b"response.reasoning_summary_text.done",
    }
)  # fmt: skip


def _delta_texts(raw: list[bytes]) -> list[str]:
    """The texts of undecoded Messages or Responses delta events."""
    texts: list[str] = []
    for data in raw:
        try:
            event = _decode(data)
        except msgspec.DecodeError:
            continue
        delta = event.get("delta") if isinstance(event, dict) else None
        if isinstance(delta, dict):
            delta = delta.get("text") or delta.get("thinking") or delta.get("partial_json")
        if isinstance(delta, str):
            texts.append(delta)
    return texts


class DialectStream(StreamResponse):
    """`StreamResponse` for every route and upstream format but chat on chat."""

    def __init__(
        self,
        billing: Billing,
        call: Call,
        slot: Slot,
        upstream: aiohttp.ClientResponse,
        events: EventSource,
        first: bytes,
        client_stall_timeout_s: float,
        fmt: str,
        stored: ResponseIndex,
    ) -> None:
        super().__init__(billing, call, slot, upstream, events, first, client_stall_timeout_s)
        self.fmt = fmt  # the upstream's format
        self.stored = stored
        self.passthrough = fmt == call.endpoint
        self.translator = (
            None
            if self.passthrough
            else Translator(
                call.endpoint, fmt, call.payload, call.public_model, call.client_wants_usage
            )
        )
        self.collector = MessagesUsageCollector() if fmt == "messages" else None
        # The closing events, sent after the charge. Passed through, they are the upstream's
        # bytes (framing included) and whatever follows them, in order.
        self.closing = b""
        self.raw_texts: list[bytes] = []  # passed-through text deltas, not yet decoded

    def _error_event(self, status: int, message: str, code: str) -> bytes:
        endpoint = self.call.endpoint
        if endpoint == "chat":
            return b"data: " + error_body(status, message, code) + b"\n\n"
        event = error_event(endpoint, message, code)
        return self._framed(event) if self.passthrough else event

    def _usage_tail(self) -> bytes:
        quote = self.quote
        if not self.closing:
            return self.closing
        price_nano = None if quote is None else quote.price_nano
        if self.usage is None and self.billed is not None:  # charged the estimate: show it
            if self.crlf:  # rare: re-framed to read, then back to the upstream's line ends
                closing = self.closing.replace(b"\r\n", b"\n")
                shown = with_usage(closing, self.call.endpoint, self.billed, price_nano)
                return shown.replace(b"\n", b"\r\n")
            return with_usage(self.closing, self.call.endpoint, self.billed, price_nano)
        return self.closing if price_nano is None else with_cost(self.closing, price_nano)

    def _process(self, event: bytes) -> bytes | None:
        passthrough = self.passthrough
        if passthrough:
            if event.startswith(b"event:"):
                out = self._pass(event)
                if out is not None:
                    return self._in_order(out)
            data = data_of(event)
            if data is None:  # a comment or a bare `event:` line: as it came
                return self._in_order(event)
        else:
            data = event_data(event)
            if data is None:
                return None
        fmt = self.fmt
        if data == b"[DONE]":
            if fmt == "chat":
                self.done = True
                if self.translator is not None:
                    self.closing = self.translator.feed(event)
            return None
        try:
            chunk = _decode(data)
        except msgspec.DecodeError:
            self._fail(502, "upstream sent a malformed stream chunk", "upstream_malformed")
            return None
        if not isinstance(chunk, dict):
            self._fail(502, "upstream sent a malformed stream chunk", "upstream_malformed")
            return None
        holds = self._read(fmt, chunk)
        if self.error is not None and self.pending_error is not None:
            return None
        if self.translator is not None:
            out = self.translator.feed(event, chunk)
            if self.done or holds:
                self.closing += out
                return None
            return out or None
        if b'"cost"' in event:  # never the upstream's as the price: its own kept apart
            event = upstream_cost_renamed(event) or event
        if holds or self.done:
            self.closing += MODEL_FIELD.sub(self.model_field, event, count=1)
            return None
        return self._in_order(MODEL_FIELD.sub(self.model_field, event, count=1))

    def _in_order(self, event: bytes) -> bytes | None:
        """A passed-through event, kept behind the closing events once they are held (a
        `ping` after `message_delta` goes out after it, as sent)."""
        if self.closing:
            self.closing += event
            return None
        return event

    def _pass(self, event: bytes) -> bytes | None:
        """A passed-through event, by its `event:` name, without decoding what needs no
        reading: text deltas are kept as bytes (decoded only if an estimate needs their
        text), item and block events go out as they came. None: read it whole."""
        end = event.find(b"\n")
        name = event[6:end].strip() if end > 0 else b""
        if name in _TEXT_EVENTS:
            data = data_of(event)
            if data is not None:
                self.raw_texts.append(data)
            return event
        if name in _PLAIN_EVENTS:
            return event
        if name == b"response.in_progress":
            return MODEL_FIELD.sub(self.model_field, event, count=1)
        return None

    async def _finish(self) -> bool:
        usage = self.usage
        if self.raw_texts and (usage is None or not (usage.input_tokens and usage.output_tokens)):
            self.texts.extend(_delta_texts(self.raw_texts))  # an estimate needs them
            self.raw_texts.clear()
        return await super()._finish()

    def _read(self, fmt: str, chunk: dict[str, Any]) -> bool:
        """Read usage, text and the end from one upstream event; True when the event is held
        back to go out after the charge (it carries the final usage)."""
        if fmt == "chat":
            if "error" in chunk and "choices" not in chunk:
                self.status = 502
                self.error = "upstream reported an error mid-stream"
                return False
            reported = reported_usage(chunk)
            if reported is not None:
                self._usage_from(chunk, reported)
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict):
                    text = delta.get("content") or delta.get("reasoning_content")
                    if isinstance(text, str):
                        self.texts.append(text)
            return False
        kind = chunk.get("type")
        if fmt == "messages":
            if kind == "content_block_delta":
                delta = chunk.get("delta")
                if isinstance(delta, dict):
                    text = delta.get("text") or delta.get("thinking") or delta.get("partial_json")
                    if isinstance(text, str):
                        self.texts.append(text)
                return False
            if kind in ("message_start", "message_delta"):
                assert self.collector is not None
                self.collector.feed(chunk)
                self._usage_from(chunk, messages_usage_raw(self.collector.counts))
                return bool(kind == "message_delta")
            if kind == "message_stop":
                self.done = True
            elif kind == "error":
                self.status = 502
                self.error = "upstream reported an error mid-stream"
            return False
        # responses
        if kind == "response.output_text.delta" or kind == "response.function_call_arguments.delta":
            delta = chunk.get("delta")
            if isinstance(delta, str):
                self.texts.append(delta)
            return False
        response = chunk.get("response")
        if kind == "response.created" and isinstance(response, dict):
            if response.get("store") is not False:
                self.stored.add(
                    self.call.key.id, response.get("id"), self.deployment.producer,
                    self.call.public_model, self.deployment.model,
                )  # fmt: skip
        elif kind in _RESPONSE_ENDS:
            self.done = True
            if isinstance(response, dict) and response.get("usage") is not None:
                self._usage_from(response, response["usage"])
        elif kind == "error":
            self.status = 502
            self.error = "upstream reported an error mid-stream"
        return False

    def _usage_from(self, holder: dict[str, Any], reported: Any) -> None:
        usage, self.usage_error = self.recorder.read_usage(self.call, self.deployment, reported)
        if usage is not None:
            self.usage = usage
            self.reported_tier = holder.get("service_tier")
