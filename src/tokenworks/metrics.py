"""Prometheus metrics: requests, tokens, latency and upstream errors, by model and producer.

A private registry per app keeps several apps in one process (tests, the demo) from
colliding on metric names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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

        self.queue_wait = Histogram(
            "tokenworks_queue_wait_seconds",
            "Time requests that had to wait spent queued for a producer, by producer and "
            "service tier (requests that started at once are not observed here; "
            "tokenworks_dispatch_started counts every start).",
            ["producer", "tier"],
            buckets=LATENCY_BUCKETS_S,
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

    def queue_waited(self, producer: str, tier: str, wait_s: float) -> None:
        self._child(self.queue_wait, producer, tier).observe(wait_s)

    def watch_dispatch(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Export the scheduler's state (`Dispatcher.snapshot()`), read at each scrape: the
        hot path pays nothing for these."""
        self.registry.register(_DispatchCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


BREAKER_STATES = ("closed", "half_open", "open")


class _DispatchCollector(Collector):
    """The scheduler's queues, limits, breakers and fair-share counters, as metrics."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        state = self.snapshot()
        depth = GaugeMetricFamily(
            "tokenworks_queue_depth",
            "Requests waiting for a producer, by producer and service tier.",
            labels=["producer", "tier"],
        )
        started = CounterMetricFamily(
            "tokenworks_dispatch_started",
            "Requests started on a producer (at once or after waiting), by producer and tier.",
            labels=["producer", "tier"],
        )
        wait_sum = CounterMetricFamily(
            "tokenworks_queue_wait_seconds_all",
            "Total time started requests waited, by producer and tier (the ones that started "
            "at once add 0).",
            labels=["producer", "tier"],
        )
        sheds = CounterMetricFamily(
            "tokenworks_dispatch_sheds",
            "Requests refused by the scheduler (429), by producer, tier and reason "
            "(deadline, expired, queue_full, tenant_queue_full, too_large).",
            labels=["producer", "tier", "reason"],
        )
        cancelled = CounterMetricFamily(
            "tokenworks_queue_cancelled",
            "Requests that left the queue because their client hung up.",
            labels=["producer", "tier"],
        )
        inflight = GaugeMetricFamily(
            "tokenworks_producer_inflight", "Requests in flight per producer.", labels=["producer"]
        )
        limit = GaugeMetricFamily(
            "tokenworks_producer_concurrency_limit",
            "The producer's concurrency limit now: configured max_concurrency, cut and grown "
            "by AIMD on its answers (learned when not configured).",
            labels=["producer"],
        )
        paused = GaugeMetricFamily(
            "tokenworks_producer_paused_seconds",
            "Seconds left of the producer's Retry-After pause.",
            labels=["producer"],
        )
        served = CounterMetricFamily(
            "tokenworks_served_weighted_tokens",
            "Weighted tokens (input plus output weighted by its price ratio) served per "
            "tenant (account) and producer: the fair scheduler's counters.",
            labels=["producer", "tenant"],
        )
        breaker = GaugeMetricFamily(
            "tokenworks_breaker_state",
            "Circuit breaker state per deployment (producer/model): 1 for the current state.",
            labels=["deployment", "state"],
        )
        opens = CounterMetricFamily(
            "tokenworks_breaker_opens",
            "Times a deployment's circuit breaker opened.",
            labels=["deployment"],
        )
        for producer, pool in state["pools"].items():
            for tier, t in pool["tiers"].items():
                depth.add_metric([producer, tier], t["queued"])
                started.add_metric([producer, tier], t["started"])
                wait_sum.add_metric([producer, tier], t["wait_s_sum"])
                cancelled.add_metric([producer, tier], t["cancelled"])
                for reason, count in t["sheds"].items():
                    sheds.add_metric([producer, tier, reason], count)
            capacity = pool["capacity"]
            inflight.add_metric([producer], capacity["inflight"])
            limit.add_metric([producer], capacity["concurrency_limit"])
            paused.add_metric([producer], capacity["paused_for_s"])
            for tenant, amount in pool["served_weighted_tokens"].items():
                served.add_metric([producer, tenant], amount)
        for name, b in state["breakers"].items():
            for s in BREAKER_STATES:
                breaker.add_metric([name, s], 1.0 if b["state"] == s else 0.0)
            opens.add_metric([name], b["opens"])
        yield from (depth, started, wait_sum, sheds, cancelled, inflight, limit, paused)
        yield from (served, breaker, opens)
