"""The fair scheduler: who gets a producer's next free slot when there are not enough.

Pure and synchronous on an injected clock (`clock()` returns seconds); no asyncio, no sleeping,
no I/O, so the gateway wraps it in futures and tests drive it on a virtual clock.

How the relay will call it (one `Scheduler` per process, one pool per producer)::

    ticket = sched.admit(pool, Request(tenant=account, agent=key, tier=..., input_tokens=...,
                                       output_tokens_est=..., input_weight=..., deadline=...))
    if isinstance(ticket, Shed):        # 429, Retry-After from ticket.retry_after_s
        ...
    waiting[ticket.id] = future          # then wake the pool:
    for t in sched.poll(pool):           # tickets that started or expired just now
        waiting.pop(t.id).set_result(t)  # t.state is RUNNING (go upstream) or EXPIRED (429)
    # a timer calls sched.poll() at sched.next_wakeup() (deadlines, rpm/tpm windows, pauses)
    ...upstream call...
    sched.add_output(ticket, n)          # per streamed chunk (or every few chunks)
    sched.finish(ticket, input_tokens=..., output_tokens=..., outcome=Outcome.OK,
                 retry_after_s=upstream_retry_after)   # then sched.poll(pool) again
    sched.cancel(ticket)                 # client hung up: queued -> leaves the queue, O(1);
                                         # running -> finished with what was produced

What it guarantees:

- **Fairness (VTC)**: inside each tier of each pool, the next request comes from the tenant
  (account) with the smallest virtual counter, and inside it from the agent (key) with the
  smallest counter. Counters grow by weighted tokens / weight: `input_weight * input` at
  start, `output_weight * n` per streamed chunk (`add_output`), corrected to the actual at
  `finish` (a failed attempt that produced nothing is refunded). A tenant or agent that
  becomes backlogged is lifted to the smallest counter of those already backlogged (VTC's
  lift rule): idle time earns no credit, a deficit is kept. Among tenants backlogged over
  an interval, served weighted tokens / weight differ by a bounded amount that does not grow
  with the interval (about the work in flight plus one request; VTC, OSDI 2024).
- **Tiers**: `priority` before `standard` before `flex`, with an anti-starvation bound:
  while standard work waits, at most `priority_burst` priority requests start before the
  next standard one; while flex work waits, at most `flex_burst` + 1 higher-tier requests
  start before the next flex one (`flex_burst=None`: flex waits for the others, unbounded).
  Each tier keeps its own counters: a tenant's priority spending does not cost it standard
  share.
- **Deadlines**: a request whose estimated wait (its position, from the queued work ahead of
  it in its tier and the tiers above, and the pool's measured service rate while saturated)
  reaches past its deadline is shed at admission with `retry_after_s` = estimated wait -
  time left. A queued request never starts at or after its deadline: it expires (EXPIRED,
  returned by `poll`) instead. Before the pool has been measured (and without
  `PoolLimits.service_rate_hint`) admission cannot estimate and admits.
- **Bounded queues**: per tenant per pool (`tenant_queue_cap`), per pool (`pool_queue_cap`)
  and in all (`total_queue_cap`); a full queue sheds with an estimated retry-after.
- **Capacity**: a request starts only when its pool's `PoolCapacity` admits it (configured
  max_concurrency, rpm and tpm; adaptive AIMD limit; upstream Retry-After pause). The
  pool's order is kept: when the chosen request does not fit the tpm window, nothing
  overtakes it. Per-deployment circuit breakers live here too (`breaker`), fed by `finish`;
  the router consults them (`CircuitBreaker.try_acquire`) before choosing a pool.

A decision (`poll` starting one request, `admit`, `add_output`, `finish`) is O(log n) in the
number of backlogged tenants/agents (heaps with lazy invalidation); `cancel` is O(1).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from tokenworks.dispatch.capacity import (
    FAILURES,
    NO_VERDICT,
    CircuitBreaker,
    Outcome,
    PoolCapacity,
    PoolLimits,
    WindowEntry,
)


class Tier(IntEnum):
    PRIORITY = 0
    STANDARD = 1
    FLEX = 2

    @classmethod
    def parse(cls, name: str | None) -> Tier:
        """OpenAI's `service_tier` names; `auto`/`default`/absent are standard."""
        if name in (None, "auto", "default", "standard"):
            return cls.STANDARD
        if name == "priority":
            return cls.PRIORITY
        if name == "flex":
            return cls.FLEX
        raise ValueError(f"unknown service tier {name!r}")


_TIERS = tuple(Tier)  # iterating the enum class itself is slow on the hot path
_LOWER_TIERS = (Tier.STANDARD, Tier.FLEX)


class TicketState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


# Members as module constants: an enum attribute lookup costs ~15x a global's in the
# hot path.
_QUEUED = TicketState.QUEUED
_RUNNING = TicketState.RUNNING
_DONE = TicketState.DONE
_CANCELLED = TicketState.CANCELLED
_EXPIRED = TicketState.EXPIRED


class ShedReason(StrEnum):
    DEADLINE = "deadline"  # at admission: cannot start before its deadline
    EXPIRED = "expired"  # in the queue: the estimate was wrong, its deadline came first
    TENANT_QUEUE_FULL = "tenant_queue_full"
    QUEUE_FULL = "queue_full"
    TOO_LARGE = "too_large"  # more tokens than the producer's whole tpm


@dataclass(slots=True)
class Request:
    """What the scheduler needs to know about one request.

    Weights price the tokens (e.g. per-token prices, so fairness is in money-equivalent
    tokens); `tenant_weight`/`agent_weight` are shares (2 gets twice the service of 1).
    `deadline` is absolute, on the scheduler's clock. `limit_tokens` is what the producer's
    tpm counts at start (default input + output estimate), corrected at finish.
    `streamed=False` charges the output estimate at start (no chunks will come to count).
    """

    tenant: str
    agent: str
    input_tokens: int
    output_tokens_est: int
    tier: Tier = Tier.STANDARD
    input_weight: float = 1.0
    output_weight: float = 1.0
    tenant_weight: float = 1.0
    agent_weight: float = 1.0
    deadline: float | None = None
    deployment: str | None = None
    limit_tokens: int | None = None
    streamed: bool = True


@dataclass(frozen=True, slots=True)
class Shed:
    reason: ShedReason
    retry_after_s: float | None  # None: waiting will not help (too large, or unknown)
    estimated_wait_s: float | None = None


class Ticket:
    """One admitted request. Read `state`; hand it back to add_output/finish/cancel."""

    __slots__ = (
        "_agent",
        "_pool",
        "_tenant",
        "_tpm",
        "charged",
        "deadline",
        "enqueued_at",
        "est_cost",
        "finished_at",
        "id",
        "limit_tokens",
        "output_tokens",
        "request",
        "started_at",
        "state",
    )

    def __init__(self, ticket_id: int, pool: _Pool, request: Request, now: float) -> None:
        self.id = ticket_id
        self._pool = pool
        self.request = request
        self.state = _QUEUED
        self.enqueued_at = now
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.deadline = request.deadline
        self.est_cost = (
            request.input_weight * request.input_tokens
            + request.output_weight * request.output_tokens_est
        )
        self.limit_tokens = request.limit_tokens or (
            request.input_tokens + request.output_tokens_est
        )
        self.charged = 0.0  # weighted tokens charged to the counters so far (not / weight)
        self.output_tokens = 0
        self._tpm: WindowEntry | None = None
        self._tenant: _Tenant
        self._agent: _Agent

    @property
    def pool(self) -> str:
        return self._pool.name

    @property
    def wait_s(self) -> float | None:
        return None if self.started_at is None else self.started_at - self.enqueued_at

    def __repr__(self) -> str:
        r = self.request
        return f"Ticket({self.id}, {r.tenant}/{r.agent}, {r.tier.name}, {self.state})"


# -- one tier's two-level VTC queue -------------------------------------------------------

_GONE = -1  # heap sequence of a tenant/agent that is not backlogged: matches no heap entry


class _Agent:
    __slots__ = ("counter", "live", "queue", "seq", "weight", "work")

    def __init__(self) -> None:
        self.counter = 0.0
        self.weight = 1.0
        self.queue: deque[Ticket] = deque()
        self.live = 0  # queued tickets in `queue` (cancelled ones stay until they reach the head)
        self.seq = _GONE
        self.work = 0.0  # estimated weighted tokens queued


class _Tenant:
    __slots__ = ("agent_weight", "agents", "counter", "heap", "live", "seq", "weight", "work")

    def __init__(self) -> None:
        self.counter = 0.0
        self.weight = 1.0
        self.agents: dict[str, _Agent] = {}
        self.heap: list[tuple[float, int, _Agent]] = []  # backlogged agents by counter
        self.agent_weight = 0.0  # sum of backlogged agents' weights
        self.live = 0
        self.seq = _GONE
        self.work = 0.0


class _TierQueue:
    """Least-counter-first over backlogged tenants, then over the tenant's backlogged agents.

    Heap entries are (counter, seq, node); an entry is valid while `seq` is the node's. Counters
    only grow between decisions (charges), so an entry whose key is below its node's counter
    is re-keyed when it reaches the top (lazy decrease-key); a counter that falls (a correction
    at finish) gets a fresh entry at once. So the valid top is always the true minimum.
    """

    __slots__ = ("_seq", "backlogged", "heap", "live", "tenants", "weight", "work")

    def __init__(self) -> None:
        self.tenants: dict[str, _Tenant] = {}
        self.heap: list[tuple[float, int, _Tenant]] = []
        self.live = 0
        self.work = 0.0
        self.weight = 0.0  # sum of backlogged tenants' weights
        self.backlogged = 0
        self._seq = itertools.count()

    def _top_tenant(self) -> _Tenant | None:
        heap = self.heap
        while heap:
            key, seq, tenant = heap[0]
            if seq != tenant.seq:
                heapq.heappop(heap)
            elif key < tenant.counter:
                heapq.heapreplace(heap, (tenant.counter, seq, tenant))
            else:
                return tenant
        return None

    @staticmethod
    def _top_agent(tenant: _Tenant) -> _Agent:
        heap = tenant.heap
        while True:
            key, seq, agent = heap[0]
            if seq != agent.seq:
                heapq.heappop(heap)
            elif key < agent.counter:
                heapq.heapreplace(heap, (agent.counter, seq, agent))
            else:
                return agent

    def min_counter(self) -> float | None:
        top = self._top_tenant()
        return None if top is None else top.counter

    def push(self, ticket: Ticket) -> None:
        request = ticket.request
        tenant = self.tenants.get(request.tenant)
        if tenant is None:
            tenant = self.tenants[request.tenant] = _Tenant()
        if tenant.live == 0:
            floor = self.min_counter()
            if floor is not None and floor > tenant.counter:
                tenant.counter = floor  # lift: no credit for idle time
            tenant.weight = request.tenant_weight
            self.weight += tenant.weight
            self.backlogged += 1
            tenant.seq = next(self._seq)
            heapq.heappush(self.heap, (tenant.counter, tenant.seq, tenant))
        elif tenant.weight != request.tenant_weight:
            self.weight += request.tenant_weight - tenant.weight
            tenant.weight = request.tenant_weight
        agent = tenant.agents.get(request.agent)
        if agent is None:
            agent = tenant.agents[request.agent] = _Agent()
        if agent.live == 0:
            floor = self._top_agent(tenant).counter if tenant.live else None
            if floor is not None and floor > agent.counter:
                agent.counter = floor
            agent.weight = request.agent_weight
            tenant.agent_weight += agent.weight
            agent.seq = next(self._seq)
            heapq.heappush(tenant.heap, (agent.counter, agent.seq, agent))
        elif agent.weight != request.agent_weight:
            tenant.agent_weight += request.agent_weight - agent.weight
            agent.weight = request.agent_weight
        agent.queue.append(ticket)
        agent.live += 1
        tenant.live += 1
        self.live += 1
        agent.work += ticket.est_cost
        tenant.work += ticket.est_cost
        self.work += ticket.est_cost
        ticket._tenant = tenant
        ticket._agent = agent

    def bind(self, ticket: Ticket) -> None:
        """Give a ticket that starts without queueing its tenant and agent (for the charges)."""
        request = ticket.request
        tenant = self.tenants.get(request.tenant)
        if tenant is None:
            tenant = self.tenants[request.tenant] = _Tenant()
        agent = tenant.agents.get(request.agent)
        if agent is None:
            agent = tenant.agents[request.agent] = _Agent()
        ticket._tenant = tenant
        ticket._agent = agent

    def peek(self) -> Ticket | None:
        tenant = self._top_tenant()
        if tenant is None:
            return None
        queue = self._top_agent(tenant).queue
        while queue[0].state is not _QUEUED:
            queue.popleft()  # cancelled or expired earlier
        return queue[0]

    def take(self, ticket: Ticket) -> None:
        """Remove the ticket `peek` returned."""
        ticket._agent.queue.popleft()
        self.remove(ticket)

    def remove(self, ticket: Ticket) -> None:
        """Unqueue a ticket; one not at its agent's head stays there, dead, until it is."""
        agent, tenant = ticket._agent, ticket._tenant
        agent.live -= 1
        tenant.live -= 1
        self.live -= 1
        agent.work -= ticket.est_cost
        tenant.work -= ticket.est_cost
        self.work -= ticket.est_cost
        if agent.live == 0:
            agent.seq = _GONE
            agent.queue.clear()
            agent.work = 0.0
            tenant.agent_weight -= agent.weight
        if tenant.live == 0:
            tenant.seq = _GONE
            tenant.heap.clear()
            tenant.work = 0.0
            tenant.agent_weight = 0.0
            self.weight -= tenant.weight
            self.backlogged -= 1
        if self.live == 0:
            self.heap.clear()
            self.work = 0.0
            self.weight = 0.0

    def charge(self, ticket: Ticket, amount: float) -> None:
        request = ticket.request
        tenant, agent = ticket._tenant, ticket._agent
        tenant.counter += amount / request.tenant_weight
        agent.counter += amount / request.agent_weight
        if amount < 0:  # a key fell: the heaps need fresh entries now, not lazily
            if agent.live:
                agent.seq = next(self._seq)
                heapq.heappush(tenant.heap, (agent.counter, agent.seq, agent))
            if tenant.live:
                tenant.seq = next(self._seq)
                heapq.heappush(self.heap, (tenant.counter, tenant.seq, tenant))


# -- a pool: one producer's queue, capacity and measurements ------------------------------


class _RateMeter:
    """Weighted tokens started per second while the pool is saturated (work left queued).

    Only saturated time counts: when the queue empties, starts measure demand, not capacity.
    Exponentially decayed over `half_life_s` of saturated time.
    """

    __slots__ = ("cost", "count", "half_life_s", "mark", "saturated", "time")

    def __init__(self, half_life_s: float = 10.0) -> None:
        self.half_life_s = half_life_s
        self.cost = 0.0
        self.count = 0.0
        self.time = 0.0
        self.mark = 0.0
        self.saturated = False

    def accrue(self, now: float) -> None:
        if self.saturated and now > self.mark:
            elapsed = now - self.mark
            decay = 0.5 ** (elapsed / self.half_life_s)
            self.cost *= decay
            self.count *= decay
            self.time = self.time * decay + elapsed
        self.mark = now

    def started(self, cost: float) -> None:
        if self.saturated:
            self.cost += cost
            self.count += 1.0

    def rate(self, min_sample_s: float) -> float | None:
        return self.cost / self.time if self.time >= min_sample_s and self.cost > 0 else None

    def gap_s(self) -> float:
        """Mean time between starts while saturated."""
        return self.time / self.count if self.count > 0 else 0.0


class _TierStats:
    __slots__ = ("cancelled", "sheds", "started", "wait_max_s", "wait_sum_s")

    def __init__(self) -> None:
        self.started = 0
        self.wait_sum_s = 0.0
        self.wait_max_s = 0.0
        self.cancelled = 0
        self.sheds: dict[str, int] = {}


class _Pool:
    __slots__ = (
        "capacity",
        "deadlines",
        "meter",
        "name",
        "queued",
        "served",
        "skips",
        "stats",
        "tenant_queued",
        "tiers",
    )

    def __init__(self, name: str, limits: PoolLimits) -> None:
        self.name = name
        self.capacity = PoolCapacity(limits)
        self.tiers = (_TierQueue(), _TierQueue(), _TierQueue())
        self.queued = 0
        self.tenant_queued: dict[str, int] = {}
        self.skips = [0, 0, 0]  # higher-tier starts since this tier last started, while it waited
        self.deadlines: list[tuple[float, int, Ticket]] = []
        self.meter = _RateMeter()
        self.served: dict[str, float] = {}  # weighted tokens per tenant, not divided by weight
        self.stats = (_TierStats(), _TierStats(), _TierStats())


class Scheduler:
    def __init__(
        self,
        clock: Callable[[], float],
        *,
        priority_burst: int = 8,
        flex_burst: int | None = 32,
        tenant_queue_cap: int = 1_000,
        pool_queue_cap: int = 100_000,
        total_queue_cap: int = 200_000,
        tier_deadline_s: dict[Tier, float] | None = None,
        min_rate_sample_s: float = 1.0,
    ) -> None:
        if priority_burst < 1 or (flex_burst is not None and flex_burst < 1):
            raise ValueError("a tier burst bound is at least 1")
        self._clock = clock
        self._bursts: tuple[int | None, ...] = (None, priority_burst, flex_burst)
        self.tenant_queue_cap = tenant_queue_cap
        self.pool_queue_cap = pool_queue_cap
        self.total_queue_cap = total_queue_cap
        self._tier_deadline_s = dict(tier_deadline_s or {})
        self._min_rate_sample_s = min_rate_sample_s
        self._pools: dict[str, _Pool] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._breaker_factory: Callable[[], CircuitBreaker] = CircuitBreaker
        self._ids = itertools.count(1)
        self._queued = 0

    # -- configuration ---------------------------------------------------------------------

    def add_pool(self, name: str, limits: PoolLimits | None = None) -> None:
        if name in self._pools:
            raise ValueError(f"pool {name!r} exists")
        self._pools[name] = _Pool(name, limits or PoolLimits())

    def capacity(self, pool: str) -> PoolCapacity:
        return self._pools[pool].capacity

    def breaker(self, deployment: str) -> CircuitBreaker:
        found = self._breakers.get(deployment)
        if found is None:
            found = self._breakers[deployment] = self._breaker_factory()
        return found

    # -- the request's life ----------------------------------------------------------------

    def admit(self, pool_name: str, request: Request) -> Ticket | Shed:
        """Queue a request, or shed it now with an honest retry-after."""
        pool = self._pools[pool_name]
        now = self._clock()
        tier = request.tier
        if request.deadline is None and tier in self._tier_deadline_s:
            request.deadline = now + self._tier_deadline_s[tier]
        ticket = Ticket(next(self._ids), pool, request, now)
        if pool.capacity.never_fits(ticket.limit_tokens):
            return self._shed(pool, tier, ShedReason.TOO_LARGE, None)
        if self._queued >= self.total_queue_cap or pool.queued >= self.pool_queue_cap:
            retry = self._estimate_wait(pool, request, ticket.limit_tokens, now, None)
            return self._shed(pool, tier, ShedReason.QUEUE_FULL, retry)
        if pool.tenant_queued.get(request.tenant, 0) >= self.tenant_queue_cap:
            tenant = pool.tiers[tier].tenants.get(request.tenant)
            head_cost = tenant.work / tenant.live if tenant is not None and tenant.live else 0.0
            retry = self._estimate_wait(pool, request, ticket.limit_tokens, now, head_cost)
            return self._shed(pool, tier, ShedReason.TENANT_QUEUE_FULL, retry)
        if request.deadline is not None:
            wait_s = self._estimate_wait(pool, request, ticket.limit_tokens, now, None)
            left_s = request.deadline - now
            if wait_s >= left_s:
                # Back when the queue ahead has shrunk to what the deadline allows, with one
                # start's worth of slack so the retry is not refused again at the edge.
                slack_s = self._start_gap_s(pool, request)
                retry = wait_s - max(left_s, 0.0) + slack_s if wait_s > 0 else None
                return self._shed(pool, tier, ShedReason.DEADLINE, retry, wait_s)
            heapq.heappush(pool.deadlines, (request.deadline, ticket.id, ticket))
        pool.tiers[tier].push(ticket)
        pool.queued += 1
        self._queued += 1
        pool.tenant_queued[request.tenant] = pool.tenant_queued.get(request.tenant, 0) + 1
        return ticket

    def start_now(self, pool_name: str, request: Request) -> Ticket | None:
        """The fast path: nothing waits in the pool and it has capacity, so the request starts
        at once (RUNNING, never queued); None: `admit` it instead.

        `_start`'s work, inlined for the case where nothing is queued (no tenant is
        backlogged, so no heap is touched, and the rate meter is not saturated): the
        gateway pays this on every request when there is no contention."""
        pool = self._pools[pool_name]
        if pool.queued:
            return None  # never overtake the queue
        capacity = pool.capacity
        now = self._clock()
        # inflight < int(limit), for an integer inflight
        if capacity.inflight + 1 > capacity.adaptive.limit or now < capacity.blocked_until:
            return None
        windows = capacity.requests is not None or capacity.tokens is not None
        if windows and not capacity.admits(
            request.limit_tokens or request.input_tokens + request.output_tokens_est, now
        ):
            return None
        ticket = Ticket(next(self._ids), pool, request, now)
        queue = pool.tiers[request.tier]
        tenant = queue.tenants.get(request.tenant)
        if tenant is None:
            tenant = queue.tenants[request.tenant] = _Tenant()
        agent = tenant.agents.get(request.agent)
        if agent is None:
            agent = tenant.agents[request.agent] = _Agent()
        ticket._tenant = tenant
        ticket._agent = agent
        ticket.state = _RUNNING
        ticket.started_at = now
        if windows:
            ticket._tpm = capacity.start(ticket.limit_tokens, now)
        else:
            capacity.inflight += 1
        upfront = request.input_weight * request.input_tokens
        if not request.streamed:
            upfront += request.output_weight * request.output_tokens_est
        if upfront:  # as `_charge`; nobody is backlogged, so no heap needs a fresh entry
            ticket.charged = upfront
            tenant.counter += upfront / request.tenant_weight
            agent.counter += upfront / request.agent_weight
            served = pool.served
            served[request.tenant] = served.get(request.tenant, 0.0) + upfront
        pool.stats[request.tier].started += 1  # waited 0: the wait sums stay as they are
        return ticket

    def poll(self, pool_name: str | None = None) -> list[Ticket]:
        """Start what capacity allows and expire what is due; returns the tickets changed."""
        now = self._clock()
        changed: list[Ticket] = []
        pools = self._pools.values() if pool_name is None else (self._pools[pool_name],)
        for pool in pools:
            pool.meter.accrue(now)
            if pool.deadlines:
                self._expire(pool, now, changed)
            capacity = pool.capacity
            while pool.queued and capacity.has_slot(now):
                ticket = self._select(pool)
                if not capacity.admits(ticket.limit_tokens, now):
                    break
                self._start(pool, ticket, now)
                changed.append(ticket)
            pool.meter.saturated = pool.queued > 0
        return changed

    def add_output(self, ticket: Ticket, tokens: int) -> None:
        """Output tokens streamed so far for a running request (count as they arrive)."""
        if ticket.state is _RUNNING and tokens:
            ticket.output_tokens += tokens
            self._charge(ticket, ticket.request.output_weight * tokens)

    def finish(
        self,
        ticket: Ticket,
        input_tokens: int,
        output_tokens: int,
        outcome: Outcome = Outcome.OK,
        retry_after_s: float | None = None,
    ) -> int:
        """The attempt ended: charge the actual, free the slot, feed AIMD and the breaker.
        Returns how many wait in its pool (when some do, `poll` may start one now)."""
        if ticket.state is _QUEUED:
            self.cancel(ticket)
            return ticket._pool.queued
        if ticket.state is not _RUNNING:
            return ticket._pool.queued
        now = self._clock()
        request = ticket.request
        actual = request.input_weight * input_tokens + request.output_weight * output_tokens
        self._charge(ticket, actual - ticket.charged)
        ticket.output_tokens = output_tokens
        ticket.state = _DONE
        ticket.finished_at = now
        assert ticket.started_at is not None
        ticket._pool.capacity.finish(
            ticket._tpm,
            input_tokens + output_tokens,
            outcome,
            ticket.started_at,
            now,
            retry_after_s,
        )
        breaker = self._breakers.get(request.deployment or ticket._pool.name)
        if breaker is None:
            breaker = self.breaker(request.deployment or ticket._pool.name)
        if outcome in NO_VERDICT:
            breaker.release()  # says nothing about the deployment's health
        else:
            breaker.record(outcome not in FAILURES, now, retry_after_s)
        return ticket._pool.queued

    def cancel(self, ticket: Ticket) -> None:
        """The client went away. Queued: leaves the queue (O(1)). Running: finished as is."""
        if ticket.state is _RUNNING:
            self.finish(
                ticket,
                input_tokens=ticket.request.input_tokens,
                output_tokens=ticket.output_tokens,
                outcome=Outcome.CANCELLED,
            )
            return
        if ticket.state is not _QUEUED:
            return
        pool = ticket._pool
        self._unqueue(pool, ticket)
        ticket.state = _CANCELLED
        pool.stats[ticket.request.tier].cancelled += 1

    def next_wakeup(self) -> float | None:
        """When to call `poll` next if nothing else happens (None: only an event can help)."""
        now = self._clock()
        best: float | None = None
        for pool in self._pools.values():
            deadlines = pool.deadlines
            while deadlines and deadlines[0][2].state is not _QUEUED:
                heapq.heappop(deadlines)
            candidates = [deadlines[0][0]] if deadlines else []
            if pool.queued:
                free = pool.capacity.free_at(self._select(pool).limit_tokens, now)
                if free is not None:
                    candidates.append(free)
            for at in candidates:
                if best is None or at < best:
                    best = at
        return best

    # -- observability ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """Plain data for /metrics and GET /admin/v1/dispatch."""
        now = self._clock()
        pools: dict[str, object] = {}
        for name, pool in self._pools.items():
            tiers: dict[str, object] = {}
            for tier in Tier:
                queue, stats = pool.tiers[tier], pool.stats[tier]
                tiers[tier.name.lower()] = {
                    "queued": queue.live,
                    "tenants_waiting": queue.backlogged,
                    "started": stats.started,
                    "wait_s_sum": stats.wait_sum_s,
                    "wait_s_max": stats.wait_max_s,
                    "cancelled": stats.cancelled,
                    "sheds": dict(stats.sheds),
                }
            pools[name] = {
                "queued": pool.queued,
                "tiers": tiers,
                "capacity": pool.capacity.snapshot(now),
                "service_rate": pool.meter.rate(self._min_rate_sample_s),
                "tenants_served": len(pool.served),
            }
        return {
            "queued": self._queued,
            "pools": pools,
            "breakers": {name: b.snapshot(now) for name, b in sorted(self._breakers.items())},
        }

    def served(self, pool: str) -> dict[str, float]:
        """Weighted tokens served per tenant in a pool (streamed output included as it came)."""
        return dict(self._pools[pool].served)

    def queued(self, pool: str | None = None) -> int:
        return self._queued if pool is None else self._pools[pool].queued

    # -- internals -------------------------------------------------------------------------

    def _select(self, pool: _Pool) -> Ticket:
        tiers = pool.tiers
        chosen = next(t for t in _TIERS if tiers[t].live)
        for lower in _LOWER_TIERS:
            bound = self._bursts[lower]
            if (
                lower > chosen
                and bound is not None
                and tiers[lower].live
                and pool.skips[lower] >= bound
            ):
                chosen = lower
                break
        ticket = tiers[chosen].peek()
        assert ticket is not None
        return ticket

    def _start(self, pool: _Pool, ticket: Ticket, now: float) -> None:
        request = ticket.request
        tier = request.tier
        pool.tiers[tier].take(ticket)
        self._count_unqueued(pool, request.tenant)
        skips = pool.skips
        for other in _TIERS:
            if other == tier or not pool.tiers[other].live:
                skips[other] = 0
            elif other > tier:
                skips[other] += 1
        self._run(pool, ticket, now)

    def _run(self, pool: _Pool, ticket: Ticket, now: float) -> None:
        """Mark a ticket started: take capacity, charge its upfront cost, count it."""
        request = ticket.request
        tier = request.tier
        ticket.state = _RUNNING
        ticket.started_at = now
        ticket._tpm = pool.capacity.start(ticket.limit_tokens, now)
        upfront = request.input_weight * request.input_tokens
        if not request.streamed:
            upfront += request.output_weight * request.output_tokens_est
        self._charge(ticket, upfront)
        pool.meter.started(ticket.est_cost)
        stats = pool.stats[tier]
        stats.started += 1
        waited = now - ticket.enqueued_at
        stats.wait_sum_s += waited
        if waited > stats.wait_max_s:
            stats.wait_max_s = waited

    def _charge(self, ticket: Ticket, amount: float) -> None:
        if not amount:
            return
        ticket.charged += amount
        ticket._pool.tiers[ticket.request.tier].charge(ticket, amount)
        served = ticket._pool.served
        tenant = ticket.request.tenant
        served[tenant] = served.get(tenant, 0.0) + amount

    def _unqueue(self, pool: _Pool, ticket: Ticket) -> None:
        pool.tiers[ticket.request.tier].remove(ticket)
        self._count_unqueued(pool, ticket.request.tenant)
        if not pool.queued:
            pool.meter.accrue(self._clock())
            pool.meter.saturated = False

    def _count_unqueued(self, pool: _Pool, tenant: str) -> None:
        pool.queued -= 1
        self._queued -= 1
        left = pool.tenant_queued[tenant] - 1
        if left:
            pool.tenant_queued[tenant] = left
        else:
            del pool.tenant_queued[tenant]

    def _expire(self, pool: _Pool, now: float, changed: list[Ticket]) -> None:
        deadlines = pool.deadlines
        while deadlines and deadlines[0][0] <= now:
            ticket = heapq.heappop(deadlines)[2]
            if ticket.state is _QUEUED:
                self._unqueue(pool, ticket)
                ticket.state = _EXPIRED
                self._count_shed(pool, ticket.request.tier, ShedReason.EXPIRED)
                changed.append(ticket)
        # Cancelled tickets leave their deadline entries behind; keep the heap near live size.
        if len(deadlines) > 1024 and len(deadlines) > 2 * pool.queued:
            pool.deadlines = [e for e in deadlines if e[2].state is _QUEUED]
            heapq.heapify(pool.deadlines)

    def _estimate_wait(
        self,
        pool: _Pool,
        request: Request,
        limit_tokens: int,
        now: float,
        own_ahead: float | None,
    ) -> float:
        """Seconds until this request would start, from its position and the measured rate.

        Position, in weighted tokens: the work queued in the tiers above; in its own tier, its
        own work ahead of it (`own_ahead`, default: its agent's queue scaled by the agent's
        share of its tenant), plus what VTC serves the other tenants meanwhile: their share
        of that work (`own_ahead * others' weight / its weight`) and the lead its counter
        has over the smallest one, all capped by what they have queued. Then one mean gap
        between starts, for the slot to free.
        """
        tier = request.tier
        capacity = pool.capacity
        pause_s = max(0.0, capacity.blocked_until - now)
        ahead_live = sum(pool.tiers[t].live for t in Tier if t <= tier)
        if not ahead_live and capacity.admits(limit_tokens, now):
            return 0.0
        rate = pool.meter.rate(self._min_rate_sample_s) or capacity.limits.service_rate_hint
        if rate is None:
            return pause_s
        higher_work = sum(pool.tiers[t].work for t in Tier if t < tier)
        queue = pool.tiers[tier]
        tenant = queue.tenants.get(request.tenant)
        backlogged = tenant is not None and tenant.live > 0
        lead = 0.0
        own_work = 0.0
        if backlogged:
            assert tenant is not None
            own_work = tenant.work
            floor = queue.min_counter()
            lead = max(0.0, tenant.counter - floor) if floor is not None else 0.0
            if own_ahead is None:
                agent = tenant.agents.get(request.agent)
                agent_work = agent.work if agent is not None and agent.live else 0.0
                agent_share = (
                    tenant.agent_weight
                    if agent_work
                    else (tenant.agent_weight + request.agent_weight)
                )
                own_ahead = min(tenant.work, agent_work * agent_share / request.agent_weight)
        own_ahead = own_ahead or 0.0
        others_weight = queue.weight - request.tenant_weight if backlogged else queue.weight
        others = min(
            queue.work - own_work,
            (lead + own_ahead / request.tenant_weight) * max(others_weight, 0.0),
        )
        start_gap_s = self._start_gap_s(pool, request)
        return pause_s + (higher_work + own_ahead + max(others, 0.0)) / rate + start_gap_s

    def _start_gap_s(self, pool: _Pool, request: Request) -> float:
        """Mean time between starts; unmeasured, the time this request's work takes."""
        measured = pool.meter.gap_s()
        if measured:
            return measured
        rate = pool.meter.rate(self._min_rate_sample_s) or pool.capacity.limits.service_rate_hint
        if not rate:
            return 0.0
        cost = (
            request.input_weight * request.input_tokens
            + request.output_weight * request.output_tokens_est
        )
        return cost / rate

    def _shed(
        self,
        pool: _Pool,
        tier: Tier,
        reason: ShedReason,
        retry_after_s: float | None,
        wait_s: float | None = None,
    ) -> Shed:
        self._count_shed(pool, tier, reason)
        return Shed(reason, retry_after_s, wait_s)

    @staticmethod
    def _count_shed(pool: _Pool, tier: Tier, reason: ShedReason) -> None:
        sheds = pool.stats[tier].sheds
        sheds[reason.value] = sheds.get(reason.value, 0) + 1
