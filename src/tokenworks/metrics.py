"""Prometheus metrics: requests, tokens, latency and upstream errors, by model and producer.

A private registry per app keeps several apps in one process (tests, the demo) from
colliding on metric names.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tokenworks_requests",
            "Requests served, by endpoint, public model and HTTP status.",
            ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "tokenworks_tokens",
            "Tokens metered, by public model, producer and direction (input/output).",
            ["model", "producer", "direction"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tokenworks_request_latency_seconds",
            "Time from request arrival to the last byte sent.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "tokenworks_time_to_first_token_seconds",
            "Time from request arrival to the first streamed byte.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "tokenworks_upstream_errors",
            "Failed upstream attempts, by producer and reason.",
            ["producer", "reason"],
            registry=self.registry,
        )
        self.usage_dropped = Counter(
            "tokenworks_usage_records_dropped",
            "Usage records lost because the writer queue was full.",
            registry=self.registry,
        )

        self.refused = Counter(
            "tokenworks_requests_refused",
            "Requests refused before dispatch for lack of credit or budget, by limit kind.",
            ["limit"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "tokenworks_requests_rate_limited",
            "Requests refused (429) by a key's or account's rate limit, by limit: requests, "
            "tokens or concurrency.",
            ["limit"],
            registry=self.registry,
        )
        self.clamped = Counter(
            "tokenworks_clamped_price_nano",
            "Price above a request's hold, not charged: the hold's worst case fell short (an "
            "input the byte bound does not see, or an upstream reporting more than was asked). "
            "Nano-units, by public model and key.",
            ["model", "key"],
            registry=self.registry,
        )
        self.clamped_requests = Counter(
            "tokenworks_clamped_requests",
            "Requests whose price exceeded their hold (see tokenworks_clamped_price_nano), by "
            "public model and key.",
            ["model", "key"],
            registry=self.registry,
        )
        self.settlement_failures = Counter(
            "tokenworks_settlement_failures",
            "Holds the ledger could not settle or void (they expire instead).",
            registry=self.registry,
        )

        # Labelled children by label values: `labels()` costs more than the increment itself.
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request_done(
        self,
        endpoint: str,
        model: str,
        producer: str,
        status: int,
        latency_s: float,
        ttft_s: float | None,
        input_tokens: int,
        output_tokens: int,
    ) -> None:
        """Everything one finished request adds to the metrics."""
        self._child(self.requests, endpoint, model, str(status)).inc()
        self._child(self.latency, endpoint).observe(latency_s)
        if ttft_s is not None:
            self._child(self.ttft, model).observe(ttft_s)
        if input_tokens:
            self._child(self.tokens, model, producer, "input").inc(input_tokens)
        if output_tokens:
            self._child(self.tokens, model, producer, "output").inc(output_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
