"""The response of a streamed call: an ASGI callable that pumps upstream events to the client.

It passes each event through in the framing it came in (LF or CRLF line ends, comments,
`event:` and `id:` lines; the model name rewritten, usage read on the way), writes what
the upstream already delivered in one send, cuts a client that stops reading for the stall
timeout, keeps the hold alive while the stream lives, and settles before the last byte: a
client that saw the end of its answer has paid, and one whose answer could not be charged is
not shown its end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import msgspec

from tokenworks.dispatch.billing import (
    HTTP_CLIENT_CLOSED,
    SETTLEMENT_FAILED,
    Billing,
    joined,
)
from tokenworks.dispatch.capacity import Outcome
from tokenworks.dispatch.dispatcher import OUTPUT_REPORT_CHUNKS, Slot
from tokenworks.dispatch.errors import SETTLEMENT_FAILED_MESSAGE
from tokenworks.metering.usage import Usage
from tokenworks.money import format_nano
from tokenworks.pricing.quote import Quote
from tokenworks.wire.headers import passthrough
from tokenworks.wire.openai import (
    MODEL_FIELD,
    USAGE_NULL,
    model_field,
    reported_usage,
    upstream_cost_renamed,
    usage_chunk,
    with_cost,
)
from tokenworks.wire.openai_errors import error_body
from tokenworks.wire.sse import SSEError, data_of

if TYPE_CHECKING:
    from tokenworks.dispatch.relay import Call

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
_decode = msgspec.json.decode
# What reading an upstream event of the wrong shape raises: that upstream's malformed event,
# which ends the stream with an error event, never an exception out of the response.
UNREADABLE = (AttributeError, TypeError, KeyError, IndexError, ValueError)


class EventSource(Protocol):
    """An upstream's events, one at a time: `wire.sse.FrameReader` (bytes as sent, framing
    kept, for pass-through) or `wire.openai.SSEReader` (LF-framed, for streams re-encoded)."""

    def buffered(self) -> bytes | None: ...

    async def next(self) -> bytes | None: ...


class StreamResponse:
    """The ASGI response of a stream: pumps upstream events to the client until one ends."""

    def __init__(
        self,
        billing: Billing,
        call: Call,
        slot: Slot,
        upstream: aiohttp.ClientResponse,
        events: EventSource,
        first: bytes,
        client_stall_timeout_s: float,
    ) -> None:
        self.billing = billing
        self.recorder = billing.recorder
        self.metrics = billing.metrics
        self.client_stall_timeout_s = client_stall_timeout_s
        self.call = call
        self.slot = slot
        self.deployment = slot.deployment
        self.unreported_chunks = 0  # output chunks not yet reported to the scheduler
        self.upstream = upstream
        self.events = events
        self.first = first
        self.usage: Usage | None = None  # the upstream's, when plausible
        self.usage_error: str | None = None
        self.billed: Usage | None = None  # what was charged: the upstream's or the estimate
        self.reported_tier: Any = None
        self.quote: Quote | None = None
        self.texts: list[str] = []
        self.ttft_s: float | None = None
        self.status = 200
        self.error: str | None = None
        self.model_field = model_field(call.public_model)
        # Events the gateway writes itself (its usage chunk, an error) follow the upstream's
        # line ends, so a client sees one framing throughout.
        self.crlf = first.endswith(b"\r\n")
        self.done = False  # the upstream sent [DONE]
        self.done_event = b""
        # The event carrying usage (and no choices): it shows the cost, so it goes out with
        # [DONE], after the charge, never before.
        self.usage_event = b""
        self.finished = False  # settled and recorded
        self.charged = True  # False when the settlement failed: the answer must not end well
        self.pending_error: bytes | None = None  # an SSE error event to end the stream with
        self.writing_since_s: float | None = None  # a write the client has not taken yet
        self.stalled = False  # cut: the client stopped taking writes
        self._pump_task: asyncio.Future[None] | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._extension: asyncio.Future[None] | None = None
        self._extend_at_s = call.hold_at_s + call.hold_ttl_s / 2
        # Checked often enough to cut within 1.25 x the stall timeout and to extend the hold
        # with half its TTL still to run: a timer, not a task, so a stream costs one handle.
        self._tick_s = min(client_stall_timeout_s, call.hold_ttl_s / 2) / 4

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-request-id", self.call.request_id.encode()),
        ]
        headers += passthrough(self.upstream.raw_headers)
        if self.call.rate_headers:
            headers.extend((k.encode(), v.encode()) for k, v in self.call.rate_headers.items())
        if self.call.hold is not None:  # what is left with this request's hold in place
            balance = format_nano(self.call.hold.available_after_nano).encode()
            headers.append((b"x-tokenworks-balance", balance))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        pump = self._pump_task = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        self._tick_handle = asyncio.get_running_loop().call_later(self._tick_s, self._tick)
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done() or self.stalled:
                pump.cancel()
                self.status = HTTP_CLIENT_CLOSED
                if self.stalled:
                    self.error = (
                        f"client stopped reading for {self.client_stall_timeout_s:g} s; stream cut"
                    )
                else:
                    self.error = "client disconnected mid-stream"
            watch.cancel()
            await asyncio.gather(pump, watch, return_exceptions=True)
            if pump.done() and not pump.cancelled() and pump.exception() is not None:
                exc = pump.exception()
                if isinstance(exc, OSError):  # the client socket broke while we wrote
                    self.status = HTTP_CLIENT_CLOSED
                    self.error = "client disconnected mid-stream"
                else:
                    raise exc  # type: ignore[misc]
        finally:
            if self._tick_handle is not None:
                self._tick_handle.cancel()
            self.upstream.close()
            await self._finish()
        # A cut stream returns without its last message: the server closes the connection,
        # so the client sees a broken answer, not a finished one.

    def _tick(self) -> None:
        """Cut the stream when the client has not taken a write for the stall timeout;
        meanwhile keep the hold alive as long as the stream (it may outlive the first TTL)."""
        now_s = time.monotonic()
        since_s = self.writing_since_s
        if since_s is not None and now_s - since_s >= self.client_stall_timeout_s:
            self.stalled = True
            assert self._pump_task is not None
            self._pump_task.cancel()
            return
        if now_s >= self._extend_at_s:
            self._extend_at_s = now_s + self.call.hold_ttl_s / 2
            self._extension = asyncio.ensure_future(self.billing.extend_hold(self.call))
        self._tick_handle = asyncio.get_running_loop().call_later(self._tick_s, self._tick)

    async def _pump(self, send: Send) -> None:
        event: bytes | None = self.first
        while True:
            # Everything the upstream already delivered goes out in one write: one socket
            # send per event would cost more than all our per-event work together.
            chunks: list[bytes] = []
            while event is not None:
                try:
                    out = self._process(event)
                except UNREADABLE:  # JSON of the wrong shape (a translator cannot read it)
                    self._fail(502, "upstream sent a malformed stream chunk", "upstream_malformed")
                    out = None
                if out is not None:
                    chunks.append(out)
                if self.error is not None or self.done:
                    break
                event = self.events.buffered()
            if chunks:
                # Output counts toward the tenant's fair share as it streams, cheaply: one
                # report per OUTPUT_REPORT_CHUNKS chunks (the end corrects to the usage).
                self.unreported_chunks += len(chunks)
                if self.unreported_chunks >= OUTPUT_REPORT_CHUNKS:
                    self.slot.output(self.unreported_chunks)
                    self.unreported_chunks = 0
                if self.ttft_s is None:
                    self.ttft_s = time.perf_counter() - self.call.started_s
                # Written inline, not through a helper coroutine: that coroutine per write
                # cost 0.6-0.9 % of a stream's instructions. The tick reads the mark.
                self.writing_since_s = time.monotonic()
                await send(
                    {"type": "http.response.body", "body": b"".join(chunks), "more_body": True}
                )
                self.writing_since_s = None
            if self.error is not None or self.done:
                break
            try:
                event = await self.events.next()
            except TimeoutError:
                self._fail(504, "upstream timed out mid-stream", "upstream_timeout")
                break
            except (aiohttp.ClientError, SSEError) as exc:
                self._fail(502, f"upstream stream broken: {exc}", "upstream_cut")
                break
            if event is None:
                self._fail(502, "upstream closed the stream before [DONE]", "upstream_cut")
                break
        # Charge before the last byte: a client that saw the end of its answer has paid, and
        # one whose answer could not be charged is not shown its end.
        charged = await self._finish()
        if not charged:
            tail = self.pending_error or b""
        else:
            tail = self._usage_tail() + (self.pending_error or self.done_event)
        self.writing_since_s = time.monotonic()
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        self.writing_since_s = None

    def _usage_tail(self) -> bytes:
        """The usage chunk a client that asked for one gets before the end: the upstream's
        with its cost, or, when the charge is not the upstream's own usage chunk (none came,
        it was implausible, or it came elsewhere), one of ours with what was charged."""
        if not self.call.client_wants_usage:
            return b""
        quote = self.quote
        if self.usage is not None and self.usage_event:
            return (
                self.usage_event if quote is None else with_cost(self.usage_event, quote.price_nano)
            )
        call = self.call
        return self._framed(
            usage_chunk(
                self.first,
                call.endpoint,
                call.public_model,
                self.billed or Usage(),
                None if quote is None else quote.price_nano,
                default_id=call.request_id,
            )
        )

    def _framed(self, event: bytes) -> bytes:
        """One of our own LF-framed events in the upstream's line ends."""
        return event.replace(b"\n", b"\r\n") if self.crlf else event

    def _fail(self, status: int, message: str, code: str) -> None:
        self.status = status
        self.error = message
        self.metrics.upstream_errors.labels(self.deployment.producer, code).inc()
        self.pending_error = self._error_event(status, message, code)

    def _error_event(self, status: int, message: str, code: str) -> bytes:
        """A failure as the stream's last event, in the client's dialect and the upstream's
        line ends."""
        return self._framed(b"data: " + error_body(status, message, code) + b"\n\n")

    def _process(self, event: bytes) -> bytes | None:
        """Inspect one upstream event (its exact bytes, blank line included); return the bytes
        to send the client, or None to hide it."""
        data = data_of(event)
        if data is None:
            return event  # a comment, a blank line, an event without data: as it came
        if data == b"[DONE]":
            self.done = True
            self.done_event = event  # sent after settlement, as the last byte
            return None
        try:
            chunk = _decode(data)
        except msgspec.DecodeError:
            self._fail(502, "upstream sent a malformed stream chunk", "upstream_malformed")
            return None
        if not isinstance(chunk, dict):
            self._fail(502, "upstream sent a malformed stream chunk", "upstream_malformed")
            return None
        if "error" in chunk and "choices" not in chunk:
            self.status = 502
            self.error = "upstream reported an error mid-stream"
            return event
        reported = chunk.get("usage")
        if reported is None and "x_groq" in chunk:  # per chunk: one probe, no call
            reported = reported_usage(chunk)
        usage = None
        if reported is not None:
            usage, self.usage_error = self.recorder.read_usage(self.call, self.deployment, reported)
            if usage is not None:
                self.usage = usage
                self.reported_tier = chunk.get("service_tier")
        choices = chunk.get("choices")
        for choice in choices or ():
            if isinstance(choice, dict):
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(text, str):
                    self.texts.append(text)
                if isinstance(delta, dict):
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                    if isinstance(reasoning, str):
                        self.texts.append(reasoning)
        if not choices and isinstance(chunk.get("usage"), dict):
            if not self.call.client_wants_usage or usage is None:
                # The usage chunk we asked for on the client's behalf, or one we could not
                # believe (the client gets what it was charged instead, at the end).
                return None
            earlier = self.usage_event  # a second usage chunk: the first goes out as it was
            self.usage_event = MODEL_FIELD.sub(self.model_field, event, count=1)
            return earlier or None
        if not self.call.client_wants_usage:
            event = USAGE_NULL.sub(b"", event)
        if reported is not None and b'"cost"' in event:  # never the upstream's as the price
            event = upstream_cost_renamed(event) or event
        return MODEL_FIELD.sub(self.model_field, event, count=1)

    async def _finish(self) -> bool:
        """Settle and record once, whichever way the stream ended; False if not charged."""
        if self.finished:
            return self.charged
        self.finished = True
        usage = self.usage
        if usage is not None and not (usage.input_tokens and usage.output_tokens):
            usage, why = self.recorder.check_zero_counts(
                self.call, self.deployment, usage, self.texts
            )
            if why is not None:
                self.usage, self.usage_error = None, why
        if usage is None:
            usage = self.recorder.estimate(self.call, self.texts)
        self.billed = usage
        self.slot.finish(_outcome(self.status), usage.input_tokens, usage.output_tokens)
        self.quote = quote = self.billing.price(
            self.call, self.deployment, usage, self.reported_tier
        )
        self.charged, _ = await self.billing.conclude(
            self.call,
            self.deployment,
            self.status,
            usage,
            quote,
            ttft_s=self.ttft_s,
            error=joined(self.error, self.usage_error) if self.usage_error else self.error,
            durable=self.status != HTTP_CLIENT_CLOSED,
        )
        if not self.charged and self.pending_error is None:
            self.pending_error = self._error_event(
                502, SETTLEMENT_FAILED_MESSAGE, SETTLEMENT_FAILED
            )
        return self.charged


def _outcome(status: int) -> Outcome:
    """How a stream that had started ended, for the producer's limit and breaker."""
    if status == 200:
        return Outcome.OK
    if status == HTTP_CLIENT_CLOSED:
        return Outcome.CANCELLED
    return Outcome.TIMEOUT if status == 504 else Outcome.ERROR


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
