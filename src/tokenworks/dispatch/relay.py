"""Relay one client request to an upstream, fail over before the first byte, and meter it.

The relay owns the part of the hot path between "we know which model and key" and "the last
byte went out": pick candidates, hold the worst case (`billing`), send, pass the answer through
byte for byte (rewriting only the model name and adding the cost: `wire.openai`), read usage on
the way, and hand one usage record to the store when done (`recording`), whatever happened:
success, upstream failure, upstream crash mid-stream (`stream`), or a client that went away.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec
from starlette.responses import Response

from tokenworks.config import Deployment
from tokenworks.dispatch import dialects
from tokenworks.dispatch.admission import Admission
from tokenworks.dispatch.billing import (
    DEFAULT_CONTEXT_WINDOW_TOKENS,
    HOLD_MARGIN_S,
    HTTP_CLIENT_CLOSED,
    Billing,
    ModelBounds,
)
from tokenworks.dispatch.capacity import Outcome
from tokenworks.dispatch.dialect_stream import DialectStream
from tokenworks.dispatch.dispatcher import Dispatcher, Slot
from tokenworks.dispatch.errors import (
    ClientGone,
    DispatchError,
    InvalidCall,
    SettlementFailed,
    Shed,
    TooLargeForProducers,
    from_upstream,
)
from tokenworks.dispatch.preferences import ProviderPrefs
from tokenworks.dispatch.ratelimit import Permit
from tokenworks.dispatch.recording import Recorder, release
from tokenworks.dispatch.router import Route, Router
from tokenworks.dispatch.speeds import SpeedsCollector
from tokenworks.dispatch.stream import UNREADABLE, EventSource, StreamResponse
from tokenworks.keys.store import ApiKey
from tokenworks.ledger import HoldView, Ledger, LedgerError
from tokenworks.metering.store import UsageStore
from tokenworks.metering.usage import Usage
from tokenworks.metrics import Metrics
from tokenworks.money import format_nano
from tokenworks.pricing.quote import Pricer
from tokenworks.producers.openai_compat import OpenAIProducer, UpstreamError
from tokenworks.wire.common import Untranslatable
from tokenworks.wire.headers import passthrough
from tokenworks.wire.openai import (
    MAX_SSE_EVENT_BYTES,
    SSEReader,
    is_error_event,
    reported_usage,
    response_texts,
    rewrite_model,
    usage_object,
    with_cost,
)
from tokenworks.wire.sse import FrameReader, SSEError

PATHS = dialects.PATHS
MAX_RESPONSE_BYTES = 64 * 1024 * 1024

_decode = msgspec.json.decode
_encode = msgspec.json.encode
# Upstream formats whose usage and texts sit where chat completions put them.
_CHAT_LIKE = frozenset({"chat", "completions", "embeddings"})


# Request ids name ledger holds, so they must never repeat, across restarts too: a random
# per-process prefix and a counter (a uuid4 per request costs ~25x more).
_ID_PREFIX = "req_" + secrets.token_hex(8)
_ids = itertools.count()


def next_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):010x}"


@dataclass(slots=True)
class Call:
    """One client request on its way through the gateway."""

    endpoint: str
    payload: dict[str, Any]
    key: ApiKey
    route: Route
    stream: bool
    client_wants_usage: bool
    tags: dict[str, str]
    tariff: str | None = None
    body_bytes: int = 0
    hold: HoldView | None = None
    hold_ttl_s: float = HOLD_MARGIN_S
    hold_at_s: float = 0.0  # time.monotonic() when the hold was placed
    # Input or output beyond this is an upstream's error: the model's context window times
    # the request's prompts and choices (set by the relay before dispatch).
    usage_limit_tokens: int = DEFAULT_CONTEXT_WINDOW_TOKENS
    clamped_nano: int = 0  # price above the hold, not charged (`Billing.within_hold`)
    # The most output it may produce over all choices (set with its worst case).
    max_output_tokens: int = 0
    # `X-Tokenworks-Deadline-Ms`: how long it may wait for a producer, from arrival.
    deadline_ms: int | None = None
    # The ASGI receive channel, to see a client that hangs up while the call is queued.
    receive: Callable[[], Awaitable[Mapping[str, Any]]] | None = None
    queue_ms: float = 0.0  # how long it waited for a producer
    started_s: float = field(default_factory=time.perf_counter)
    request_id: str = field(default_factory=lambda: next_request_id())
    # When the request started: the moment its prices are taken at (several times per call).
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # What it took from its key's rate limits (settled when it is recorded), and the
    # x-ratelimit-* headers its answer carries; None for a key without limits.
    permit: Permit | None = None
    rate_headers: dict[str, str] | None = None
    # The request's OpenRouter `provider` object, taken out of the payload (never sent on).
    provider: ProviderPrefs | None = None
    # Its usage row was written (`Recorder.record`): every call ends in exactly one.
    recorded: bool = False
    # time.perf_counter() when the current attempt was sent: its upstream's speed is timed
    # from here (`dispatch/speeds.py`).
    sent_s: float = 0.0
    # The request in each upstream format it was translated to (None until one is needed).
    translations: dict[str, dict[str, Any]] | None = None
    # The client's `anthropic-beta`/`anthropic-version`, sent on to a `kind: anthropic`
    # producer when the request passes through (`wire.headers.anthropic_forwarded`).
    anthropic_headers: dict[str, str] | None = None

    @property
    def public_model(self) -> str:
        return self.route.model.name

    @property
    def ts_ms(self) -> int:
        return int(self.at.timestamp() * 1000)

    @property
    def service_tier(self) -> str | None:
        tier = self.payload.get("service_tier")
        # Anthropic's service_tier ("auto", "standard_only") is a capacity choice, not a price.
        return tier if isinstance(tier, str) and self.endpoint != "messages" else None


class Relay:
    # `X-Tokenworks-Cost` (what the producer charges the operator) goes out only when the
    # config says so (`expose_cost_header`): a reseller's customers must not see its margin.
    expose_cost = False

    def __init__(
        self,
        router: Router,
        producers: dict[str, OpenAIProducer],
        store: UsageStore,
        metrics: Metrics,
        pricer: Pricer,
        max_attempts: int,
        *,
        client_stall_timeout_s: float = 30.0,
        dispatcher: Dispatcher,
    ) -> None:
        self.client_stall_timeout_s = client_stall_timeout_s
        bounds = {
            name: ModelBounds.of(route.model, pricer) for name, route in router.routes.items()
        }
        self.recorder = Recorder(store, metrics, router.speeds)
        metrics.registry.register(SpeedsCollector(router.speeds))
        self.billing = Billing(pricer, metrics, self.recorder, bounds)
        self.limits = Admission(self.recorder, metrics, bounds)
        self.router = router
        self.producers = producers
        self.metrics = metrics
        self.max_attempts = max_attempts
        # Per producer, the format each route goes upstream in (None: it cannot serve it).
        self.formats = {
            name: dialects.upstream_formats(p.spec.wire_formats) for name, p in producers.items()
        }
        self.stored = dialects.ResponseIndex()
        self.dispatcher = dispatcher

    @property
    def ledger(self) -> Ledger | None:
        return self.billing.ledger

    @ledger.setter
    def ledger(self, ledger: Ledger | None) -> None:  # set when the gateway starts
        self.billing.ledger = self.recorder.ledger = ledger

    async def handle(self, call: Call) -> Any:
        """Serve a call; returns an ASGI response. Raises a `DispatchError` when it cannot."""
        candidates = self.router.candidates(call.route, self.max_attempts, call)
        if call.endpoint == "responses":
            candidates = self._sticky(call, candidates)
        candidates = self._expressible(call, candidates)
        billing = self.billing
        paying = billing.ledger is not None and call.key.account_id is not None
        worst_nano = billing.worst_case(call, candidates if paying else candidates[:1])
        if call.key.rate_scopes:  # a key without rate limits pays this one check
            self.limits.admit(call)
        last: UpstreamError | None = None
        last_model: str | None = None
        slot: Slot | None = None
        try:
            if paying:
                # Attempts run one after another, each up to its producer's timeout, after
                # waiting for a producer at most until the call's deadline.
                attempts_s = sum(self.producers[d.producer].spec.timeout_s for d in candidates)
                attempts_s += self.dispatcher.wait_bound_s(call)
                call.hold = await billing.hold(call, worst_nano, attempts_s)
            index: int | None = 0
            for _ in range(self.max_attempts):
                assert index is not None
                slot = self.dispatcher.start(call, candidates, index)
                if slot is None:  # no capacity free now: wait in a queue
                    slot = await self.dispatcher.acquire(call, candidates, index)
                deployment = slot.deployment
                producer = self.producers[deployment.producer]
                fmt = self.formats[deployment.producer][call.endpoint]
                if fmt == call.endpoint:
                    body = self._upstream_body(call, deployment)
                else:  # translated (`_expressible` made sure it can be)
                    assert fmt is not None
                    body = self._translated_body(call, deployment, fmt)
                headers = call.anthropic_headers
                if headers is not None and not (
                    fmt == "messages" == call.endpoint and producer.spec.kind == "anthropic"
                ):
                    headers = None  # translated, or not Anthropic's own API
                call.sent_s = time.perf_counter()
                try:
                    if call.stream:
                        return await self._open_stream(call, slot, producer, body, fmt, headers)
                    return await self._complete(call, slot, producer, body, fmt, headers)
                except UpstreamError as exc:
                    last, last_model = exc, deployment.model
                    self.metrics.upstream_errors.labels(exc.producer, exc.reason).inc()
                    index = slot.failed(exc, len(candidates))
                    if not exc.retryable or index is None:
                        break
        except (Shed, ClientGone, TooLargeForProducers) as exc:
            # Never charged, metered as refused (or as the client's hang-up).
            self.recorder.record(call, None, exc.status, Usage(), ttft_s=None, error=exc.message)
            await billing.void(call)
            raise
        except BaseException as exc:
            # Cancelled (the client left), no hold, or a bug: release the credit now, not at
            # expiry, and the rate limits' concurrency (a recorded call has released it).
            if slot is not None:
                slot.cancel()
            release(call, Usage())
            if not call.recorded:  # a ledger that could not hold, a hang-up, a bug: metered
                status, text = _refusal_of(exc)
                self.recorder.record(call, None, status, Usage(), ttft_s=None, error=text)
            await billing.void(call)
            raise
        assert last is not None, "a route always has at least one deployment"
        error = from_upstream(last, last_model, call.public_model)
        self.recorder.record(call, None, error.status, Usage(), ttft_s=None, error=last.message)
        await billing.void(call)
        raise error

    def _expressible(self, call: Call, candidates: list[Deployment]) -> list[Deployment]:
        """The candidates whose wire formats can carry this request (as is or translated),
        before anything waits or is held for them; none is the client's 400, naming what
        no format can express. A route passed through everywhere pays one lookup each."""
        formats = self.formats
        endpoint = call.endpoint
        if all(formats[d.producer][endpoint] == endpoint for d in candidates):
            return candidates
        usable: list[Deployment] = []
        untranslatable: Untranslatable | None = None
        for d in candidates:
            fmt = formats[d.producer][endpoint]
            if fmt != endpoint:
                try:  # kept on the call (`Call.translations`) for the send
                    self._translation(call, d, fmt)
                except Untranslatable as exc:
                    untranslatable = exc
                    continue
            usable.append(d)
        if not usable:
            assert untranslatable is not None, "a route always has at least one deployment"
            raise InvalidCall(untranslatable.message, param=untranslatable.param)
        return usable

    def _sticky(self, call: Call, candidates: list[Deployment]) -> list[Deployment]:
        """A Responses request continuing a stored response goes first to the producer
        that stored it (the others do not have it)."""
        previous = call.payload.get("previous_response_id")
        owner = self.stored.get(call.key.id, previous) if isinstance(previous, str) else None
        if owner is None:
            return candidates
        first = [d for d in candidates if d.producer == owner[0]]
        return first + [d for d in candidates if d.producer != owner[0]]

    def _translation(self, call: Call, deployment: Deployment, fmt: str | None) -> dict[str, Any]:
        """The request in format `fmt`, translated once per format and call; raises
        `Untranslatable` when `fmt` cannot express it."""
        if fmt is None:
            raise dialects.no_format(call.endpoint, deployment.producer)
        cache = call.translations
        if cache is None:
            cache = call.translations = {}
        payload = cache.get(fmt)
        if payload is None:
            payload = cache[fmt] = dialects.translated_payload(call.endpoint, call.payload, fmt)
        return payload

    def _translated_body(self, call: Call, deployment: Deployment, fmt: str | None) -> bytes:
        payload = dict(self._translation(call, deployment, fmt))
        payload["model"] = deployment.model
        if call.stream and fmt == "chat":
            payload["stream_options"] = {"include_usage": True}
        return _encode(payload)

    def _upstream_body(self, call: Call, deployment: Deployment) -> bytes:
        payload = dict(call.payload)
        payload["model"] = deployment.model
        if call.stream and call.endpoint in ("chat", "completions"):
            options = payload.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            options["include_usage"] = True
            payload["stream_options"] = options
        return _encode(payload)

    # -- plain responses -------------------------------------------------------------------

    async def _complete(
        self,
        call: Call,
        slot: Slot,
        producer: OpenAIProducer,
        body: bytes,
        fmt: str = "chat",
        headers: dict[str, str] | None = None,
    ) -> Any:
        deployment = slot.deployment
        response = await producer.post(PATHS[fmt], body, headers)
        try:
            data = await _read_bounded(response, MAX_RESPONSE_BYTES)
        except TimeoutError as exc:
            raise UpstreamError(producer.name, "timeout", "upstream timed out") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(producer.name, "cut", f"upstream response broken: {exc}") from exc
        finally:
            response.release()
        chat_like = fmt in _CHAT_LIKE
        # A passed-through Messages or Responses answer: only the fields read (see AnswerHead).
        head_only = not chat_like and fmt == call.endpoint
        try:
            parsed = dialects.read_head(data).as_dict() if head_only else _decode(data)
        except msgspec.DecodeError as exc:
            raise UpstreamError(
                producer.name, "malformed", "upstream returned malformed JSON"
            ) from exc
        if not isinstance(parsed, dict):
            raise UpstreamError(producer.name, "malformed", "upstream returned a non-object")
        # Read before the charge: an answer of the wrong shape (one its texts or translation
        # cannot be read from) is the upstream's broken answer, failed over and never charged,
        # not an answer charged and then withheld.
        try:
            raw_usage = reported_usage(parsed)
            if not chat_like:
                raw_usage = dialects.answer_usage(fmt, parsed, raw_usage)
            usage, usage_error = self.recorder.read_usage(call, deployment, raw_usage)
            if usage is not None and not (usage.input_tokens and usage.output_tokens):
                if head_only:
                    parsed, head_only = _decode(data), False
                usage, usage_error = self.recorder.check_zero_counts(
                    call, deployment, usage, _texts(fmt, parsed)
                )
            # A body whose usage shows counts that were not charged (implausible ones) shows the
            # charged ones instead; otherwise it goes out as it came, plus its cost.
            shows_other_counts = isinstance(parsed.get("usage"), dict) and (
                usage is None or (chat_like and raw_usage is not parsed["usage"])
            )
            if usage is None:
                if head_only:
                    parsed, head_only = _decode(data), False
                usage = self.recorder.estimate(call, _texts(fmt, parsed))
            translated: dict[str, Any] | None = None
            if fmt != call.endpoint:
                translated = dialects.translated_answer(call.endpoint, fmt, parsed, call.payload)
        except UNREADABLE as exc:
            raise UpstreamError(
                producer.name, "malformed", f"upstream answer not in its format: {exc!r}"
            ) from exc
        slot.finish(Outcome.OK, usage.input_tokens, usage.output_tokens)
        quote = self.billing.price(call, deployment, usage, parsed.get("service_tier"))
        charged, balance_nano = await self.billing.conclude(
            call, deployment, response.status, usage, quote,
            ttft_s=None, error=usage_error, durable=True,
        )  # fmt: skip
        if not charged:
            raise SettlementFailed()
        price_nano = None if quote is None else quote.price_nano
        if translated is not None:  # translated: the answer is re-encoded anyway
            answer = translated
            answer["model"] = call.public_model
            answer["usage"] = dialects.usage_in(call.endpoint, usage, price_nano)
            body = _encode(answer)
        elif shows_other_counts:  # a re-encode, on this rare path only
            shown = parsed["usage"]
            parsed["usage"] = (
                usage_object(call.endpoint, usage, price_nano)
                if chat_like
                else dialects.usage_in(call.endpoint, usage, price_nano)
            )
            if "cost" in shown:  # the upstream's own figure, kept for reconciliation
                parsed["usage"]["upstream_cost"] = shown["cost"]
            if "model" in parsed:
                parsed["model"] = call.public_model
            body = _encode(parsed)
        else:
            body = rewrite_model(data, call.public_model)
            if price_nano is not None:
                body = with_cost(body, price_nano)
        if fmt == "responses" and parsed.get("store") is not False:
            self.stored.add(
                call.key.id, parsed.get("id"), producer.name, call.public_model, deployment.model
            )
        headers = {"x-request-id": call.request_id}
        if call.rate_headers:
            headers.update(call.rate_headers)
        if balance_nano is not None:
            headers["x-tokenworks-balance"] = format_nano(balance_nano)
        if quote is not None:
            if self.expose_cost:
                headers["x-tokenworks-cost"] = format_nano(quote.cost_nano)
            headers["x-tokenworks-price"] = format_nano(quote.price_nano)
        answer = Response(
            body, status_code=response.status, media_type="application/json", headers=headers
        )
        answer.raw_headers += passthrough(response.raw_headers)  # as bytes, no re-encoding
        return answer

    # -- streams -------------------------------------------------------------------------------

    async def _open_stream(
        self,
        call: Call,
        slot: Slot,
        producer: OpenAIProducer,
        body: bytes,
        fmt: str = "chat",
        headers: dict[str, str] | None = None,
    ) -> Any:
        response = await producer.post(PATHS[fmt], body, headers)
        # A pass-through stream forwards each event's bytes as sent (its framing kept); a
        # translated one is re-encoded, so it reads events in LF framing.
        passthrough = fmt == call.endpoint
        events: EventSource = (
            FrameReader(response.content.readany, MAX_SSE_EVENT_BYTES)
            if passthrough
            else SSEReader(response.content.readany)
        )
        try:
            first = await events.next()
        except TimeoutError as exc:
            response.close()
            raise UpstreamError(producer.name, "timeout", "upstream timed out") from exc
        except (aiohttp.ClientError, SSEError) as exc:
            response.close()
            raise UpstreamError(producer.name, "cut", f"upstream stream broken: {exc}") from exc
        if first is None:
            response.close()
            raise UpstreamError(producer.name, "cut", "upstream closed the stream at once")
        if is_error_event(first):
            # Some upstreams answer 200 and put the error in the first event: nothing has
            # reached the client yet, so this is a failure like any other before the first byte.
            response.close()
            raise UpstreamError(producer.name, "stream_error", "upstream streamed an error")
        if passthrough and fmt in _CHAT_LIKE:
            return StreamResponse(
                self.billing, call, slot, response, events, first, self.client_stall_timeout_s
            )
        return DialectStream(
            self.billing, call, slot, response, events, first,
            self.client_stall_timeout_s, fmt, self.stored,
        )  # fmt: skip


async def _read_bounded(response: aiohttp.ClientResponse, limit_bytes: int) -> bytes:
    length = response.content_length
    if length is not None and length > limit_bytes:
        raise aiohttp.ClientPayloadError(f"response of {length} bytes exceeds the limit")
    if length is not None:
        return await response.content.readexactly(length)
    parts: list[bytes] = []
    size = 0
    while chunk := await response.content.readany():
        size += len(chunk)
        if size > limit_bytes:
            raise aiohttp.ClientPayloadError("response exceeds the size limit")
        parts.append(chunk)
    return b"".join(parts)


def _refusal_of(exc: BaseException) -> tuple[int, str]:
    """The status and error a call's usage row shows when `exc` ended it unrecorded."""
    if isinstance(exc, DispatchError):
        return exc.status, exc.message
    if isinstance(exc, LedgerError):  # busy or down: answered 503 (`api/errors.py`)
        return 503, f"the ledger could not hold this request: {exc}"
    if isinstance(exc, asyncio.CancelledError):
        return HTTP_CLIENT_CLOSED, "cancelled before its answer"
    return 500, f"internal error: {type(exc).__name__}"


def _texts(fmt: str, parsed: dict[str, Any]) -> list[str]:
    """An answer's texts (only needed when its usage is missing or doubtful)."""
    return response_texts(parsed) if fmt in _CHAT_LIKE else dialects.answer_texts(fmt, parsed)
