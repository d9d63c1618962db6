"""How fast each deployment answers, learned from traffic (for `routing: fastest`).

Per deployment (producer, upstream model): an exponentially weighted moving average of its
time to first token (streams only: a plain answer's first token comes with its last) and of
its output rate in tokens per second (streams: after the first token; plain answers: over
the whole answer, prefill included, so a lower bound). Every served attempt reports once
(`observe`) while `learning` is on: from the start when a model routes `fastest`, else from
the first request that sorts by throughput or latency. Until then a gateway that only routes
`ordered` pays nothing for it (observing costs about 1 µs a request).

Unknown is not slow: a deployment without samples, or whose last sample is older than
`STALE_AFTER_S`, is *due* a probe, and the router puts it first for one request at most every
`PROBE_INTERVAL_S`: new deployments are explored, and one that was slow once is looked at
again now and then rather than starved for good. A probe costs one request, not a burst:
concurrent requests see the probe handed out and rank the deployment by what is known.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# A new sample weighs this much against the history: ~10 samples make the figure.
EWMA_ALPHA = 0.2
STALE_AFTER_S = 60.0
PROBE_INTERVAL_S = 5.0
# A generation shorter than this is measured as this long: a whole answer in one read
# would otherwise show an absurd rate.
MIN_GENERATION_S = 0.001


class Speed:
    """One deployment's learned figures; updated in place (no allocation per request)."""

    __slots__ = ("last_sample_s", "probed_s", "samples", "tokens_per_s", "ttft_s")

    def __init__(self) -> None:
        self.ttft_s: float | None = None
        self.tokens_per_s: float | None = None
        self.samples = 0
        self.last_sample_s = 0.0
        self.probed_s = -PROBE_INTERVAL_S * 2  # never probed

    def due(self, now_s: float) -> bool:
        """Whether a request should explore this deployment now (and no probe is out)."""
        stale = self.samples == 0 or now_s - self.last_sample_s > STALE_AFTER_S
        return stale and now_s - self.probed_s >= PROBE_INTERVAL_S


class Speeds:
    """Learned speeds of every configured deployment, on an injectable monotonic clock."""

    def __init__(
        self,
        deployments: Iterable[tuple[str, str]] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.learning = False  # set by the router when something ranks by speed
        # producer -> upstream model -> Speed: two probes, no key tuple built per request.
        self._by_producer: dict[str, dict[str, Speed]] = {}
        for producer, model in deployments:
            self._by_producer.setdefault(producer, {}).setdefault(model, Speed())

    def get(self, producer: str, model: str) -> Speed | None:
        models = self._by_producer.get(producer)
        return None if models is None else models.get(model)

    def observe(
        self,
        producer: str,
        model: str,
        ttft_s: float | None,
        output_tokens: int,
        generation_s: float,
    ) -> None:
        """One finished attempt: its upstream time to first token (None for a plain answer)
        and `output_tokens` produced in `generation_s` (after the first token for a stream,
        the whole answer otherwise). Deployments not in the config are ignored (bounded)."""
        models = self._by_producer.get(producer)  # inline `get`: once per request
        speed = None if models is None else models.get(model)
        if speed is None:
            return
        learned = False
        if ttft_s is not None and ttft_s >= 0:
            old = speed.ttft_s
            speed.ttft_s = ttft_s if old is None else old + EWMA_ALPHA * (ttft_s - old)
            learned = True
        if output_tokens > 0:
            rate = output_tokens / max(generation_s, MIN_GENERATION_S)
            old = speed.tokens_per_s
            speed.tokens_per_s = rate if old is None else old + EWMA_ALPHA * (rate - old)
            learned = True
        if learned:
            speed.samples += 1
            speed.last_sample_s = self.clock()

    def items(self) -> Iterator[tuple[str, str, Speed]]:
        for producer, models in self._by_producer.items():
            for model, speed in models.items():
                yield producer, model, speed

    def snapshot(self) -> list[dict[str, Any]]:
        """Plain dicts for the admin view (`GET /admin/v1/dispatch`) and /metrics."""
        now_s = self.clock()
        return [
            {
                "producer": producer,
                "model": model,
                "samples": speed.samples,
                "ttft_s": speed.ttft_s,
                "output_tokens_per_s": speed.tokens_per_s,
                "age_s": None if not speed.samples else round(now_s - speed.last_sample_s, 3),
            }
            for producer, model, speed in sorted(self.items(), key=lambda i: (i[0], i[1]))
        ]


class SpeedsCollector:
    """Learned speeds as Prometheus gauges, read at scrape time (nothing per request)."""

    def __init__(self, speeds: Speeds) -> None:
        self.speeds = speeds

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        ttft = GaugeMetricFamily(
            "tokenworks_deployment_ttft_seconds",
            "Learned time to first token per deployment (EWMA over streams).",
            labels=["producer", "model"],
        )
        rate = GaugeMetricFamily(
            "tokenworks_deployment_output_tokens_per_second",
            "Learned output rate per deployment (EWMA).",
            labels=["producer", "model"],
        )
        for producer, model, speed in self.speeds.items():
            if speed.ttft_s is not None:
                ttft.add_metric([producer, model], speed.ttft_s)
            if speed.tokens_per_s is not None:
                rate.add_metric([producer, model], speed.tokens_per_s)
        yield ttft
        yield rate
