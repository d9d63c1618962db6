"""Relay one client request to an upstream, fail over before the first byte, and meter it.

The relay owns the part of the hot path between "we know which model and key" and "the last
byte went out": pick candidates, send, pass the answer through byte for byte (rewriting only
the model name), read usage on the way, and hand one usage record to the store when done,
whatever happened: success, upstream failure, upstream crash mid-stream, or a client that
went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec
from starlette.responses import Response

from tokenworks.config import Deployment, Model
from tokenworks.dispatch.errors import (
    SETTLEMENT_FAILED_MESSAGE,
    HoldRefused,
    HoldUnavailable,
    InvalidCall,
    SettlementFailed,
    from_upstream,
)
from tokenworks.dispatch.router import Route, Router
from tokenworks.keys.store import ApiKey
from tokenworks.ledger import HoldClosed, HoldView, Ledger, LedgerBusy, LedgerError, Refused
from tokenworks.ledger.domain import MAX_AMOUNT_NANO
from tokenworks.metering import extract
from tokenworks.metering.store import USAGE_SCHEMA, UsageStore, usage_row
from tokenworks.metering.usage import Usage, UsageRecord
from tokenworks.metrics import Metrics
from tokenworks.money import format_nano
from tokenworks.pricing.quote import Pricer, PricingError, Quote
from tokenworks.producers.openai_compat import OpenAIProducer, UpstreamError
from tokenworks.wire.openai_errors import error_body

PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_SSE_EVENT_BYTES = 4 * 1024 * 1024
HTTP_CLIENT_CLOSED = 499  # nginx's convention for "the client went away"
HOLD_MARGIN_S = 60.0  # a hold outlives the longest upstream timeout by this much
MAX_HOLD_TTL_S = 86_400.0  # the ledger's longest hold
CLAMP_LOG_INTERVAL_S = 10.0  # at most one warning per interval; the metrics count every one
# When neither the config nor the price book says: no published model produces more than
# 128 Ki tokens in one choice (GPT-5, Claude, Gemini cap output at 64-128 Ki), and no published
# context window is larger than 10 Mi tokens (Llama 4 Scout's 10M).
DEFAULT_MAX_OUTPUT_TOKENS = 131_072
DEFAULT_CONTEXT_WINDOW_TOKENS = 10_485_760
SETTLEMENT_FAILED = SettlementFailed.code

log = logging.getLogger("tokenworks.relay")

_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null')
_USAGE_OPEN = re.compile(rb'"usage"\s*:\s*\{\s*(\}?)')
_decode = msgspec.json.decode
_encode = msgspec.json.encode

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


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
    started_s: float = field(default_factory=time.perf_counter)
    request_id: str = field(default_factory=lambda: next_request_id())
    # When the request started: the moment its prices are taken at (several times per call).
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def public_model(self) -> str:
        return self.route.model.name

    @property
    def ts_ms(self) -> int:
        return int(self.at.timestamp() * 1000)

    @property
    def service_tier(self) -> str | None:
        tier = self.payload.get("service_tier")
        return tier if isinstance(tier, str) else None


@dataclass(frozen=True, slots=True)
class ModelBounds:
    """What one choice of a model can produce and use, resolved once at start."""

    max_output_tokens: int
    context_window_tokens: int

    @classmethod
    def of(cls, model: Model, pricer: Pricer) -> ModelBounds:
        """The config's figures, else the price book's context window (the largest over the
        deployments; one the book does not know counts as the generous default)."""
        window = model.context_window_tokens or max(
            pricer.context_window(d.producer, d.model, d.cost) or DEFAULT_CONTEXT_WINDOW_TOKENS
            for d in model.deployments
        )
        max_output = model.max_output_tokens or min(window, DEFAULT_MAX_OUTPUT_TOKENS)
        return cls(max_output, max(window, max_output))


def _prompt_count(endpoint: str, payload: dict[str, Any]) -> int:
    """How many prompts a request carries: an upstream answers each one (`n` times)."""
    if endpoint == "chat":
        return 1
    value = payload.get("prompt" if endpoint == "completions" else "input")
    if not isinstance(value, list) or not value:
        return 1
    if isinstance(value[0], int):  # one pre-tokenised prompt, unless more follow it
        return 1 + sum(1 for v in value if not isinstance(v, int))
    return len(value)


class Relay:
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
    ) -> None:
        self.pricer = pricer
        self.client_stall_timeout_s = client_stall_timeout_s
        self.bounds = {
            name: ModelBounds.of(route.model, pricer) for name, route in router.routes.items()
        }
        self.ledger: Ledger | None = None  # set when the gateway starts
        self._clamp_logged_s = -CLAMP_LOG_INTERVAL_S
        self.router = router
        self.producers = producers
        self.store = store
        self.metrics = metrics
        self.max_attempts = max_attempts

    async def handle(self, call: Call) -> Any:
        """Serve a call; returns an ASGI response. Raises a `DispatchError` when it cannot."""
        candidates = self.router.candidates(call.route, self.max_attempts)
        paying = self.ledger is not None and call.key.account_id is not None
        output_tokens = self._output_bound(call)
        try:  # an unknown service tier or tariff is the client's error, found before any work
            worst_nano = self._worst_case(
                call, candidates if paying else candidates[:1], output_tokens
            )
        except PricingError as exc:
            raise InvalidCall(str(exc), param="service_tier") from exc
        if worst_nano > MAX_AMOUNT_NANO:  # more than any one ledger operation can hold
            raise InvalidCall(
                f"this request may cost up to {format_nano(worst_nano)}, more than one request"
                " can be charged; lower max_tokens, n or the number of prompts",
                param=_size_param(call.payload),
            )
        if paying:
            call.hold = await self._hold(call, candidates, worst_nano)
        last: UpstreamError | None = None
        try:
            for deployment in candidates:
                producer = self.producers[deployment.producer]
                body = self._upstream_body(call, deployment)
                try:
                    if call.stream:
                        return await self._open_stream(call, deployment, producer, body)
                    return await self._complete(call, deployment, producer, body)
                except UpstreamError as exc:
                    last = exc
                    self.metrics.upstream_errors.labels(exc.producer, exc.reason).inc()
                    retry_after = _seconds(exc.retry_after)
                    self.router.health.failed(exc.producer, retry_after)
                    if not exc.retryable:
                        break
        except BaseException:
            # Cancelled (the client left) or a bug: release the credit now, not at expiry.
            await self._void(call)
            raise
        assert last is not None, "a route always has at least one deployment"
        error = from_upstream(last)
        self._record(call, None, error.status, Usage(), ttft_s=None, error=last.message)
        await self._void(call)
        raise error

    # -- paying for it ---------------------------------------------------------------------

    def _output_bound(self, call: Call) -> int:
        """The most output tokens this request may make upstreams produce, over all its
        prompts and choices; sets `call.usage_limit_tokens`. An output limit past the model's
        is the client's error (a 400 naming it), never a hold the ledger cannot take."""
        bounds = self.bounds[call.public_model]
        payload = call.payload
        choices = 1
        for name in ("n", "best_of"):  # upstreams bill every candidate they generate
            value = payload.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > choices:
                choices = value
        choices *= _prompt_count(call.endpoint, payload)
        call.usage_limit_tokens = bounds.context_window_tokens * choices
        if call.endpoint == "embeddings":
            return 0
        asked = 0
        # An upstream may honour either field: hold for the larger one.
        for name in ("max_completion_tokens", "max_tokens"):
            value = payload.get(name)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            if value > bounds.max_output_tokens:
                raise InvalidCall(
                    f"'{name}' is {value}, but model '{call.public_model}' produces at most"
                    f" {bounds.max_output_tokens} tokens per choice",
                    param=name,
                )
            asked = max(asked, value)
        return (asked or bounds.max_output_tokens) * choices

    def _worst_case(self, call: Call, candidates: list[Deployment], output_tokens: int) -> int:
        """The most this request can cost on any of these deployments.

        Input is bounded by the body's size in bytes (a token is at least one byte), which
        costs nothing to compute; counting with the tokenizer would cost ~20 µs per KiB on
        the event loop. The excess over the actual price is released at settlement.
        """
        worst = 0
        for d in candidates:
            quote = self.pricer.worst_case(
                call.public_model, d.producer, d.model, call.body_bytes, output_tokens,
                at=call.at, service_tier=call.service_tier, tariff=call.tariff,
            )  # fmt: skip
            worst = max(worst, quote.price_nano)
        return worst

    async def _hold(self, call: Call, candidates: list[Deployment], worst: int) -> HoldView:
        """Reserve the worst-case price before any upstream work: no hold, no call."""
        ledger = self.ledger
        assert ledger is not None and call.key.account_id is not None
        # Attempts run one after another, each up to its producer's timeout: the hold must
        # outlive them all, or a slow failover could be served after its hold expired.
        ttl_s = sum(self.producers[d.producer].spec.timeout_s for d in candidates) + HOLD_MARGIN_S
        # A stream outliving this keeps its hold alive (`extend_hold`); `not <=` also catches NaN.
        call.hold_ttl_s = ttl_s if ttl_s <= MAX_HOLD_TTL_S else MAX_HOLD_TTL_S
        call.hold_at_s = time.monotonic()
        try:
            return await ledger.hold(
                [int(call.key.account_id)],
                worst,
                request_id=call.request_id,
                key_scopes=[call.key.id],
                ttl_s=call.hold_ttl_s,
            )
        except LedgerBusy:
            raise  # the ledger's writer is behind: not a money problem, answered as such
        except Refused as exc:
            self.metrics.refused.labels(str(exc.reason)).inc()
            error = HoldRefused(exc)
            # Refusals are metered too: a runaway agent shows up in usage, not only in logs.
            self._record(call, None, error.status, Usage(), ttft_s=None, error=error.message)
            raise error from exc
        except LedgerError as exc:
            raise HoldUnavailable(f"the ledger cannot take holds now: {exc}") from exc

    async def conclude(
        self,
        call: Call,
        deployment: Deployment,
        status: int,
        usage: Usage,
        quote: Quote | None,
        *,
        ttft_s: float | None,
        error: str | None,
        durable: bool,
    ) -> tuple[bool, int | None]:
        """Charge a served call and record it, the usage row in the settlement's transaction.

        Returns (charged, the payer's balance after it). Not charged: the settlement failed;
        the row says so, the hold is released now, and the caller must not complete the
        answer: no answer goes out without its charge."""
        hold, ledger = call.hold, self.ledger
        if hold is None or ledger is None:
            self._record(call, deployment, status, usage, ttft_s=ttft_s, error=error, quote=quote)
            return True, None
        if quote is None:
            # An unpriceable answer (should not happen: prices are checked at start) is
            # charged its worst case rather than given away.
            quote = Quote(
                0, hold.amount_nano, self.pricer.currency, call.service_tier or "standard"
            )
        try:
            # Applied now, durable later: the usage row attached next joins the same commit
            # (nothing awaits in between, so the writer cannot take one without the other).
            await ledger.settle(
                hold.id,
                price_nano=quote.price_nano,
                cost_nano=min(quote.cost_nano, MAX_AMOUNT_NANO),
                producer=deployment.producer,
                model=call.public_model,
                durable=False,
            )
        except LedgerError as exc:
            await self._unsettled(call, deployment, status, usage, quote, ttft_s, error, exc)
            return False, None
        record = self._record(
            call, deployment, status, usage, ttft_s=ttft_s, error=error, quote=quote
        )
        if durable:
            try:
                await ledger.flush()
            except LedgerError as exc:  # the commit carrying the charge and the row failed
                self.metrics.settlement_failures.inc()
                log.warning("request %s: settlement not durable: %s", call.request_id, exc)
                self.store.submit(
                    replace(
                        record,
                        status=_unsettled_status(status),
                        error=_joined(error, f"settlement failed: {exc}"),
                        price_nano=0,
                    )
                )
                return False, None
        # What the payer can still spend, counting the parents it draws on.
        return True, ledger.available_to(int(hold_payer(call)))

    async def _unsettled(
        self,
        call: Call,
        deployment: Deployment,
        status: int,
        usage: Usage,
        quote: Quote,
        ttft_s: float | None,
        error: str | None,
        exc: LedgerError,
    ) -> None:
        """A settlement the ledger refused: record the request as not charged, release the
        hold now (not at its expiry)."""
        self.metrics.settlement_failures.inc()
        log.warning("request %s: settlement failed: %r", call.request_id, exc)
        self._record(
            call,
            deployment,
            _unsettled_status(status),
            usage,
            ttft_s=ttft_s,
            error=_joined(error, f"settlement failed: {exc}"),
            quote=replace(quote, price_nano=0),  # what the producer bills us, nothing charged
        )
        hold, ledger = call.hold, self.ledger
        if hold is not None and ledger is not None:
            with contextlib.suppress(LedgerError):  # already closed, or the store is down
                await ledger.void(hold.id)

    async def extend_hold(self, call: Call) -> None:
        """Keep a live request's hold from expiring under it."""
        if call.hold is not None and self.ledger is not None:
            with contextlib.suppress(LedgerError):  # closed: nothing left to keep alive
                await self.ledger.extend_hold(call.hold.id, call.hold_ttl_s)

    async def _void(self, call: Call) -> None:
        if call.hold is not None and self.ledger is not None:
            try:
                await self.ledger.void(call.hold.id)
            except HoldClosed:
                pass  # already settled: the answer was served and charged
            except LedgerError:
                self.metrics.settlement_failures.inc()

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
        self, call: Call, deployment: Deployment, producer: OpenAIProducer, body: bytes
    ) -> Any:
        response = await producer.post(PATHS[call.endpoint], body)
        try:
            data = await _read_bounded(response, MAX_RESPONSE_BYTES)
        except TimeoutError as exc:
            raise UpstreamError(producer.name, "timeout", "upstream timed out") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(producer.name, "cut", f"upstream response broken: {exc}") from exc
        finally:
            response.release()
        try:
            parsed = _decode(data)
        except msgspec.DecodeError as exc:
            raise UpstreamError(
                producer.name, "malformed", "upstream returned malformed JSON"
            ) from exc
        if not isinstance(parsed, dict):
            raise UpstreamError(producer.name, "malformed", "upstream returned a non-object")
        self.router.health.ok(producer.name)
        raw_usage = extract.reported_usage(parsed)
        usage, usage_error = self.read_usage(call, deployment, raw_usage)
        if usage is not None and not (usage.input_tokens and usage.output_tokens):
            usage, usage_error = self.check_zero_counts(
                call, deployment, usage, _response_texts(parsed)
            )
        # A body whose usage shows counts that were not charged (implausible ones) shows the
        # charged ones instead; otherwise it goes out as it came, plus its cost.
        shows_other_counts = isinstance(parsed.get("usage"), dict) and (
            usage is None or raw_usage is not parsed["usage"]
        )
        if usage is None:
            usage = self._estimate(call, _response_texts(parsed))
        quote = self.price(call, deployment, usage, parsed.get("service_tier"))
        charged, balance_nano = await self.conclude(
            call, deployment, response.status, usage, quote,
            ttft_s=None, error=usage_error, durable=True,
        )  # fmt: skip
        if not charged:
            raise SettlementFailed()
        if shows_other_counts:  # a re-encode, on this rare path only
            parsed["usage"] = _usage_object(call.endpoint, usage, quote)
            if "model" in parsed:
                parsed["model"] = call.public_model
            body = _encode(parsed)
        else:
            body = _rewrite_model(data, call.public_model)
            if quote is not None:
                body = _with_cost(body, quote.price_nano)
        headers = {"x-request-id": call.request_id}
        if balance_nano is not None:
            headers["x-tokenworks-balance"] = format_nano(balance_nano)
        if quote is not None:
            headers["x-tokenworks-cost"] = format_nano(quote.cost_nano)
            headers["x-tokenworks-price"] = format_nano(quote.price_nano)
        return Response(
            body, status_code=response.status, media_type="application/json", headers=headers
        )

    # -- streams -------------------------------------------------------------------------------

    async def _open_stream(
        self, call: Call, deployment: Deployment, producer: OpenAIProducer, body: bytes
    ) -> Any:
        response = await producer.post(PATHS[call.endpoint], body)
        events = _SSEReader(response)
        try:
            first = await events.next()
        except TimeoutError as exc:
            response.close()
            raise UpstreamError(producer.name, "timeout", "upstream timed out") from exc
        except (aiohttp.ClientError, _SSEError) as exc:
            response.close()
            raise UpstreamError(producer.name, "cut", f"upstream stream broken: {exc}") from exc
        if first is None:
            response.close()
            raise UpstreamError(producer.name, "cut", "upstream closed the stream at once")
        if _is_error_event(first):
            # Some upstreams answer 200 and put the error in the first event: nothing has
            # reached the client yet, so this is a failure like any other before the first byte.
            response.close()
            raise UpstreamError(producer.name, "stream_error", "upstream streamed an error")
        self.router.health.ok(producer.name)
        return _StreamResponse(self, call, deployment, response, events, first)

    def price(
        self, call: Call, deployment: Deployment, usage: Usage, reported_tier: Any
    ) -> Quote | None:
        """Cost and price of what was used, at the tier the upstream says it served."""
        tiers = [reported_tier] if isinstance(reported_tier, str) else []
        for tier in [*tiers, call.service_tier]:
            try:
                quote = self.pricer.quote(
                    call.public_model, deployment.producer, deployment.model, usage,
                    at=call.at, service_tier=tier, tariff=call.tariff,
                )  # fmt: skip
            except PricingError:
                continue  # e.g. the upstream reported a tier we have no price for
            return self._within_hold(call, deployment, quote)
        self.metrics.upstream_errors.labels(deployment.producer, "unpriced").inc()
        return None

    def read_usage(
        self, call: Call, deployment: Deployment, raw: Any
    ) -> tuple[Usage | None, str | None]:
        """The upstream's usage, or None and why when it is absent or implausible (an
        implausible figure is the upstream's error: counted, and the estimate is charged)."""
        try:
            return extract.usage_from_openai(raw, call.usage_limit_tokens), None
        except extract.ImplausibleUsage as exc:
            self.metrics.upstream_errors.labels(deployment.producer, "implausible_usage").inc()
            return None, f"{exc}; charged the offline estimate"

    def check_zero_counts(
        self, call: Call, deployment: Deployment, usage: Usage, texts: list[str]
    ) -> tuple[Usage | None, str | None]:
        """`usage`, or None and why when a zero in it cannot be right (no input tokens for a
        prompt, no output tokens for text): implausible, like any other impossible count."""
        why = extract.zero_count_problem(usage, call.endpoint, call.payload, texts)
        if why is None:
            return usage, None
        self.metrics.upstream_errors.labels(deployment.producer, "implausible_usage").inc()
        return None, f"{why}; charged the offline estimate"

    def _within_hold(self, call: Call, deployment: Deployment, quote: Quote) -> Quote:
        """A paying request is charged at most its hold, and every figure it shows (usage
        cost, price header, usage row) is what it was charged.

        A price above the hold is revenue lost, and a sign that worst cases miss something
        (images or audio the byte bound does not see) or that an upstream over-reports: the
        metrics count each such request and the shortfall, worth an alert."""
        hold = call.hold
        if hold is None or quote.price_nano <= hold.amount_nano:
            return quote
        shortfall_nano = quote.price_nano - hold.amount_nano
        self.metrics.clamped.labels(call.public_model).inc(shortfall_nano)
        self.metrics.clamped_requests.labels(call.public_model).inc()
        now_s = time.monotonic()
        if now_s - self._clamp_logged_s >= CLAMP_LOG_INTERVAL_S:
            self._clamp_logged_s = now_s
            log.warning(
                "request %s: price %d nano above its hold %d on %s (%s); charged the hold "
                "(tokenworks_clamped_requests counts every one)",
                call.request_id, quote.price_nano, hold.amount_nano, call.public_model,
                deployment.producer,
            )  # fmt: skip
        return replace(quote, price_nano=hold.amount_nano)

    def _estimate(self, call: Call, output_texts: list[str]) -> Usage:
        encoding = call.route.encoding
        return Usage(
            input_tokens=extract.estimate_input(call.endpoint, call.payload, encoding),
            output_tokens=extract.estimate_output(output_texts, encoding),
            estimated=True,
        )

    def _record(
        self,
        call: Call,
        deployment: Deployment | None,
        status: int,
        usage: Usage,
        *,
        ttft_s: float | None,
        error: str | None = None,
        quote: Quote | None = None,
    ) -> UsageRecord:
        latency_s = time.perf_counter() - call.started_s
        record = UsageRecord(
            request_id=call.request_id,
            ts_ms=call.ts_ms,
            key_id=call.key.id,
            account_id=call.key.account_id,
            public_model=call.public_model,
            producer=deployment.producer if deployment else None,
            upstream_model=deployment.model if deployment else None,
            endpoint=call.endpoint,
            status=status,
            usage=usage,
            latency_ms=round(latency_s * 1000, 3),
            ttft_ms=round(ttft_s * 1000, 3) if ttft_s is not None else None,
            streamed=call.stream,
            error=error,
            cost_nano=quote.cost_nano if quote else 0,
            price_nano=quote.price_nano if quote else 0,
            service_tier=quote.service_tier if quote else call.service_tier,
            tags=call.tags,
        )
        # With the ledger open, the row rides in the ledger's next transaction: a settled
        # request's usage is durable exactly when its charge is.
        ledger = self.ledger
        if ledger is None or not ledger.attach("usage", USAGE_SCHEMA, usage_row(record)):
            self.store.submit(record)
        self.metrics.request_done(
            call.endpoint,
            call.public_model,
            record.producer or "none",
            status,
            latency_s,
            ttft_s,
            usage.input_tokens,
            usage.output_tokens,
        )
        return record


class _SSEError(Exception):
    pass


class _SSEReader:
    """Splits an upstream byte stream into SSE events (`...\\n\\n`), bounded in size."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
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
                    raise _SSEError("stream ended inside an event")
                return None
            if len(self._buffer) > MAX_SSE_EVENT_BYTES:
                raise _SSEError("event too large")
            chunk = await self._response.content.readany()
            if not chunk:
                self._eof = True
                continue
            if b"\r" in chunk:
                chunk = chunk.replace(b"\r\n", b"\n")
            self._buffer += chunk


def _is_error_event(event: bytes) -> bool:
    data = _event_data(event)
    if data is None or b'"error"' not in data:
        return False
    try:
        chunk = _decode(data)
    except msgspec.DecodeError:
        return False  # a malformed first chunk is the stream's problem, handled in _process
    return isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk


def _event_data(event: bytes) -> bytes | None:
    """The payload of an event's `data:` line(s); None for comments and other fields."""
    if event.startswith(b"data:") and b"\ndata:" not in event:
        return event[5:].lstrip(b" ")
    parts = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


class _StreamResponse:
    """The ASGI response of a stream: pumps upstream events to the client until one ends."""

    def __init__(
        self,
        relay: Relay,
        call: Call,
        deployment: Deployment,
        upstream: aiohttp.ClientResponse,
        events: _SSEReader,
        first: bytes,
    ) -> None:
        self.relay = relay
        self.call = call
        self.deployment = deployment
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
        self.model_field = b'"model":' + _encode(call.public_model)
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
        self._tick_s = min(relay.client_stall_timeout_s, call.hold_ttl_s / 2) / 4

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-request-id", self.call.request_id.encode()),
        ]
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
                        f"client stopped reading for {self.relay.client_stall_timeout_s:g} s;"
                        " stream cut"
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
                    raise exc  # type: ignore[misc]  # not None: tested above
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
        if since_s is not None and now_s - since_s >= self.relay.client_stall_timeout_s:
            self.stalled = True
            assert self._pump_task is not None
            self._pump_task.cancel()
            return
        if now_s >= self._extend_at_s:
            self._extend_at_s = now_s + self.call.hold_ttl_s / 2
            self._extension = asyncio.ensure_future(self.relay.extend_hold(self.call))
        self._tick_handle = asyncio.get_running_loop().call_later(self._tick_s, self._tick)

    async def _write(self, send: Send, body: bytes, more_body: bool) -> None:
        self.writing_since_s = time.monotonic()
        await send({"type": "http.response.body", "body": body, "more_body": more_body})
        self.writing_since_s = None

    async def _pump(self, send: Send) -> None:
        event: bytes | None = self.first
        while True:
            # Everything the upstream already delivered goes out in one write: one socket
            # send per event would cost more than all our per-event work together.
            chunks: list[bytes] = []
            while event is not None:
                out = self._process(event)
                if out is not None:
                    chunks.append(out)
                if self.error is not None or self.done:
                    break
                event = self.events.buffered()
            if chunks:
                if self.ttft_s is None:
                    self.ttft_s = time.perf_counter() - self.call.started_s
                await self._write(send, b"".join(chunks), True)
            if self.error is not None or self.done:
                break
            try:
                event = await self.events.next()
            except TimeoutError:
                self._fail(504, "upstream timed out mid-stream", "upstream_timeout")
                break
            except (aiohttp.ClientError, _SSEError) as exc:
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
        await self._write(send, tail, False)

    def _usage_tail(self) -> bytes:
        """The usage chunk a client that asked for one gets before the end: the upstream's
        with its cost, or, when the charge is not the upstream's own usage chunk (none came,
        it was implausible, or it came elsewhere), one of ours with what was charged."""
        if not self.call.client_wants_usage:
            return b""
        quote = self.quote
        if self.usage is not None and self.usage_event:
            return (
                self.usage_event
                if quote is None
                else _with_cost(self.usage_event, quote.price_nano)
            )
        endpoint = self.call.endpoint
        head = _chunk_head(self.first)
        rid, created = head.get("id"), head.get("created")
        chunk: dict[str, Any] = {
            "id": rid if isinstance(rid, str) else self.call.request_id,
            "object": "chat.completion.chunk" if endpoint == "chat" else "text_completion",
            "created": created if type(created) is int else int(time.time()),
            "model": self.call.public_model,
            "choices": [],
            "usage": _usage_object(endpoint, self.billed or Usage(), quote),
        }
        return b"data: " + _encode(chunk) + b"\n\n"

    def _fail(self, status: int, message: str, code: str) -> None:
        self.status = status
        self.error = message
        self.relay.metrics.upstream_errors.labels(self.deployment.producer, code).inc()
        self.pending_error = b"data: " + error_body(status, message, code) + b"\n\n"

    def _process(self, event: bytes) -> bytes | None:
        """Inspect one upstream event; return the bytes to send the client, or None to hide it."""
        data = _event_data(event)
        if data is None:
            return event + b"\n\n"
        if data == b"[DONE]":
            self.done = True
            self.done_event = event + b"\n\n"  # sent after settlement, as the last byte
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
            return event + b"\n\n"
        reported = chunk.get("usage")
        if reported is None and "x_groq" in chunk:  # per chunk: one probe, no call
            reported = extract.reported_usage(chunk)
        usage = None
        if reported is not None:
            usage, self.usage_error = self.relay.read_usage(self.call, self.deployment, reported)
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
            self.usage_event = _MODEL_FIELD.sub(self.model_field, event, count=1) + b"\n\n"
            return earlier or None
        if not self.call.client_wants_usage:
            event = _USAGE_NULL.sub(b"", event)
        return _MODEL_FIELD.sub(self.model_field, event, count=1) + b"\n\n"

    async def _finish(self) -> bool:
        """Settle and record once, whichever way the stream ended; False if not charged."""
        if self.finished:
            return self.charged
        self.finished = True
        usage = self.usage
        if usage is not None and not (usage.input_tokens and usage.output_tokens):
            usage, why = self.relay.check_zero_counts(self.call, self.deployment, usage, self.texts)
            if why is not None:
                self.usage, self.usage_error = None, why
        if usage is None:
            usage = self.relay._estimate(self.call, self.texts)
        self.billed = usage
        self.quote = quote = self.relay.price(self.call, self.deployment, usage, self.reported_tier)
        self.charged, _ = await self.relay.conclude(
            self.call,
            self.deployment,
            self.status,
            usage,
            quote,
            ttft_s=self.ttft_s,
            error=_joined(self.error, self.usage_error) if self.usage_error else self.error,
            durable=self.status != HTTP_CLIENT_CLOSED,
        )
        if not self.charged and self.pending_error is None:
            self.pending_error = (
                b"data: " + error_body(502, SETTLEMENT_FAILED_MESSAGE, SETTLEMENT_FAILED) + b"\n\n"
            )
        return self.charged


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


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


def _rewrite_model(data: bytes, public_model: str) -> bytes:
    return _MODEL_FIELD.sub(b'"model":' + _encode(public_model), data, count=1)


def _unsettled_status(status: int) -> int:
    """The status recorded for an answer that could not be charged: the client was not given
    it (a 502), unless it had already gone away."""
    return status if status == HTTP_CLIENT_CLOSED else 502


def _joined(first: str | None, second: str) -> str:
    return f"{first}; {second}" if first else second


def _size_param(payload: dict[str, Any]) -> str:
    """The parameter to name when a request's worst case is too large to hold."""
    for name in ("n", "best_of"):
        value = payload.get(name)
        if isinstance(value, int) and value > 1:
            return name
    for name in ("max_tokens", "max_completion_tokens"):
        if name in payload:
            return name
    return "prompt" if "prompt" in payload else "max_tokens"


def hold_payer(call: Call) -> str:
    assert call.key.account_id is not None
    return call.key.account_id


def _with_cost(data: bytes, price_nano: int) -> bytes:
    """Add `"cost": "<decimal>"` to the first `usage` object, as OpenRouter does."""
    match = _USAGE_OPEN.search(data)
    if match is None:
        return data
    field = b'"cost":"' + format_nano(price_nano).encode() + b'"'
    insert_at = match.start(1)
    separator = b"" if match.group(1) else b","
    return data[:insert_at] + field + separator + data[insert_at:]


def _usage_object(endpoint: str, usage: Usage, quote: Quote | None) -> dict[str, Any]:
    """`usage` in OpenAI's shape, with the price charged as `cost` (a decimal string)."""
    out: dict[str, Any] = {"prompt_tokens": usage.input_tokens}
    if endpoint != "embeddings":
        out["completion_tokens"] = usage.output_tokens
    out["total_tokens"] = usage.input_tokens + usage.output_tokens
    if usage.cached_input_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_input_tokens}
    if usage.reasoning_tokens:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    if quote is not None:
        out["cost"] = format_nano(quote.price_nano)
    return out


def _chunk_head(event: bytes) -> dict[str, Any]:
    """The first chunk of a stream, decoded (for the id and creation time it carries)."""
    try:
        chunk = _decode(_event_data(event) or b"null")
    except msgspec.DecodeError:
        return {}
    return chunk if isinstance(chunk, dict) else {}


def _response_texts(parsed: dict[str, Any]) -> list[str]:
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


def _seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
