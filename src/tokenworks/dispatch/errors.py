"""What the relay raises when it cannot serve a call; the API layer answers each one.

The relay sits below the HTTP layer, so it raises these rather than responses. Each carries
the status the client is answered (the relay records it in the call's usage row before it
raises) and the code it is answered with; `api/errors.py` turns them into responses.

    DispatchError
    ├── InvalidCall            400 invalid_value      priced or bounded out before any work
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
        ├── UpstreamRejected   4xx upstream_rejected  the upstream's own status and message
        ├── UpstreamAtCapacity 429 upstream_capacity  (Retry-After: the upstream's)
        ├── UpstreamTimedOut   504 upstream_timeout
        ├── UpstreamUnreachable 503 upstream_unavailable
        └── UpstreamBroken     502 upstream_error

Backpressure (`ledger.LedgerBusy`) passes through the relay untouched: it is the ledger's.
"""

from __future__ import annotations

import math

import msgspec

from tokenworks.ledger import Refused
from tokenworks.money import format_nano
from tokenworks.producers.openai_compat import UpstreamError

SETTLEMENT_FAILED_MESSAGE = (
    "the answer could not be charged, so it is withheld; nothing was charged, try again"
)


class DispatchError(Exception):
    """A call the relay could not serve, with what the client is answered."""

    status: int = 500
    code: str = "internal"

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


class HoldRefused(DispatchError):
    """The ledger refused the worst-case hold: a limit, named by `refused.reason`."""

    status = 402
    code = "insufficient_quota"

    def __init__(self, refused: Refused) -> None:
        self.refused = refused
        super().__init__(
            refused.describe(
                f"this request may cost up to {format_nano(refused.needed_nano)}",
                format_nano(max(refused.available_nano, 0)),
            )
        )


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
        wait_s = self.retry_after_s if self.retry_after_s is not None else 1.0
        wait_ms = max(1, math.ceil(wait_s * 1000))
        return {
            "Retry-After": str(min(60, max(1, math.ceil(wait_ms / 1000)))),
            "retry-after-ms": str(wait_ms),
        }


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


class UpstreamRejected(UpstreamFailure):
    """The upstream refused the request itself (a 4xx it will not change its mind about):
    the client sees the upstream's status and message."""

    code = "upstream_rejected"

    def __init__(self, upstream: UpstreamError, message: str, status: int) -> None:
        super().__init__(upstream, message)
        self.status = status


class UpstreamAtCapacity(UpstreamFailure):
    status = 429
    code = "upstream_capacity"

    @property
    def headers(self) -> dict[str, str]:
        retry_after = self.upstream.retry_after
        return {"Retry-After": retry_after} if retry_after else {}


class UpstreamTimedOut(UpstreamFailure):
    status = 504
    code = "upstream_timeout"


class UpstreamUnreachable(UpstreamFailure):
    status = 503
    code = "upstream_unavailable"


class UpstreamBroken(UpstreamFailure):
    status = 502
    code = "upstream_error"


def from_upstream(exc: UpstreamError) -> UpstreamFailure:
    """The producer layer's error, as what the client is told (as httpx's
    `map_httpcore_exceptions` turns its transport's errors into its own)."""
    if exc.status is not None and not exc.retryable and 400 <= exc.status < 500:
        message = exc.message
        try:
            upstream = msgspec.json.decode(exc.body)
            if isinstance(upstream, dict) and isinstance(upstream.get("error"), dict):
                message = str(upstream["error"].get("message") or message)
        except msgspec.DecodeError:
            pass
        return UpstreamRejected(exc, message, exc.status)
    if exc.status == 429:
        return UpstreamAtCapacity(
            exc, "every upstream for this model is at capacity; try again later"
        )
    if exc.reason == "timeout":
        return UpstreamTimedOut(exc, "the upstream timed out")
    if exc.reason == "connect":
        return UpstreamUnreachable(exc, "no upstream for this model is reachable")
    return UpstreamBroken(exc, f"the upstream failed: {exc.message}")
