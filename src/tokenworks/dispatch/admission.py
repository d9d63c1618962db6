"""Consumer rate limits on the hot path: admit a call against its key's and account's limits
(`ratelimit.RateLimiter`), or refuse it with OpenAI's 429; settle its permit when it ends.

The limiter's state is this gateway process's own: with several processes behind a load
balancer each enforces every limit by itself (a limit of 60 rpm on two processes lets up to
120 through). The limits themselves come from the key store (`ApiKey.rate_scopes`), so a
change an admin makes is picked up by the next request (`set_limits` only compares).

A request reserves its upper bound of tokens at admission: the body's size in bytes (a token
is at least one byte) plus the most output it may make (`billing.output_bound`, as the hold
does). So no window ever holds more than `tpm` tokens, whatever the interleaving; the unused
part is handed back when the answer ends (`settle` with the actual usage).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tokenworks.dispatch.billing import ModelBounds, output_bound
from tokenworks.dispatch.errors import MAX_RETRY_AFTER_S, RateLimited
from tokenworks.dispatch.ratelimit import CLOCK, RateLimiter, Refusal
from tokenworks.dispatch.recording import Recorder
from tokenworks.metering.usage import Usage
from tokenworks.metrics import Metrics

if TYPE_CHECKING:
    from tokenworks.dispatch.relay import Call

_WHAT = {
    "requests": "requests per minute (rpm)",
    "tokens": "tokens per minute (tpm)",
    "concurrency": "concurrent requests (max_concurrency)",
}


class Admission:
    def __init__(self, recorder: Recorder, metrics: Metrics, bounds: dict[str, ModelBounds]):
        self.limiter = RateLimiter()
        self.recorder = recorder
        self.metrics = metrics
        self.bounds = bounds

    def admit(self, call: Call) -> None:
        """Take the call from every limit it draws on, or record and raise a 429.
        Called only for a key with limited scopes (`call.key.rate_scopes`)."""
        limiter = self.limiter
        names = []
        for name, limits in call.key.rate_scopes:
            limiter.set_limits(name, limits)
            names.append(name)
        tokens = call.body_bytes + output_bound(call, self.bounds[call.public_model])
        now = CLOCK()
        got = limiter.acquire(names, tokens, now)
        headers = limiter.headers(names, now)
        if isinstance(got, Refusal):
            # Only a request ending frees concurrency (1 s, the header's least); one larger
            # than the limit never fits (60 s, its most: waiting will not help).
            wait_s = got.retry_after_s
            if wait_s is None:
                wait_s = MAX_RETRY_AFTER_S if got.never_fits else 1.0
            error = RateLimited(_message(got, limiter, tokens), wait_s, headers)
            self.metrics.rate_limited.labels(got.limit).inc()
            self.recorder.record(
                call, None, error.status, Usage(), ttft_s=None, error=error.message
            )
            raise error
        call.permit = got
        call.rate_headers = headers


def _message(refusal: Refusal, limiter: RateLimiter, tokens: int) -> str:
    kind, _, ident = refusal.scope.partition(":")
    limits = limiter.limits(refusal.scope)
    value = None
    if limits is not None:
        value = {"requests": limits.rpm, "tokens": limits.tpm}.get(
            refusal.limit, limits.max_concurrency
        )
    where = f"{kind} {ident}"
    if refusal.never_fits:
        return (
            f"this request may use up to {tokens} tokens (its size in bytes plus its max_tokens),"
            f" more than the {_WHAT['tokens']} limit of {value} of {where}; lower max_tokens or "
            "send less"
        )
    then = (
        "when one of its requests in flight ends"
        if refusal.retry_after_s is None
        else f"in {math.ceil(refusal.retry_after_s * 1000) / 1000:g}s"
    )
    return f"rate limit reached for {where}: {_WHAT[refusal.limit]} limit {value}; try again {then}"
