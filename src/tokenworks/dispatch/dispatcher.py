"""The scheduler and the capacity limits, in the relay's hot path.

`scheduler.py` and `capacity.py` are pure and synchronous; this module gives them a clock, a
future per waiting request and one timer, and turns their answers into what the relay needs:

    slot = dispatcher.start(call, candidates, index) or await dispatcher.acquire(...)
    ...upstream call...; slot.output(n) every few streamed chunks
    slot.finish(outcome, input_tokens, output_tokens)          # or slot.failed(upstream_error)

- **Fast path** (`start`, nothing waits): the first candidate whose breaker lets it through
  and whose producer has capacity (concurrency, rpm, tpm, no Retry-After pause) starts at
  once, in the caller's frame: no coroutine, no future, no timer, no task.
- **Slow path** (`acquire`): the request is queued on the first candidate whose breaker is
  not open (a shed there tries the next); it waits on a future that `poll` resolves when it
  starts or expires, while a watcher sees a client that hangs up (it leaves the queue at
  once). One timer calls `poll` at the scheduler's `next_wakeup()` (deadlines, rpm/tpm
  windows, pauses).
- **Outcomes** feed the producer's adaptive limit (429/529/503/timeouts cut it, Retry-After
  pauses it, successes grow it) and the deployment's circuit breaker.

Tenant = the key's account (the key itself when it has none), agent = the key; tier from the
request's `service_tier` (the key's default already applied); deadline from
`X-Tokenworks-Deadline-Ms` or the tier's default (`dispatch.deadline_ms`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from tokenworks.config import Config, Deployment
from tokenworks.dispatch.capacity import BreakerState, CircuitBreaker, Outcome, PoolLimits
from tokenworks.dispatch.errors import ClientGone, Shed, TooLargeForProducers
from tokenworks.dispatch.scheduler import Request, Scheduler, ShedReason, Ticket, TicketState, Tier
from tokenworks.dispatch.scheduler import Shed as SchedulerShed
from tokenworks.metrics import Metrics
from tokenworks.pricing.quote import Pricer, PricingError
from tokenworks.producers.openai_compat import UpstreamError

if TYPE_CHECKING:
    from tokenworks.dispatch.relay import Call

# The output a request without max_tokens is expected to produce, for the tpm reservation
# and queue estimates (corrected to the actual when it ends).
OUTPUT_ESTIMATE_TOKENS = 1024
BYTES_PER_TOKEN = 4  # the input estimate from the body's size: tokenizing would cost ~20 µs/KiB
OUTPUT_REPORT_CHUNKS = 16  # a stream reports its output to the scheduler every this many chunks
TENANTS_SHOWN = 50  # GET /admin/v1/dispatch lists the tenants served most, per producer

_TIERS = {"priority": Tier.PRIORITY, "flex": Tier.FLEX}
_TIER_NAMES = {t: t.name.lower() for t in Tier}
_CAPACITY = frozenset({Outcome.RATE_LIMITED, Outcome.OVERLOADED})
_RUNNING = TicketState.RUNNING
_CLOSED, _OPEN = BreakerState.CLOSED, BreakerState.OPEN
_SHED_CODES = {
    ShedReason.DEADLINE: "deadline_unmeetable",
    ShedReason.EXPIRED: "deadline_expired",
    ShedReason.QUEUE_FULL: "queue_full",
    ShedReason.TENANT_QUEUE_FULL: "tenant_queue_full",
}
_SHED_MESSAGES = {
    ShedReason.DEADLINE: "this request cannot start before its deadline (estimated from the "
    "queue ahead of it); try again later or with a later deadline",
    ShedReason.EXPIRED: "this request waited past its deadline without a producer free",
    ShedReason.QUEUE_FULL: "every producer for this model is at capacity and its queue is full",
    ShedReason.TENANT_QUEUE_FULL: "this account has too many requests waiting for this model",
}


def classify(exc: UpstreamError) -> Outcome:
    """What an upstream failure says about the producer: a capacity signal, a fault, or
    nothing (a 4xx about the request itself)."""
    status = exc.status
    if status == 429:
        return Outcome.RATE_LIMITED
    if status in (503, 529):
        return Outcome.OVERLOADED
    if exc.reason == "timeout" or status in (408, 504):
        return Outcome.TIMEOUT
    if exc.credentials_refused:
        return Outcome.ERROR  # the gateway's own key: every request there fails alike
    if status is not None and 400 <= status < 500:
        return Outcome.OK  # the deployment answered; the request was the problem
    return Outcome.ERROR


def deployment_key(deployment: Deployment) -> str:
    return f"{deployment.producer}/{deployment.model}"


class Slot:
    """A request started on a deployment: report its output, then finish it once."""

    __slots__ = ("deployment", "dispatcher", "index", "ticket")

    def __init__(
        self, dispatcher: Dispatcher, ticket: Ticket, deployment: Deployment, index: int
    ) -> None:
        self.dispatcher = dispatcher
        self.ticket = ticket
        self.deployment = deployment
        self.index = index  # its place in the candidates

    def output(self, tokens: int) -> None:
        """Output streamed so far (count it as it comes, every few chunks)."""
        self.dispatcher.scheduler.add_output(self.ticket, tokens)

    def finish(
        self,
        outcome: Outcome,
        input_tokens: int,
        output_tokens: int,
        retry_after_s: float | None = None,
    ) -> None:
        """The attempt ended (idempotent): free the slot, feed AIMD and the breaker."""
        if self.ticket.state is not _RUNNING:
            return
        dispatcher = self.dispatcher
        if dispatcher.scheduler.finish(
            self.ticket, input_tokens, output_tokens, outcome, retry_after_s
        ):  # others wait for this producer: one of them may start now
            dispatcher.poll(self.deployment.producer)

    def failed(self, exc: UpstreamError, candidates: int) -> int | None:
        """Finish after an upstream failure; the index of the candidate to try next (None:
        none). A capacity refusal of the last candidate tries it again, after its pause."""
        outcome = classify(exc)
        self.finish(outcome, 0, 0, exc.retry_after_s)
        if outcome in _CAPACITY and self.index == candidates - 1:
            return self.index
        following = self.index + 1
        return following if following < candidates else None

    def cancel(self) -> None:
        """The client went away or something broke: finished as cancelled (idempotent)."""
        self.finish(Outcome.CANCELLED, self.ticket.request.input_tokens, self.ticket.output_tokens)


class Dispatcher:
    """One per gateway: a pool per producer, a breaker per deployment, waiting futures."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        pricer: Pricer | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        settings = config.dispatch
        self.clock = clock  # perf_counter: a call's arrival (`Call.started_s`) is on it
        deadlines = settings.deadline_ms
        self.deadline_s = {
            Tier.PRIORITY: deadlines.priority / 1000,
            Tier.STANDARD: deadlines.standard / 1000,
            Tier.FLEX: deadlines.flex / 1000,
        }
        self.scheduler = Scheduler(
            clock,
            priority_burst=settings.priority_burst,
            flex_burst=settings.flex_burst,
            tenant_queue_cap=settings.tenant_queue_cap,
            pool_queue_cap=settings.pool_queue_cap,
            total_queue_cap=settings.total_queue_cap,
        )
        b = settings.breaker
        self.scheduler._breaker_factory = lambda: CircuitBreaker(
            consecutive_failures=b.consecutive_failures,
            error_rate=b.error_rate,
            window=b.window,
            min_volume=b.min_volume,
            open_s=b.open_s,
            max_open_s=b.max_open_s,
            probes=b.probes,
        )
        for producer in config.producers:
            self.scheduler.add_pool(
                producer.name,
                PoolLimits(
                    max_concurrency=producer.max_concurrency,
                    rpm=producer.rpm,
                    tpm=producer.tpm,
                    initial_concurrency=settings.initial_concurrency,
                ),
            )
        self.breakers: dict[str, CircuitBreaker] = {}
        # By the config's deployment objects (the router hands out the same ones): the hot
        # path looks a breaker up without formatting its name.
        self._by_id: dict[int, tuple[str, CircuitBreaker]] = {}
        for model in config.models:
            for d in model.deployments:
                key = deployment_key(d)
                self.breakers[key] = self.scheduler.breaker(key)
                self._by_id[id(d)] = (key, self.breakers[key])
        # Fairness counts money-equivalent tokens: output weighs its price over input's.
        self.output_weight = {m.name: _output_weight(pricer, m.name) for m in config.models}
        self.metrics = metrics
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # -- the router's view -----------------------------------------------------------------

    def available(self, deployment: Deployment) -> bool:
        """Not behind an open breaker (half-open counts: it wants its probe)."""
        _, breaker = self._lookup(deployment)
        return breaker.state_ is _CLOSED or breaker.state(self.clock()) is not _OPEN

    def _lookup(self, deployment: Deployment) -> tuple[str, CircuitBreaker]:
        found = self._by_id.get(id(deployment))
        if found is None:  # a deployment object the config did not hold (tests)
            key = deployment_key(deployment)
            found = (key, self.breakers.get(key) or self.scheduler.breaker(key))
        return found

    # -- admission -------------------------------------------------------------------------

    def wait_bound_s(self, call: Call) -> float:
        """The longest this call may wait for a producer in all (its deadline)."""
        if call.deadline_ms is not None:
            return call.deadline_ms / 1000
        return self.deadline_s[_TIERS.get(call.service_tier or "", Tier.STANDARD)]

    def _request(self, call: Call) -> Request:
        tier = _TIERS.get(call.service_tier or "", Tier.STANDARD)
        key = call.key
        deadline_ms = call.deadline_ms
        wait_s = deadline_ms / 1000 if deadline_ms is not None else self.deadline_s[tier]
        bound = call.max_output_tokens
        output_est = bound if bound < OUTPUT_ESTIMATE_TOKENS else OUTPUT_ESTIMATE_TOKENS
        body_tokens = call.body_bytes // BYTES_PER_TOKEN
        # Positional: a keyword call costs ~40 % more, and this runs on every request.
        return Request(
            key.account_id or key.id,  # tenant
            key.id,  # agent
            body_tokens if body_tokens > 0 else 1,  # input_tokens
            output_est,  # output_tokens_est
            tier,
            1.0,  # input_weight
            self.output_weight.get(call.route.model.name, 1.0),  # output_weight
            1.0,  # tenant_weight
            1.0,  # agent_weight
            call.started_s + wait_s,  # deadline
            None,  # deployment
            None,  # limit_tokens
            call.stream,  # streamed
        )

    def start(self, call: Call, candidates: list[Deployment], index: int) -> Slot | None:
        """The fast path: start the call at once on the first of `candidates[index:]` whose
        breaker lets it through and whose producer has capacity; None: `acquire` waits.
        Synchronous, so a call that never waits costs no coroutine."""
        request = self._request(call)
        for i in range(index, len(candidates)):
            d = candidates[i]
            key, breaker = self._lookup(d)
            if breaker.state_ is not _CLOSED and not breaker.try_acquire(self.clock()):
                continue
            request.deployment = key
            ticket = self.scheduler.start_now(d.producer, request)
            if ticket is not None:
                return Slot(self, ticket, d, i)
            breaker.release()  # a half-open probe that did not go
        return None

    async def acquire(self, call: Call, candidates: list[Deployment], index: int) -> Slot:
        """The slow path, when `start` found no capacity: the call waits in the first available
        candidate's queue (a shed there tries the next). Raises `Shed` (429), `ClientGone`
        (499) or `TooLargeForProducers` (400)."""
        scheduler = self.scheduler
        order = [i for i in range(index, len(candidates)) if self.available(candidates[i])]
        shed: SchedulerShed | None = None
        for i in order or [index]:
            d = candidates[i]
            request = self._request(call)
            request.deployment = self._lookup(d)[0]
            admitted = scheduler.admit(d.producer, request)
            if isinstance(admitted, SchedulerShed):
                if shed is None or shed.reason is ShedReason.TOO_LARGE:
                    shed = admitted
                continue
            return await self._wait(call, admitted, d, i)
        assert shed is not None
        raise _refusal(shed)

    async def _wait(self, call: Call, ticket: Ticket, deployment: Deployment, index: int) -> Slot:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[ticket.id] = future
        self.poll(deployment.producer)
        watcher: asyncio.Future[Any] | None = None
        try:
            if not future.done():
                waits: set[asyncio.Future[Any]] = {future}
                if call.receive is not None:
                    watcher = asyncio.ensure_future(_disconnected(call.receive))
                    waits.add(watcher)
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                # Gone, even if it started in the same instant: its disconnect message is read
                # now, so nothing later would see it.
                if watcher is not None and watcher.done():
                    raise ClientGone("the client closed the connection while its request waited")
        except BaseException:
            self._waiting.pop(ticket.id, None)
            self._abandon(ticket)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if ticket.state is _RUNNING:
            assert ticket.wait_s is not None
            call.queue_ms = round(ticket.wait_s * 1000, 3)
            self.metrics.queue_waited(
                deployment.producer, _TIER_NAMES[ticket.request.tier], ticket.wait_s
            )
            return Slot(self, ticket, deployment, index)
        # Expired: its deadline came before a producer was free.
        raise Shed(_SHED_MESSAGES[ShedReason.EXPIRED], _SHED_CODES[ShedReason.EXPIRED], 1.0)

    def _abandon(self, ticket: Ticket) -> None:
        """Leave the queue (or, started just now, give the slot back)."""
        self.scheduler.cancel(ticket)
        self.poll(ticket.pool)

    # -- waking waiters ----------------------------------------------------------------------

    def poll(self, pool: str | None = None) -> None:
        """Start what capacity allows, wake those tickets' waiters, re-arm the timer."""
        for ticket in self.scheduler.poll(pool):
            future = self._waiting.pop(ticket.id, None)
            if future is not None and not future.done():
                future.set_result(None)
            elif ticket.state is TicketState.RUNNING:  # its waiter is gone: give it back
                self.scheduler.cancel(ticket)
        self._arm()

    def _arm(self) -> None:
        at = self.scheduler.next_wakeup()
        timer = self._timer
        if at is None:
            if timer is not None:
                timer.cancel()
                self._timer = None
            return
        if timer is not None:
            if self._timer_at <= at:
                return  # fires first; re-arms then
            timer.cancel()
        self._timer_at = at
        delay_s = max(0.0, at - self.clock())
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.poll(None)

    # -- observability ---------------------------------------------------------------------

    def snapshot(self, tenants_shown: int | None = TENANTS_SHOWN) -> dict[str, Any]:
        """The live state: queues by producer and tier, limits, breakers, served tokens."""
        state = self.scheduler.snapshot()
        pools: dict[str, Any] = state["pools"]  # type: ignore[assignment]
        for name, pool in pools.items():
            served = self.scheduler.served(name)
            top = sorted(served.items(), key=lambda kv: -kv[1])
            pool["served_weighted_tokens"] = dict(
                top if tenants_shown is None else top[:tenants_shown]
            )
        state["waiting"] = len(self._waiting)
        return state

    def health(self) -> dict[str, dict[str, Any]]:
        """Per producer: whether any of its deployments is closed, and each breaker."""
        now = self.clock()
        out: dict[str, dict[str, Any]] = {}
        for key, breaker in sorted(self.breakers.items()):
            producer, _, model = key.partition("/")
            entry = out.setdefault(producer, {"healthy": False, "deployments": {}})
            snapshot = breaker.snapshot(now)
            entry["deployments"][model] = snapshot
            if snapshot["state"] != BreakerState.OPEN.value:
                entry["healthy"] = True
        return out


def _refusal(shed: SchedulerShed) -> Exception:
    if shed.reason is ShedReason.TOO_LARGE:
        return TooLargeForProducers(
            "this request's tokens exceed the tokens per minute of every producer that could "
            "serve it; lower max_tokens or the prompt"
        )
    return Shed(_SHED_MESSAGES[shed.reason], _SHED_CODES[shed.reason], shed.retry_after_s)


async def _disconnected(receive: Callable[[], Awaitable[Mapping[str, Any]]]) -> None:
    """Returns when the client hangs up (its body was read already, so nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _output_weight(pricer: Pricer | None, model: str) -> float:
    """Output price over input price of the model's first deployment (1 when unknown)."""
    if pricer is None:
        return 1.0
    with contextlib.suppress(PricingError, ValueError, ZeroDivisionError):
        input_price, output_price = pricer.list_price(model)
        ratio = Fraction(output_price) / Fraction(input_price)
        return float(ratio) if ratio > 0 else 1.0
    return 1.0
