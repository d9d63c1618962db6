"""The fair scheduler on a virtual clock: fairness, tiers, deadlines, capacity, rate limits.

The simulation is deterministic (seeded RNG, fixed time step, no sleeping): one producer of
fixed aggregate decode capacity (`capacity_tok_s` shared equally by the requests in flight,
processor sharing) with `slots` concurrent requests, and closed-loop tenants that keep a number
of requests outstanding while they are active. Service is what the producer produced for a
tenant: input tokens when its request starts, output tokens as they stream, weighted by price.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenworks.dispatch.capacity import (
    AdaptiveLimit,
    BreakerState,
    CircuitBreaker,
    Outcome,
    PoolLimits,
    SlidingWindow,
)
from tokenworks.dispatch.ratelimit import Permit, RateLimiter, RateLimits, Refusal, go_duration
from tokenworks.dispatch.scheduler import (
    Request,
    Scheduler,
    Shed,
    ShedReason,
    Ticket,
    TicketState,
    Tier,
)

W_IN, W_OUT = 1.0, 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Tenant:
    name: str
    outstanding: int
    input_tokens: int
    output_range: tuple[int, int]
    weight: float = 1.0
    agents: int = 1
    active: tuple[float, float] = (0.0, float("inf"))
    tier: Tier = Tier.STANDARD
    deadline_s: float | None = None
    inflight: int = 0
    sent: int = 0


@dataclass
class Run:
    times: list[float] = field(default_factory=list)
    service: dict[str, list[float]] = field(default_factory=dict)  # cumulative, per sample
    backlogged: dict[str, list[bool]] = field(default_factory=dict)
    busy_steps: int = 0  # steps where work waited
    full_steps: int = 0  # ... and every slot was in use
    started: list[Ticket] = field(default_factory=list)
    expired: list[Ticket] = field(default_factory=list)
    sheds: list[tuple[float, Shed]] = field(default_factory=list)


class Sim:
    def __init__(
        self,
        tenants: list[Tenant],
        *,
        capacity_tok_s: float = 2000.0,
        slots: int = 16,
        dt: float = 0.05,
        seed: int = 1,
        rate_hint: float | None = None,
        **scheduler_options: object,
    ) -> None:
        self.clock = Clock()
        self.sched = Scheduler(self.clock, **scheduler_options)  # type: ignore[arg-type]
        self.sched.add_pool("p", PoolLimits(max_concurrency=slots, service_rate_hint=rate_hint))
        self.tenants = {t.name: t for t in tenants}
        self.capacity_tok_s = capacity_tok_s
        self.slots = slots
        self.dt = dt
        self.rng = random.Random(seed)
        self.running: dict[Ticket, list[float]] = {}  # ticket -> [target, produced]
        self.served = {t.name: 0.0 for t in tenants}
        self.run = Run(
            service={t.name: [] for t in tenants}, backlogged={t.name: [] for t in tenants}
        )

    def _top_up(self) -> None:
        now = self.clock.now
        for t in self.tenants.values():
            start, end = t.active
            while start <= now < end and t.inflight < t.outstanding:
                out = self.rng.randint(*t.output_range)
                deadline = None if t.deadline_s is None else now + t.deadline_s
                request = Request(
                    tenant=t.name,
                    agent=f"{t.name}-{t.sent % t.agents}",
                    input_tokens=t.input_tokens,
                    output_tokens_est=out,
                    tier=t.tier,
                    input_weight=W_IN,
                    output_weight=W_OUT,
                    tenant_weight=t.weight,
                    deadline=deadline,
                )
                t.sent += 1
                got = self.sched.admit("p", request)
                if isinstance(got, Shed):
                    self.run.sheds.append((now, got))
                    break  # a shed client backs off until the next step
                t.inflight += 1

    def _poll(self) -> None:
        for ticket in self.sched.poll("p"):
            tenant = self.tenants[ticket.request.tenant]
            if ticket.state is TicketState.EXPIRED:
                tenant.inflight -= 1
                self.run.expired.append(ticket)
                continue
            self.running[ticket] = [float(ticket.request.output_tokens_est), 0.0]
            self.served[tenant.name] += W_IN * ticket.request.input_tokens
            self.run.started.append(ticket)

    def step(self) -> None:
        self.clock.now += self.dt
        if self.running:
            share = self.capacity_tok_s * self.dt / len(self.running)
            done = []
            for ticket, progress in self.running.items():
                target, produced = progress
                now_produced = min(target, produced + share)
                tokens = int(now_produced) - int(produced)
                progress[1] = now_produced
                if tokens:
                    self.sched.add_output(ticket, tokens)
                    self.served[ticket.request.tenant] += W_OUT * tokens
                if now_produced >= target:
                    done.append(ticket)
            for ticket in done:
                del self.running[ticket]
                self.sched.finish(
                    ticket,
                    input_tokens=ticket.request.input_tokens,
                    output_tokens=int(ticket.request.output_tokens_est),
                )
                self.tenants[ticket.request.tenant].inflight -= 1
        self._top_up()
        self._poll()
        run = self.run
        run.times.append(self.clock.now)
        waiting = self.sched.queued("p") > 0
        if waiting:
            run.busy_steps += 1
            run.full_steps += len(self.running) == self.slots
        for name, t in self.tenants.items():
            run.service[name].append(self.served[name])
            run.backlogged[name].append(t.inflight > len(self._running_of(name)))

    def _running_of(self, name: str) -> list[Ticket]:
        return [k for k in self.running if k.request.tenant == name]

    def advance(self, seconds: float) -> Run:
        for _ in range(round(seconds / self.dt)):
            self.step()
        return self.run


def sample_index(run: Run, at_s: float) -> int:
    return min(range(len(run.times)), key=lambda i: abs(run.times[i] - at_s))


def max_gap(run: Run, tenants: list[Tenant], until_s: float) -> float:
    """Largest difference of served weighted tokens / weight since t=0 among `tenants`."""
    gap = 0.0
    for i, at in enumerate(run.times):
        if at > until_s:
            break
        normalised = [run.service[t.name][i] / t.weight for t in tenants]
        gap = max(gap, max(normalised) - min(normalised))
    return gap


def window_service(run: Run, name: str, start_s: float, end_s: float) -> float:
    return (
        run.service[name][sample_index(run, end_s)] - run.service[name][sample_index(run, start_s)]
    )


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def swarm_small_medium() -> list[Tenant]:
    return [
        Tenant("swarm", outstanding=200, input_tokens=2000, output_range=(100, 900), agents=50),
        Tenant("small", outstanding=100, input_tokens=200, output_range=(50, 150)),
        Tenant("medium", outstanding=30, input_tokens=800, output_range=(200, 600), agents=3),
    ]


@pytest.fixture(scope="module")
def long_run() -> tuple[Sim, Run]:
    sim = Sim(swarm_small_medium())
    return sim, sim.advance(600.0)


# -- fairness among backlogged tenants ----------------------------------------------------


def test_service_gap_is_bounded_and_does_not_grow_with_the_run(long_run: tuple[Sim, Run]):
    sim, run = long_run
    tenants = list(sim.tenants.values())
    assert all(all(flags[20:]) for flags in run.backlogged.values())  # all backlogged throughout
    gap_300, gap_600 = max_gap(run, tenants, 300.0), max_gap(run, tenants, 600.0)
    # VTC's bound: 2 * max(w_in * longest input, w_out * output in flight), slots x longest.
    bound = 2 * max(W_IN * 2000, W_OUT * sim.slots * 900)
    assert gap_600 <= bound
    assert gap_600 / gap_300 <= 1.05
    total = sum(run.service[t.name][-1] for t in tenants)
    assert gap_600 < 0.02 * total  # and small against what was served


def test_jain_index_over_10s_windows(long_run: tuple[Sim, Run]):
    _, run = long_run
    worst = 1.0
    for start in range(10, 600, 10):
        values = [window_service(run, name, start, start + 10) for name in run.service]
        worst = min(worst, jain(values))
    assert worst >= 0.99


def test_capacity_is_used_while_work_waits(long_run: tuple[Sim, Run]):
    _, run = long_run
    assert run.busy_steps > 0.95 * len(run.times)
    assert run.full_steps >= 0.99 * run.busy_steps


def test_weighted_shares_follow_weights():
    tenants = [
        Tenant("w1", outstanding=60, input_tokens=500, output_range=(100, 500), weight=1),
        Tenant("w2", outstanding=60, input_tokens=500, output_range=(100, 500), weight=2),
        Tenant("w3", outstanding=60, input_tokens=300, output_range=(50, 700), weight=3),
    ]
    sim = Sim(tenants, seed=7)
    run = sim.advance(240.0)
    served = {t.name: window_service(run, t.name, 10.0, 240.0) for t in tenants}
    total_served, total_weight = sum(served.values()), sum(t.weight for t in tenants)
    for t in tenants:
        share = served[t.name] / total_served
        assert share == pytest.approx(t.weight / total_weight, rel=0.02)


def test_a_swarm_of_agents_does_not_buy_a_larger_share_than_a_single_agent():
    tenants = [
        Tenant("fleet", outstanding=400, input_tokens=600, output_range=(100, 400), agents=200),
        Tenant("solo", outstanding=40, input_tokens=600, output_range=(100, 400)),
    ]
    sim = Sim(tenants, seed=3)
    run = sim.advance(120.0)
    fleet, solo = (window_service(run, n, 10.0, 120.0) for n in ("fleet", "solo"))
    assert fleet / (fleet + solo) == pytest.approx(0.5, rel=0.02)


def test_agents_share_their_tenant_fairly():
    sched_clock = Clock()
    sched = Scheduler(sched_clock)
    sched.add_pool("p", PoolLimits(max_concurrency=1))
    # agent a floods, agent b has a few: b still gets every other start while both wait
    for _ in range(50):
        sched.admit("p", Request("T", "a", 100, 0))
    for _ in range(5):
        sched.admit("p", Request("T", "b", 100, 0))
    order = []
    for _ in range(20):
        (ticket,) = sched.poll("p")
        order.append(ticket.request.agent)
        sched.finish(ticket, input_tokens=100, output_tokens=0)
    assert order[:10].count("b") == 5
    assert order[10:] == ["a"] * 10


def test_a_returning_tenant_takes_no_more_than_its_share():
    def tenants() -> list[Tenant]:
        return [
            Tenant("x", outstanding=60, input_tokens=500, output_range=(200, 400)),
            Tenant("y", outstanding=60, input_tokens=500, output_range=(200, 400)),
            Tenant(
                "back",
                outstanding=60,
                input_tokens=500,
                output_range=(200, 400),
                active=(100.0, 200.0),
            ),
        ]

    sim = Sim(tenants(), seed=11)
    run = sim.advance(130.0)
    shares = {n: window_service(run, n, 100.0, 110.0) for n in ("x", "y", "back")}
    back_share = shares["back"] / sum(shares.values())
    assert 1 / 3 - 0.1 <= back_share <= 1 / 3 + 0.1
    # and from then on, three equal tenants: equal shares
    later = {n: window_service(run, n, 110.0, 130.0) for n in ("x", "y", "back")}
    assert later["back"] / sum(later.values()) == pytest.approx(1 / 3, abs=0.03)


def test_lift_rule_gives_no_credit_for_idle_time():
    clock = Clock()
    sched = Scheduler(clock)
    sched.add_pool("p", PoolLimits(max_concurrency=1))
    for _ in range(30):
        sched.admit("p", Request("busy", "k", 100, 0))
    for _ in range(20):
        (ticket,) = sched.poll("p")
        sched.finish(ticket, input_tokens=100, output_tokens=0)
    # "idle" served nothing so far; it arrives with a burst and must alternate, not monopolise
    for _ in range(10):
        sched.admit("p", Request("idle", "k", 100, 0))
    order = []
    for _ in range(10):
        (ticket,) = sched.poll("p")
        order.append(ticket.request.tenant)
        sched.finish(ticket, input_tokens=100, output_tokens=0)
    assert order.count("idle") == 5


def test_streamed_output_counts_before_the_request_ends():
    clock = Clock()
    sched = Scheduler(clock)
    sched.add_pool("p", PoolLimits(max_concurrency=2))
    long = sched.admit("p", Request("A", "a", 10, 10_000))
    other = sched.admit("p", Request("B", "b", 10, 10))
    assert isinstance(long, Ticket) and isinstance(other, Ticket)
    sched.poll("p")
    sched.add_output(long, 5_000)  # A is streaming a long answer
    sched.finish(other, input_tokens=10, output_tokens=10)
    nexts = [sched.admit("p", Request(t, t.lower(), 10, 10)) for t in ("B", "A")]
    (started,) = sched.poll("p")
    assert started is nexts[0]  # B, although A's long answer has not finished
    assert sched.served("p")["A"] == 10 + 5_000


def test_a_failed_attempt_is_refunded():
    clock = Clock()
    sched = Scheduler(clock)
    sched.add_pool("p", PoolLimits(max_concurrency=1))
    ticket = sched.admit("p", Request("A", "a", 1000, 100))
    assert isinstance(ticket, Ticket)
    sched.poll("p")
    sched.finish(ticket, input_tokens=0, output_tokens=0, outcome=Outcome.ERROR)
    assert sched.served("p")["A"] == 0


# -- tiers --------------------------------------------------------------------------------


def drain(sched: Scheduler, count: int) -> list[Ticket]:
    order = []
    for _ in range(count):
        (ticket,) = sched.poll("p")
        order.append(ticket)
        sched.finish(ticket, input_tokens=1, output_tokens=1)
    return order


def test_priority_starts_before_standard_and_standard_is_never_starved():
    clock = Clock()
    sched = Scheduler(clock, priority_burst=4)
    sched.add_pool("p", PoolLimits(max_concurrency=1))
    for _ in range(40):
        sched.admit("p", Request("s", "k", 1, 1, tier=Tier.STANDARD))
    for _ in range(40):
        sched.admit("p", Request("p", "k", 1, 1, tier=Tier.PRIORITY))
    tiers = [t.request.tier for t in drain(sched, 50)]
    assert tiers[:5] == [Tier.PRIORITY] * 4 + [Tier.STANDARD]
    assert tiers.count(Tier.STANDARD) == 10  # one in every five, the stated bound
    run = 0
    for tier in tiers:
        run = run + 1 if tier is Tier.PRIORITY else 0
        assert run <= 4


def test_flex_waits_for_the_others_within_its_bound():
    clock = Clock()
    sched = Scheduler(clock, priority_burst=2, flex_burst=5)
    sched.add_pool("p", PoolLimits(max_concurrency=1))
    for tier in (Tier.FLEX, Tier.STANDARD, Tier.PRIORITY):
        for _ in range(30):
            sched.admit("p", Request(tier.name, "k", 1, 1, tier=tier))
    tiers = [t.request.tier for t in drain(sched, 60)]
    since_flex = 0
    for tier in tiers:
        since_flex = 0 if tier is Tier.FLEX else since_flex + 1
        assert since_flex <= 5 + 1
    assert tiers[0] is Tier.PRIORITY
    assert 8 <= tiers.count(Tier.FLEX) <= 10
    # with no bound, flex waits for everything else
    strict = Scheduler(clock, flex_burst=None)
    strict.add_pool("p", PoolLimits(max_concurrency=1))
    strict.admit("p", Request("f", "k", 1, 1, tier=Tier.FLEX))
    for _ in range(20):
        strict.admit("p", Request("s", "k", 1, 1))
    assert [t.request.tier for t in drain(strict, 21)][-1] is Tier.FLEX


def test_priority_tenant_keeps_its_latency_under_a_standard_flood():
    tenants = [
        Tenant("flood", outstanding=300, input_tokens=1000, output_range=(200, 800)),
        Tenant("vip", outstanding=2, input_tokens=300, output_range=(50, 100), tier=Tier.PRIORITY),
    ]
    sim = Sim(tenants, seed=5)
    run = sim.advance(60.0)
    vip_waits = sorted(t.wait_s or 0.0 for t in run.started if t.request.tenant == "vip")
    flood_waits = sorted(t.wait_s or 0.0 for t in run.started if t.request.tenant == "flood")
    assert vip_waits and vip_waits[-1] <= 1.0  # a slot frees every ~0.2 s; vip takes the next
    assert flood_waits[len(flood_waits) // 2] > 10.0


# -- deadlines and bounded queues ---------------------------------------------------------


def test_deadlines_are_shed_at_once_and_never_served_late():
    tenants = [
        Tenant("bulk", outstanding=200, input_tokens=1000, output_range=(200, 800), agents=20),
        Tenant("urgent", outstanding=60, input_tokens=400, output_range=(100, 300), deadline_s=8.0),
    ]
    # The hint is what an operator would configure; without it, admission cannot estimate
    # until the pool has been saturated for a second, and admits (the first burst expires).
    sim = Sim(tenants, seed=9, rate_hint=8_000.0)
    run = sim.advance(180.0)
    urgent_started = [t for t in run.started if t.request.tenant == "urgent"]
    deadline_sheds = [s for _, s in run.sheds if s.reason is ShedReason.DEADLINE]
    assert urgent_started and deadline_sheds
    for ticket in urgent_started:
        assert ticket.deadline is not None and ticket.started_at is not None
        assert ticket.started_at < ticket.deadline
    # The estimate sheds at admission; few admitted requests run out of time in the queue,
    # although this client keeps its queue at the very edge of its deadline (the estimate
    # errs by about +-0.4 s of 8 s there, on the safe side on average).
    assert len(run.expired) <= 0.10 * (len(urgent_started) + len(run.expired))
    for shed in deadline_sheds:
        assert shed.retry_after_s is not None and shed.retry_after_s > 0
        assert shed.estimated_wait_s is not None and shed.estimated_wait_s >= 8.0


def test_retry_after_of_a_deadline_shed_is_truthful():
    """A client that comes back after retry_after_s finds the queue ahead of it short enough."""
    clock = Clock()
    sched = Scheduler(clock)
    sched.add_pool("p", PoolLimits(max_concurrency=1, service_rate_hint=100.0))
    for _ in range(10):  # 10 requests of 100 weighted tokens: 10 s of work at 100/s
        sched.admit("p", Request("A", "a", 100, 0))
    shed = sched.admit("p", Request("A", "a", 100, 0, deadline=clock.now + 3.0))
    assert isinstance(shed, Shed) and shed.reason is ShedReason.DEADLINE
    assert shed.retry_after_s is not None
    # serve at the hinted rate until the client comes back
    while clock.now < shed.retry_after_s:
        for ticket in sched.poll("p"):
            clock.now += 1.0
            sched.finish(ticket, input_tokens=100, output_tokens=0)
    again = sched.admit("p", Request("A", "a", 100, 0, deadline=clock.now + 3.0))
    assert isinstance(again, Ticket)


def test_an_expired_request_leaves_the_queue_when_its_deadline_comes():
    clock = Clock()
    sched = Scheduler(clock)
    sched.add_pool("p", PoolLimits(max_concurrency=1))
    blocker = sched.admit("p", Request("A", "a", 1, 1))
    waiting = sched.admit("p", Request("B", "b", 1, 1, deadline=5.0))
    assert isinstance(blocker, Ticket) and isinstance(waiting, Ticket)
    assert sched.poll("p") == [blocker]
    assert sched.next_wakeup() == 5.0
    clock.now = 5.0
    assert sched.poll("p") == [waiting] and waiting.state is TicketState.EXPIRED
    sched.finish(blocker, input_tokens=1, output_tokens=1)
    assert sched.poll("p") == [] and sched.queued() == 0


def test_queues_are_bounded_per_tenant_and_in_all():
    clock = Clock()
    sched = Scheduler(clock, tenant_queue_cap=3, pool_queue_cap=5)
    sched.add_pool("p", PoolLimits(max_concurrency=1))
    got = [sched.admit("p", Request("A", "a", 1, 1)) for _ in range(4)]
    assert isinstance(got[3], Shed) and got[3].reason is ShedReason.TENANT_QUEUE_FULL
    got = [sched.admit("p", Request(f"B{i}", "b", 1, 1)) for i in range(3)]
    assert isinstance(got[2], Shed) and got[2].reason is ShedReason.QUEUE_FULL
    assert sched.queued("p") == 5
    assert sched.snapshot()["pools"]["p"]["tiers"]["standard"]["sheds"] == {  # type: ignore[index]
        "tenant_queue_full": 1,
        "queue_full": 1,
    }


def test_a_request_larger_than_the_producers_tpm_is_shed_for_good():
    clock = Clock()
    sched = Scheduler(clock)
    sched.add_pool("p", PoolLimits(tpm=1000))
    shed = sched.admit("p", Request("A", "a", 900, 200))
    assert isinstance(shed, Shed) and shed.reason is ShedReason.TOO_LARGE
    assert shed.retry_after_s is None


# -- cancellation -------------------------------------------------------------------------


def test_cancelled_requests_leave_the_queue():
    clock = Clock()
    sched = Scheduler(clock)
    sched.add_pool("p", PoolLimits(max_concurrency=1))
    first = sched.admit("p", Request("A", "a", 1, 1))
    gone = [sched.admit("p", Request("B", "b", 1, 1)) for _ in range(3)]
    kept = sched.admit("p", Request("C", "c", 1, 1))
    sched.poll("p")
    for ticket in gone:
        assert isinstance(ticket, Ticket)
        sched.cancel(ticket)
        assert ticket.state is TicketState.CANCELLED
    assert sched.queued("p") == 1
    assert isinstance(first, Ticket)
    sched.finish(first, input_tokens=1, output_tokens=1)
    assert sched.poll("p") == [kept]
    # cancelling a running request finishes it with what it produced
    assert isinstance(kept, Ticket)
    sched.add_output(kept, 7)
    sched.cancel(kept)
    assert kept.state is TicketState.DONE and kept.output_tokens == 7
    assert sched.capacity("p").inflight == 0


# -- producer capacity --------------------------------------------------------------------


def test_pool_never_exceeds_rpm_and_tpm_windows():
    clock = Clock()
    sched = Scheduler(clock)
    sched.add_pool("p", PoolLimits(rpm=10, tpm=3_000))
    for _ in range(40):
        sched.admit("p", Request("A", "a", 100, 100))
    starts: list[tuple[float, int]] = []
    for _ in range(200):  # 200 s in 1 s steps; each request answers within the step
        for ticket in sched.poll("p"):
            starts.append((clock.now, ticket.limit_tokens))
            sched.finish(ticket, input_tokens=100, output_tokens=50)
        wake = sched.next_wakeup()
        clock.now = max(clock.now + 1.0, wake or 0.0)
    assert len(starts) == 40
    for at, _ in starts:
        window = [s for s in starts if at - 60.0 < s[0] <= at]
        assert len(window) <= 10
        assert sum(150 for _ in window) <= 3_000  # settled at the actual, 150 each


def test_adaptive_limit_cuts_once_per_event_and_grows_back():
    limit = AdaptiveLimit(16, max_limit=64)
    assert limit.on_congestion(started_at=0.0, now=1.0)
    assert limit.value == 8
    assert not limit.on_congestion(started_at=0.5, now=1.1)  # same event
    assert limit.on_congestion(started_at=1.2, now=2.0)
    assert limit.value == 4
    for _ in range(100):
        limit.on_success(inflight=int(limit.limit))
    assert limit.value > 4
    idle = AdaptiveLimit(4)
    for _ in range(100):
        idle.on_success(inflight=0)
    assert idle.value == 4


def test_pool_honours_retry_after_and_cuts_its_limit():
    clock = Clock()
    sched = Scheduler(clock)
    sched.add_pool("p", PoolLimits(max_concurrency=8))
    tickets = [sched.admit("p", Request("A", "a", 1, 1)) for _ in range(20)]
    started = sched.poll("p")
    assert len(started) == 8
    sched.finish(
        started[0], input_tokens=0, output_tokens=0, outcome=Outcome.OVERLOADED, retry_after_s=5.0
    )
    assert sched.capacity("p").concurrency_limit == 4
    for t in started[1:]:
        sched.finish(t, input_tokens=0, output_tokens=0, outcome=Outcome.OVERLOADED)
    assert sched.capacity("p").concurrency_limit == 4  # one event, one cut
    assert sched.poll("p") == []
    assert sched.next_wakeup() == 5.0
    clock.now = 5.0
    assert len(sched.poll("p")) == 4
    assert all(isinstance(t, Ticket) for t in tickets)


def test_breaker_opens_probes_and_closes():
    breaker = CircuitBreaker(consecutive_failures=3, open_s=10.0)
    for _ in range(3):
        assert breaker.try_acquire(0.0)
        breaker.record(False, 0.0)
    assert breaker.state(1.0) is BreakerState.OPEN and not breaker.try_acquire(1.0)
    assert breaker.state(10.0) is BreakerState.HALF_OPEN
    assert breaker.try_acquire(10.0) and not breaker.try_acquire(10.0)  # one probe
    breaker.record(False, 10.5)  # the probe failed: open again, twice as long
    assert breaker.state(20.0) is BreakerState.OPEN
    assert breaker.state(30.5) is BreakerState.HALF_OPEN
    assert breaker.try_acquire(30.5)
    breaker.record(True, 31.0)
    assert breaker.state(31.0) is BreakerState.CLOSED


def test_breaker_opens_on_error_rate():
    breaker = CircuitBreaker(consecutive_failures=100, error_rate=0.5, window=10, min_volume=10)
    for i in range(9):
        breaker.record(i % 2 == 0, 0.0)
    assert breaker.state(0.0) is BreakerState.CLOSED
    breaker.record(False, 0.0)  # 5 of 10 failed
    assert breaker.state(0.0) is BreakerState.OPEN


def test_scheduler_feeds_the_deployments_breaker():
    clock = Clock()
    sched = Scheduler(clock)
    sched.add_pool("p", PoolLimits(max_concurrency=10))
    for outcome in [Outcome.ERROR] * 4 + [Outcome.RATE_LIMITED] * 3 + [Outcome.TIMEOUT]:
        ticket = sched.admit("p", Request("A", "a", 1, 1, deployment="p/m"))
        sched.poll("p")
        assert isinstance(ticket, Ticket)
        sched.finish(ticket, input_tokens=0, output_tokens=0, outcome=outcome)
    snapshot = sched.snapshot()["breakers"]
    assert snapshot["p/m"]["state"] == "open"  # type: ignore[index]


# -- windows and consumer rate limits -----------------------------------------------------


def test_window_wait_and_reset():
    window = SlidingWindow(10, window_s=60)
    window.take(6, 0.0)
    window.take(4, 30.0)
    assert window.wait_s(5, 31.0) == pytest.approx(29.0)
    assert window.reset_s(31.0) == pytest.approx(59.0)
    assert window.wait_s(11, 31.0) is None


OPS = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "settle"]),
        st.floats(0.0, 20.0, allow_nan=False),  # time step
        st.integers(1, 400),  # tokens estimate
        st.floats(0.0, 1.0, allow_nan=False),  # actual / estimate
        st.integers(0, 1_000),  # which permit to settle
    ),
    max_size=150,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_rate_limits_are_exact_under_any_interleaving(ops):
    limiter = RateLimiter()
    limits = {"key": RateLimits(rpm=7, tpm=1_000, max_concurrency=3), "acct": RateLimits(tpm=1_500)}
    for scope, lim in limits.items():
        limiter.set_limits(scope, lim)
    now = 0.0
    held: list[tuple[Permit, int]] = []
    admitted: list[list[float]] = []  # [time, final tokens]
    for op, step, tokens, ratio, pick in ops:
        now += step
        if op == "acquire":
            got = limiter.acquire(["key", "acct"], tokens, now)
            if isinstance(got, Permit):
                admitted.append([now, float(tokens)])
                held.append((got, len(admitted) - 1))
                assert len(held) <= 3
            else:
                assert isinstance(got, Refusal)
                if got.retry_after_s is not None:  # truthful: fits then, if nothing else moves
                    state = limiter._scopes[got.scope]
                    window = state.requests if got.limit == "requests" else state.tokens
                    assert window is not None
                    amount = 1 if got.limit == "requests" else tokens
                    assert not window.fits(amount, now)
                    twin = copy.deepcopy(window)  # looking ahead expires entries: not in place
                    assert twin.fits(amount, now + got.retry_after_s)
        elif held:
            permit, index = held.pop(pick % len(held))
            actual = int(permit.tokens_reserved * ratio)
            limiter.settle(permit, actual, now)
            admitted[index][1] = actual
    for at, _ in admitted:
        in_window = [tok for t, tok in admitted if at - 60.0 < t <= at]
        assert len(in_window) <= 7
        assert sum(in_window) <= 1_000


def test_rate_limit_headers_and_refusals():
    limiter = RateLimiter()
    limiter.set_limits("key", RateLimits(rpm=2, tpm=100))
    first = limiter.acquire(["key"], 60, 0.0)
    assert isinstance(first, Permit)
    refused = limiter.acquire(["key"], 60, 1.0)
    assert isinstance(refused, Refusal) and refused.limit == "tokens"
    assert refused.retry_after_s == pytest.approx(59.0)
    limiter.settle(first, 20, 2.0)  # the answer was short: the rest comes back
    assert isinstance(limiter.acquire(["key"], 60, 2.0), Permit)
    headers = limiter.headers(["key"], 3.0)
    assert headers == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "59s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "20",
        "x-ratelimit-reset-tokens": "59s",
    }
    too_big = limiter.acquire(["key"], 101, 100.0)
    assert isinstance(too_big, Refusal) and too_big.never_fits
    concurrency = RateLimiter()
    concurrency.set_limits("k", RateLimits(max_concurrency=1))
    held = concurrency.acquire(["k"], 1, 0.0)
    assert isinstance(concurrency.acquire(["k"], 1, 0.0), Refusal)
    assert isinstance(held, Permit)
    concurrency.settle(held, 1, 0.0)
    assert isinstance(concurrency.acquire(["k"], 1, 0.0), Permit)


def test_child_limits_may_only_narrow_the_parents():
    parent = RateLimits(rpm=100, tpm=None, max_concurrency=5)
    assert RateLimits(rpm=50, max_concurrency=5).no_looser_than(parent)
    assert not RateLimits(rpm=None, max_concurrency=5).no_looser_than(parent)
    assert not RateLimits(rpm=200, max_concurrency=1).no_looser_than(parent)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0123, "13ms"),
        (1.5, "1.5s"),
        (59.0, "59s"),
        (60.0, "1m0s"),
        (361.0, "6m1s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_go_duration(seconds: float, text: str):
    assert go_duration(seconds) == text


def test_tier_names():
    assert Tier.parse(None) is Tier.STANDARD and Tier.parse("auto") is Tier.STANDARD
    assert Tier.parse("priority") is Tier.PRIORITY and Tier.parse("flex") is Tier.FLEX
    with pytest.raises(ValueError, match="unknown service tier"):
        Tier.parse("platinum")
