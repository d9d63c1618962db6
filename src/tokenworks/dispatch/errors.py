"""What the relay raises when it cannot serve a call; the API layer answers each one.

The relay sits below the HTTP layer, so it raises these rather than responses. Each carries
the status the client is answered (the relay records it in the call's usage row before it
raises) and the code it is answered with; `api/errors.py` turns them into responses.

    DispatchError
    ├── InvalidCall            400 invalid_value      priced or bounded out before any work
    │   └── NoProviderLeft     400 no_provider_left   the `provider` object excluded them all
    ├── RateLimited            429 rate_limit_exceeded a key's or account's rate limit
    ├── HoldRefused            402 insufficient_quota the ledger refused the worst case
    ├── HoldUnavailable        503 ledger_unavailable the ledger cannot take holds now
    ├── SettlementFailed       502 settlement_failed  served, but the charge failed: withheld
    ├── Shed                   429 (its reason)       the scheduler cannot start it in time:
    │                                                 deadline_unmeetable, deadline_expired,
    │                                                 queue_full, tenant_queue_full
    │                                                 (Retry-After, retry-after-ms: estimated)
    ├── TooLargeForProducers   400 exceeds_producer_tpm more tokens than any producer's tpm
    ├── ClientGone             499 client_closed      the client hung up while it was queued
    └── UpstreamFailure                               no upstream served it (`from_upstream`)
        ├── UpstreamRejected   4xx (the upstream's)   its status and JSON body as sent, only
        │                                             the model renamed; a 429 when no
        │                                             deployment is left
        ├── UpstreamCredentials 502 upstream_credentials  the upstream refused the gateway's
        │                                             own key (401/403): never the client's 401
        ├── UpstreamAtCapacity 429 upstream_capacity  a 429 whose body is not JSON
        ├── UpstreamTimedOut   504 upstream_timeout
        ├── UpstreamUnreachable 503 upstream_unavailable
        └── UpstreamBroken     502 upstream_error

Every upstream failure carries the upstream's headers a client may see (`wire.headers`:
`retry-after-ms`, `x-upstream-request-id`, `x-upstream-ratelimit-*`), so an SDK's retry waits
what the upstream asked. Backpressure (`ledger.LedgerBusy`) passes through the relay
untouched: it is the ledger's.
"""

from __future__ import annotations

import math

import msgspec

from tokenworks.ledger import Refusal, Refused
from tokenworks.money import format_nano
from tokenworks.producers.openai_compat import UpstreamError
from tokenworks.wire.headers import as_dict
from tokenworks.wire.openai_errors import faithful_body

SETTLEMENT_FAILED_MESSAGE = (
    "the answer could not be charged, so it is withheld; nothing was charged, try again"
)


class DispatchError(Exception):
    """A call the relay could not serve, with what the client is answered."""

    status: int = 500
    code: str = "internal"
    # A body answered as it is instead of the OpenAI shape built from status and code (an
    # upstream's own error, passed through).
    raw: bytes | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def headers(self) -> dict[str, str]:
        return {}


class InvalidCall(DispatchError):
    """The request cannot be priced or bounded (an output limit past the model's, a service
    tier no deployment prices, a worst case above what one request may hold): the client's
    error, found before any hold or upstream work."""

    status = 400
    code = "invalid_value"


MAX_RETRY_AFTER_S = 60.0


def retry_headers(wait_s: float) -> dict[str, str]:
    """When to retry a refusal of ours: `Retry-After` in whole seconds within 1..60, rounded
    up so a retry then fits (SDKs ignore longer ones), and the exact wait in
    `retry-after-ms`, which OpenAI's and Anthropic's SDKs read first."""
    wait_ms = max(1, math.ceil(wait_s * 1000))
    retry_after_s = min(int(MAX_RETRY_AFTER_S), max(1, math.ceil(wait_ms / 1000)))
    return {"Retry-After": str(retry_after_s), "retry-after-ms": str(wait_ms)}


class RateLimited(DispatchError):
    """A consumer rate limit (rpm, tpm or concurrency of the key, a key above it, or its
    account) refused the call before any hold: OpenAI's 429, with when to retry."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float, ratelimit_headers: dict[str, str]):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.ratelimit_headers = ratelimit_headers

    @property
    def headers(self) -> dict[str, str]:
        return {**self.ratelimit_headers, **retry_headers(self.retry_after_s)}


class NoProviderLeft(InvalidCall):
    """The request's `provider` constraints (`param` names the one that emptied the list)
    leave no deployment to try: nothing was sent anywhere, nothing is charged."""

    code = "no_provider_left"


class HoldRefused(DispatchError):
    """The ledger refused the worst-case hold: a limit, named by `refused.reason`."""

    status = 402
    code = "insufficient_quota"

    def __init__(self, refused: Refused) -> None:
        self.refused = refused
        message = refused.describe(
            f"this request may cost up to {format_nano(refused.needed_nano)}",
            format_nano(max(refused.available_nano, 0)),
        )
        if refused.available_nano > 0 and refused.reason in (Refusal.CREDIT, Refusal.BUDGET):
            # Not spent out: the hold is the worst case (every output token up to max_tokens,
            # or the model's limit), and a smaller one may well fit in what is left.
            message += (
                " (the worst case, at max_tokens output tokens): a lower max_tokens may be "
                "served from what is left"
            )
        super().__init__(message)


class HoldUnavailable(DispatchError):
    """The ledger could not take the hold for a reason other than a limit (closed, store
    down): no hold, no call."""

    status = 503
    code = "ledger_unavailable"


class SettlementFailed(DispatchError):
    status = 502
    code = "settlement_failed"

    def __init__(self) -> None:
        super().__init__(SETTLEMENT_FAILED_MESSAGE)


class Shed(DispatchError):
    """The scheduler will not start the call: it cannot before its deadline, or a queue is
    full. Never charged (its hold is voided) and metered as refused; Retry-After is the
    scheduler's estimate of when a retry would be admitted, as an integer within 1..60 s
    (SDKs ignore longer ones) with the exact figure in retry-after-ms."""

    status = 429

    def __init__(self, message: str, code: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return retry_headers(self.retry_after_s if self.retry_after_s is not None else 1.0)


class TooLargeForProducers(DispatchError):
    """The request's tokens exceed the tokens per minute of every producer that could serve
    it: no wait makes it fit."""

    status = 400
    code = "exceeds_producer_tpm"


class ClientGone(DispatchError):
    """The client hung up while its request waited: it leaves the queue, nothing charged."""

    status = 499
    code = "client_closed"


class UpstreamFailure(DispatchError):
    """No deployment served the call; `upstream` is the last attempt's error."""

    status = 502
    code = "upstream_error"

    def __init__(self, upstream: UpstreamError, message: str) -> None:
        super().__init__(message)
        self.upstream = upstream

    @property
    def headers(self) -> dict[str, str]:
        return as_dict(self.upstream.headers)


class UpstreamRejected(UpstreamFailure):
    """The upstream refused the request itself (a 4xx it will not change its mind about, or a
    429 with no deployment left to try): the client sees the upstream's status, and its body
    as sent (`raw`: code, param, type and any field of its own, like Groq's
    `failed_generation`) when that is a JSON object, else the upstream's message in our shape.
    SDK users branch on `e.code` and `e.param`; a rewritten body would lose them."""

    code = "upstream_rejected"

    def __init__(
        self, upstream: UpstreamError, message: str, status: int, raw: bytes | None = None
    ) -> None:
        super().__init__(upstream, message)
        self.status = status
        self.raw = raw


class UpstreamCredentials(UpstreamFailure):
    """The upstream refused the gateway's own credentials (401/403) on every deployment
    tried. A 401 would make the client's SDK blame the client's key; this is the operator's
    to fix, so it is a 502 naming the producer, and not worth a retry."""

    status = 502
    code = "upstream_credentials"

    @property
    def headers(self) -> dict[str, str]:
        return {**super().headers, "x-should-retry": "false"}


class UpstreamAtCapacity(UpstreamFailure):
    status = 429
    code = "upstream_capacity"

    @property
    def headers(self) -> dict[str, str]:
        headers = super().headers
        retry_after = self.upstream.retry_after
        if retry_after:
            headers["retry-after"] = retry_after
        return headers


class UpstreamTimedOut(UpstreamFailure):
    status = 504
    code = "upstream_timeout"


class UpstreamUnreachable(UpstreamFailure):
    status = 503
    code = "upstream_unavailable"


class UpstreamBroken(UpstreamFailure):
    status = 502
    code = "upstream_error"


def from_upstream(
    exc: UpstreamError, upstream_model: str | None = None, public_model: str | None = None
) -> UpstreamFailure:
    """The producer layer's error, as what the client is told (as httpx's
    `map_httpcore_exceptions` turns its transport's errors into its own). `upstream_model`
    (the last deployment's) is renamed `public_model` in a body passed through."""
    status = exc.status
    if exc.credentials_refused:
        # Its key variable unset is the usual cause on a first run: the message names it.
        unset = f" ({exc.message})" if "is unset" in exc.message else ""
        return UpstreamCredentials(
            exc,
            f"producer '{exc.producer}' refused the gateway's own credentials ({status})"
            f"{unset}: the gateway is misconfigured, not your API key; tell its operator",
        )
    # A 4xx is the last word when it is not retried or no deployment is left to retry on.
    if status is not None and 400 <= status < 500:
        raw = faithful_body(exc.body, upstream_model, public_model)
        if raw is None and status == 429:
            return UpstreamAtCapacity(
                exc, "every upstream for this model is at capacity; try again later"
            )
        return UpstreamRejected(exc, _message(exc), status, raw)
    if exc.reason == "timeout":
        return UpstreamTimedOut(exc, "the upstream timed out")
    if exc.reason == "connect":
        return UpstreamUnreachable(
            exc, f"no upstream for this model is reachable; last: {exc.message}"
        )
    return UpstreamBroken(exc, f"the upstream failed: {exc.message}")


def _message(exc: UpstreamError) -> str:
    """The upstream's own error message, when its body has one."""
    try:
        upstream = msgspec.json.decode(exc.body)
    except msgspec.DecodeError:
        return exc.message
    if isinstance(upstream, dict):
        error = upstream.get("error")
        inner = error if isinstance(error, dict) else upstream
        message = inner.get("message")
        if isinstance(message, str) and message:
            return message
        if isinstance(error, str) and error:
            return error
    return exc.message
