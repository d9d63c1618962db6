"""What a call used, and where its usage row goes.

The upstream's usage is believed when plausible (`metering.extract` says what is; an
implausible figure is counted as the upstream's error and the offline estimate is charged
instead). Every call ends in one usage row, whatever happened: with the ledger open, the row
rides in the ledger's next transaction, so a settled request's usage is durable exactly when
its charge is; otherwise it goes to the usage store.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from tokenworks.config import Deployment
from tokenworks.dispatch.ratelimit import CLOCK
from tokenworks.dispatch.speeds import Speeds
from tokenworks.ledger import Ledger
from tokenworks.metering import extract
from tokenworks.metering.store import USAGE_SCHEMA, UsageStore, usage_row
from tokenworks.metering.usage import Usage, UsageRecord
from tokenworks.metrics import Metrics
from tokenworks.pricing.quote import Quote

if TYPE_CHECKING:
    from tokenworks.dispatch.relay import Call


def release(call: Call, usage: Usage) -> None:
    """The call ended (served, failed or cut): its rate limits get its actual tokens and
    their concurrency back. Safe to call more than once; only the first counts."""
    permit = call.permit
    if permit is not None:
        permit.settle(usage.input_tokens + usage.output_tokens, CLOCK())


class Recorder:
    def __init__(self, store: UsageStore, metrics: Metrics, speeds: Speeds | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.speeds = speeds
        self.ledger: Ledger | None = None  # set when the gateway starts

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

    def estimate(self, call: Call, output_texts: list[str]) -> Usage:
        encoding = call.route.encoding
        return Usage(
            input_tokens=extract.estimate_input(call.endpoint, call.payload, encoding),
            output_tokens=extract.estimate_output(output_texts, encoding),
            estimated=True,
        )

    def record(
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
        call.recorded = True
        if call.permit is not None:  # every call ends in one record: its limits settle here
            release(call, usage)
        now_s = time.perf_counter()
        latency_s = now_s - call.started_s
        speeds = self.speeds
        if speeds is not None and speeds.learning and deployment is not None and status < 400:
            # The served attempt's speed, timed from when it was sent (`call.sent_s`), not
            # from the request's arrival: earlier attempts and the hold are not its time.
            if ttft_s is None:  # a plain answer: its rate over the whole answer
                speeds.observe(
                    deployment.producer, deployment.model, None, usage.output_tokens,
                    now_s - call.sent_s,
                )  # fmt: skip
            else:
                first_s = call.started_s + ttft_s
                speeds.observe(
                    deployment.producer, deployment.model, first_s - call.sent_s,
                    usage.output_tokens, now_s - first_s,
                )  # fmt: skip
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
            clamped_nano=call.clamped_nano,
            queue_ms=call.queue_ms,
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
