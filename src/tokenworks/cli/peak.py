"""The demo's peak hour: scarce capacity shared by tenants who want different things.

Beside acme's agents, on model `chat` (the cheap producer first, premium second): a
swarm tenant keeps many requests open from many agent keys, a vip key on the `priority`
tier asks one thing at a time, a batch key on `flex` keeps a few requests waiting, and the
swarm's own urgent call carries a tight `X-Tokenworks-Deadline-Ms`. The cheap producer is at
its peak: 8 slots, no queue, and a 429 with Retry-After beyond them; its limit is not
configured, so the gateway learns it. The summary shows what the scheduler made of it: fair
shares, failovers, sheds, the learned limit, queue wait by tier and what each tier paid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from rich import box
from rich.table import Table

from tokenworks.cli.tables import money_column
from tokenworks.money import format_nano
from tokenworks.sim.profile import PROFILES, SimProfile

PEAK_MODEL = "chat"
PEAK_PRODUCER = "cheap"  # the one at its peak
SPILL_PRODUCER = "premium"  # where the work it cannot take goes
PEAK_CREDIT = "20.00"
SWARM_AGENTS = 10
SWARM_STREAMS = 4  # requests each swarm agent keeps open
BATCH_STREAMS = 4
VIP_PAUSE_S = 0.3  # between the vip's requests: one person, not a fleet
URGENT_EVERY_S = 1.0
URGENT_DEADLINE_MS = 100  # the swarm's urgent call: start within 100 ms or not at all
FAILED_PAUSE_S = 0.5
MAX_CALLS = 100_000  # bounds every loop; the demo's stop ends them long before
# Plain answers (not streams), short: the demo stays light on CPU, and what queues behind
# the cheap producer at the end drains in seconds.
MAX_TOKENS = (20, 80)
# The vip paid for speed: its requests go to the premium producer first (OpenRouter's
# `provider.order`), and on the priority tier they start first where they wait.
VIP_PROVIDER = {"order": [SPILL_PRODUCER]}
# The swarm's urgent call will pay no more than the cheap producer's price (per million
# tokens; premium's is dearer), so only cheap may serve it, and its deadline is tight.
URGENT_PROVIDER = {"max_price": {"prompt": "0.40", "completion": "1.50"}}
SHED_CODES = frozenset({"deadline_unmeetable", "deadline_expired", "queue_full",
                        "tenant_queue_full"})  # fmt: skip
TIERS = ("priority", "standard", "flex")
TENANTS_SHOWN = 8  # acme's four users and the three peak-hour tenants fit


def cheap_at_peak() -> SimProfile:
    """The sim's cheap profile at its peak all day: 8 slots and no queue, so a request beyond
    them is refused at once with 429 and Retry-After 2 s, as a budget provider's
    "insufficient computing power"."""
    return replace(PROFILES["cheap"], queue_max=0, retry_after_s=2, peak_hours=(0, 24))


@dataclass
class RoleTally:
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)  # error codes of what was refused
    upstream_429s: int = 0  # 429s that were not the scheduler's own sheds


Admin = Callable[[str, str, Any], Awaitable[Any]]


class PeakHour:
    """The peak hour's tenants, calling the gateway until `stop` is set."""

    def __init__(
        self, url: str, session: aiohttp.ClientSession, admin: Admin, stop: asyncio.Event
    ) -> None:
        self.url, self.session, self.admin, self.stop = url, session, admin, stop
        self.random = random.Random(11)
        self.accounts: dict[str, int] = {}
        self.keys: dict[str, str] = {}
        self.tally: dict[str, RoleTally] = {r: RoleTally() for r in ("swarm", "vip", "batch",
                                                                     "urgent")}  # fmt: skip

    async def setup(self) -> None:
        for name in ("swarm", "vip", "batch"):
            new = {"name": name, "kind": "organisation", "idempotency_key": f"acct:{name}"}
            account = int((await self.admin("POST", "/admin/v1/accounts", new))["id"])
            self.accounts[name] = account
            await self.admin(
                "POST", f"/admin/v1/accounts/{account}/topups",
                {"amount": PEAK_CREDIT, "idempotency_key": f"topup:{name}"},
            )  # fmt: skip
        keys: list[tuple[str, str, str | None]] = [
            (f"swarm-agent-{i}", "swarm", None) for i in range(SWARM_AGENTS)
        ]
        keys += [("swarm-urgent", "swarm", None), ("vip", "vip", "priority"),
                 ("batch", "batch", "flex")]  # fmt: skip
        for name, owner, tier in keys:
            body: dict[str, Any] = {"name": name, "account": self.accounts[owner]}
            if tier is not None:
                body["service_tier"] = tier
            self.keys[name] = str((await self.admin("POST", "/admin/v1/keys", body))["key"])

    def tasks(self) -> list[asyncio.Task[None]]:
        jobs = [
            self._loop("swarm", f"swarm-agent-{i}", 0.0)
            for i in range(SWARM_AGENTS)
            for _ in range(SWARM_STREAMS)
        ]
        jobs += [self._loop("batch", "batch", 0.0) for _ in range(BATCH_STREAMS)]
        jobs += [self._loop("vip", "vip", VIP_PAUSE_S)]
        jobs += [self._loop("urgent", "swarm-urgent", URGENT_EVERY_S, URGENT_DEADLINE_MS)]
        return [asyncio.create_task(job) for job in jobs]

    async def _loop(self, role: str, key: str, pause_s: float, deadline_ms: int = 0) -> None:
        for _ in range(MAX_CALLS):
            if self.stop.is_set():
                return
            if pause_s:
                await self._pause(pause_s)
                if self.stop.is_set():
                    return
            if not await self._call(role, key, deadline_ms):
                await self._pause(FAILED_PAUSE_S)  # as a client backs off; never a busy loop

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def _call(self, role: str, name: str, deadline_ms: int) -> bool:
        """One request; whether it was served."""
        tally = self.tally[role]
        headers = {
            "Authorization": f"Bearer {self.keys[name]}",
            "X-Tokenworks-Tags": f"role={role}",
        }
        if deadline_ms:
            headers["X-Tokenworks-Deadline-Ms"] = str(deadline_ms)
        body: dict[str, Any] = {
            "model": PEAK_MODEL,
            "messages": [{"role": "user", "content": f"{name}: next item, please."}],
            "max_tokens": self.random.randint(*MAX_TOKENS),
        }
        if role == "vip":
            body["provider"] = VIP_PROVIDER
        elif role == "urgent":
            body["provider"] = URGENT_PROVIDER
        tally.requests += 1
        try:
            async with self.session.post(
                f"{self.url}/v1/chat/completions", json=body, headers=headers
            ) as r:
                data = await r.read()
                tally.statuses[r.status] = tally.statuses.get(r.status, 0) + 1
                if r.status != 200:
                    code = "unknown"
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        code = str(json.loads(data)["error"]["code"])
                    tally.codes[code] = tally.codes.get(code, 0) + 1
                    if r.status == 429 and code not in SHED_CODES:
                        tally.upstream_429s += 1
                return r.status == 200
        except (TimeoutError, aiohttp.ClientError):
            tally.statuses[0] = tally.statuses.get(0, 0) + 1
            return False

    def line(self) -> str:
        """One line (80 columns at most) for the live screen."""
        t = self.tally
        shed = sum(n for code, n in t["urgent"].codes.items() if code in SHED_CODES)
        return (
            f"peak: swarm {t['swarm'].requests:,}, vip {t['vip'].requests:,} priority, "
            f"batch {t['batch'].requests:,} flex, {shed:,}/{t['urgent'].requests:,} urgent shed"
        )

    def upstream_429s_seen_by_clients(self) -> int:
        """Refusals that reached a peak tenant other than the scheduler's own sheds."""
        return sum(t.upstream_429s for t in self.tally.values())


def fair_shares(state: dict[str, Any], names: dict[str, str]) -> list[tuple[str, float]]:
    """Served weighted tokens per tenant (account), summed over the producers' pools."""
    served: dict[str, float] = {}
    for pool in state.get("pools", {}).values():
        for tenant, tokens in pool.get("served_weighted_tokens", {}).items():
            label = names.get(str(tenant), str(tenant))
            served[label] = served.get(label, 0.0) + float(tokens)
    return sorted(served.items(), key=lambda kv: -kv[1])


def sheds(state: dict[str, Any]) -> dict[str, int]:
    """The scheduler's refusals by reason, over every pool and tier."""
    out: dict[str, int] = {}
    for pool in state.get("pools", {}).values():
        for tier in pool.get("tiers", {}).values():
            for reason, n in tier.get("sheds", {}).items():
                out[reason] = out.get(reason, 0) + int(n)
    return out


def live_lines(state: dict[str, Any], names: dict[str, str]) -> list[str]:
    """Four short lines (36 columns at most) for the live screen, under the producers."""
    capacity = state.get("pools", {}).get(PEAK_PRODUCER, {}).get("capacity", {})
    queued = {tier: 0 for tier in TIERS}
    for pool in state.get("pools", {}).values():
        for tier in TIERS:
            queued[tier] += int(pool.get("tiers", {}).get(tier, {}).get("queued", 0))
    shares = fair_shares(state, names)
    total = sum(v for _, v in shares) or 1.0
    top = f"{shares[0][0][:10]} {100 * shares[0][1] / total:.0f}%" if shares else "-"
    shed = sheds(state)
    deadline = sum(n for r, n in shed.items() if r.startswith("deadline"))
    return [
        f"{PEAK_PRODUCER} limit {capacity.get('concurrency_limit', '-')} learned, "
        f"{capacity.get('adaptive_cuts', 0)} cuts",
        f"queued {queued['priority']} prio {queued['standard']} std {queued['flex']} flex",
        f"shed {sum(shed.values())}, {deadline} at deadline",
        f"top share {top} of {len(shares)}",
    ]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def by_tier(records: Iterable[Any]) -> list[dict[str, Any]]:
    """Queue wait (usage rows' `queue_ms`) and what was paid, per service tier, over the
    requests that were served."""
    waits: dict[str, list[float]] = {tier: [] for tier in TIERS}
    paid: dict[str, int] = dict.fromkeys(TIERS, 0)
    tokens: dict[str, int] = dict.fromkeys(TIERS, 0)
    for r in records:
        if r.status >= 400:
            continue
        tier = r.service_tier if r.service_tier in waits else "standard"
        waits[tier].append(float(r.queue_ms or 0.0))
        paid[tier] += int(r.price_nano)
        tokens[tier] += int(r.usage.input_tokens) + int(r.usage.output_tokens)
    return [
        {
            "tier": tier,
            "served": len(waits[tier]),
            "wait_ms_p50": round(_percentile(waits[tier], 0.5), 1),
            "wait_ms_p95": round(_percentile(waits[tier], 0.95), 1),
            "wait_ms_max": round(max(waits[tier], default=0.0), 1),
            "paid_nano": paid[tier],
            "tokens": tokens[tier],
            # Per million tokens, input and output together: the tier's multiplier shows
            # here, whatever the size of its requests.
            "paid_per_mtok_nano": paid[tier] * 10**6 // tokens[tier] if tokens[tier] else 0,
        }
        for tier in TIERS
    ]


def summary(
    peak: PeakHour,
    state: dict[str, Any],
    records: list[Any],
    names: dict[str, str],
    refused_upstream: int,
    currency: str,
) -> tuple[list[Any], dict[str, Any]]:
    """The peak hour's tables and lines for the end of the demo, and the report's section."""
    capacity = state["pools"][PEAK_PRODUCER]["capacity"]
    failovers = sum(
        1
        for r in records
        if r.public_model == PEAK_MODEL
        and r.producer == SPILL_PRODUCER
        and r.status < 400
        and r.tags.get("role") != "vip"  # it asks for premium first: not a failover
    )
    shed = sheds(state)
    shares = fair_shares(state, names)
    tiers = by_tier(records)
    report = {
        "refused_by_cheap": refused_upstream,
        "upstream_429s_seen_by_clients": peak.upstream_429s_seen_by_clients(),
        "failovers": failovers,
        "sheds": shed,
        "cheap_limit_learned": capacity["concurrency_limit"],
        "cheap_limit_cuts": capacity["adaptive_cuts"],
        "fair_shares": dict(shares),
        "tiers": tiers,
        "roles": {
            role: {"requests": t.requests, "statuses": t.statuses, "codes": t.codes}
            for role, t in peak.tally.items()
        },
    }
    lines = [
        f"peak hour: {PEAK_PRODUCER} refused {refused_upstream:,} attempts (429); clients saw "
        f"{report['upstream_429s_seen_by_clients']:,} of them",
        f"failovers: {failovers:,} {PEAK_MODEL} requests served by {SPILL_PRODUCER} while "
        f"{PEAK_PRODUCER} was full",
        f"{PEAK_PRODUCER}'s concurrency limit learned: {capacity['concurrency_limit']} "
        f"({capacity['adaptive_cuts']} cuts; it has {cheap_at_peak().slots} slots)",
        "shed: " + (", ".join(f"{n:,} {reason}" for reason, n in sorted(shed.items())) or "none"),
    ]
    share = Table(
        title="fair shares", box=box.SIMPLE_HEAD, pad_edge=False,
        show_edge=False, title_justify="left",
    )  # fmt: skip
    for column in ("tenant", "served weighted tokens", "share"):
        share.add_column(column, justify="left" if column == "tenant" else "right")
    total = sum(v for _, v in shares) or 1.0
    for tenant, tokens in shares[:TENANTS_SHOWN]:
        share.add_row(tenant, f"{tokens:,.0f}", f"{100 * tokens / total:.1f}%")
    tier_table = Table(
        title="queue wait and price by tier", box=box.SIMPLE_HEAD, pad_edge=False,
        show_edge=False, title_justify="left",
    )  # fmt: skip
    for column in ("tier", "served", "p50 ms", "p95 ms", "max ms", f"paid {currency}",
                   "per Mtok"):  # fmt: skip
        tier_table.add_column(column, justify="left" if column == "tier" else "right")
    paid = money_column(format_nano(t["paid_nano"]) for t in tiers)
    each = money_column(format_nano(t["paid_per_mtok_nano"]) for t in tiers)
    for t, total_paid, per in zip(tiers, paid, each, strict=True):
        tier_table.add_row(
            t["tier"], f"{t['served']:,}", f"{t['wait_ms_p50']:,.0f}", f"{t['wait_ms_p95']:,.0f}",
            f"{t['wait_ms_max']:,.0f}", total_paid, per,
        )  # fmt: skip
    return [*lines, share, tier_table], report
