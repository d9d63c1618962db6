"""Learned speeds: EWMA per deployment, probes for the unknown and the stale."""

from __future__ import annotations

import pytest

from tokenworks.dispatch.speeds import (
    EWMA_ALPHA,
    PROBE_INTERVAL_S,
    STALE_AFTER_S,
    Speeds,
    SpeedsCollector,
)
from tokenworks.metrics import Metrics


class Clock:
    now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_ewma_of_ttft_and_rate() -> None:
    speeds = Speeds([("a", "m")], clock=Clock())
    speeds.observe("a", "m", 1.0, 100, 1.0)
    speeds.observe("a", "m", 2.0, 300, 1.0)
    speed = speeds.get("a", "m")
    assert speed is not None
    assert speed.ttft_s == pytest.approx(1.0 + EWMA_ALPHA * 1.0)
    assert speed.tokens_per_s == pytest.approx(100 + EWMA_ALPHA * 200)
    assert speed.samples == 2
    # A plain answer teaches a rate only; an answer without output teaches no rate.
    speeds.observe("a", "m", None, 0, 1.0)
    assert speed.samples == 2
    speeds.observe("a", "m", None, 50, 0.0)  # one read: measured as MIN_GENERATION_S
    assert speed.tokens_per_s is not None and speed.tokens_per_s > 1000


def test_unconfigured_deployments_are_ignored() -> None:
    speeds = Speeds([("a", "m")])
    speeds.observe("zz", "m", 1.0, 10, 1.0)
    speeds.observe("a", "other", 1.0, 10, 1.0)
    assert [s["producer"] for s in speeds.snapshot()] == ["a"]


def test_due_means_unknown_or_stale_and_no_probe_out() -> None:
    clock = Clock()
    speeds = Speeds([("a", "m")], clock=clock)
    speed = speeds.get("a", "m")
    assert speed is not None and speed.due(clock.now_s)
    speed.probed_s = clock.now_s
    assert not speed.due(clock.now_s + PROBE_INTERVAL_S - 0.1)
    speeds.observe("a", "m", 0.5, 10, 1.0)
    assert not speed.due(clock.now_s + PROBE_INTERVAL_S)  # known and fresh
    assert speed.due(clock.now_s + STALE_AFTER_S + 0.1)


def test_snapshot_and_metrics() -> None:
    clock = Clock()
    speeds = Speeds([("b", "m2"), ("a", "m")], clock=clock)
    speeds.observe("a", "m", 0.25, 40, 2.0)
    clock.now_s += 3
    assert speeds.snapshot() == [
        {
            "producer": "a", "model": "m", "samples": 1, "ttft_s": 0.25,
            "output_tokens_per_s": 20.0, "age_s": 3.0,
        },
        {
            "producer": "b", "model": "m2", "samples": 0, "ttft_s": None,
            "output_tokens_per_s": None, "age_s": None,
        },
    ]  # fmt: skip
    metrics = Metrics()
    metrics.registry.register(SpeedsCollector(speeds))
    text = metrics.render().decode()
    assert 'tokenworks_deployment_ttft_seconds{model="m",producer="a"} 0.25' in text
    assert 'tokenworks_deployment_output_tokens_per_second{model="m",producer="a"} 20.0' in text
    assert 'producer="b"' not in text  # nothing learned: no figure


def test_the_recorder_times_the_served_attempt_not_the_request() -> None:
    """A failed first attempt and the hold are not the serving upstream's time: TTFT is
    measured from when the served attempt was sent, the rate from its first token."""
    import time

    from tests.dispatch.test_router import call, config, router
    from tokenworks.dispatch.recording import Recorder
    from tokenworks.metering.usage import Usage

    class Store:
        def submit(self, record: object) -> None:
            pass

    r = router(config())
    recorder = Recorder(Store(), Metrics(), r.speeds)  # type: ignore[arg-type]
    c = call(r)
    # An ordered gateway pays nothing for speeds until something ranks by them.
    assert not r.speeds.learning
    recorder.record(c, c.route.deployments[1], 200, Usage(output_tokens=9), ttft_s=1.0)
    assert r.speeds.get("b", "up-b").samples == 0  # type: ignore[union-attr]
    r.candidates(c.route, 3, call(r, provider={"sort": "latency"}))
    assert r.speeds.learning
    now_s = time.perf_counter()
    c.started_s = now_s - 10.0  # arrived 10 s ago; the served attempt went out 4 s later
    c.sent_s = now_s - 6.0
    deployment = c.route.deployments[1]
    # First token 7 s after arrival (3 s after sending), 300 tokens since then (~3 s).
    recorder.record(c, deployment, 200, Usage(input_tokens=5, output_tokens=300), ttft_s=7.0)
    speed = r.speeds.get("b", "up-b")
    assert speed is not None and speed.ttft_s == pytest.approx(3.0)
    assert speed.tokens_per_s == pytest.approx(100.0, rel=0.05)
    # A failed answer teaches nothing.
    recorder.record(c, c.route.deployments[0], 502, Usage(), ttft_s=None)
    assert r.speeds.get("a", "up-a").samples == 0  # type: ignore[union-attr]
