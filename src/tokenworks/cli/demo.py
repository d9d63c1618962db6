"""`tokenworks demo`: the token burn of the agent era in miniature, on the embedded default.

Three simulated producers (fast, cheap, slow), the gateway on SQLite, and an organisation:
it funds two teams, each employee gets a monthly allowance, and each employee runs agents
with a daily limit. Every agent works through tasks, each a loop of calls whose context grows
with every turn; some tasks spawn sub-agents on keys with budgets delegated from the agent's.
One agent runs away (huge answers, never stops) and is stopped at its limit with a 402. The
terminal shows live progress; the end is a summary of tokens and money by agent, model,
producer and account, also written to `demo-report/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import string
import time
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tokenworks.app import build_app
from tokenworks.cli import peak as peak_hour
from tokenworks.cli.admin import request
from tokenworks.cli.tables import money_column
from tokenworks.config import loads
from tokenworks.money import format_nano
from tokenworks.server import serve_in_thread
from tokenworks.sim import build_app as build_sim

ADMIN_KEY = "demo-admin-key"
AGENTS_PER_EMPLOYEE = 3
ORG_CREDIT = "20.00"
TEAMS = {"platform": ("alice", "bob"), "research": ("carol", "dave")}
TEAM_MONTHLY_BUDGET = "6.00"
ALLOWANCE = "1.50"  # per employee per month, rolls over up to 0.50
AGENT_DAILY_LIMIT = "0.40"
SUBAGENT_LIMIT = "0.02"
RUNAWAY_DAILY_LIMIT = "0.01"
RUNAWAY_MAX_TURNS = 10_000  # bounded; its limit stops it long before
MAX_SUBAGENTS_PER_TASK = 3
MAX_TURNS_PER_TASK = 6
MAX_CONTEXT_MESSAGES = 24
REQUEST_TIMEOUT_S = 60
REPORT_DIR = Path("demo-report")  # the report and the database, kept after the demo
TOP_AGENTS = 5  # agents on the live screen and in the summary (all of them in the report)
POLL_S = 1.0  # how often the live screen asks the gateway and producers for fresh figures
CURRENCY = "USD"  # demo.yaml's ledger currency (pricing's default)
NANO = 1_000_000_000


TOPICS = (
    "refactor the billing module",
    "write tests for the scheduler",
    "summarise yesterday's incidents",
    "plan the data migration",
    "review the pull request on caching",
    "draft the quarterly report",
)


@dataclass
class Tally:
    requests: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    subagents: int = 0
    tasks: int = 0
    refused: int = 0
    runaway_spent: str = "0"
    runaway_stopped_after: int | None = None
    by_status: dict[int, int] = field(default_factory=dict)
    spent_nano: int = 0  # what the answers said they were charged (`usage.cost`)


@dataclass
class Snapshot:
    """What the live screen shows besides the fleet's own counters, polled from the gateway
    (balances, spend per agent) and the simulated producers (what each one received)."""

    accounts: list[tuple[str, str, str]] = field(default_factory=list)  # name, available, spent
    producers: list[tuple[str, int, int, int, int]] = field(default_factory=list)
    agents: list[tuple[str, int, str]] = field(default_factory=list)  # name, requests, spent
    agent_count: int = 0
    peak: list[str] = field(default_factory=list)  # the peak hour, from /admin/v1/dispatch
    peak_tenants: str = ""  # what the peak hour's tenants asked and got


class Fleet:
    """Agents calling the gateway like real coding agents do: long loops, growing context."""

    def __init__(self, gateway_url: str, session: aiohttp.ClientSession, seed: int = 7) -> None:
        self.url = gateway_url
        self.session = session
        self.random = random.Random(seed)
        self.tally = Tally()
        self.stop = asyncio.Event()
        self.accounts: dict[str, int] = {}  # name -> ledger account id
        self.keys: dict[str, str] = {}  # agent name -> key secret

    async def setup_organisation(self) -> None:
        """acme > teams > employees: cash at the top, team budgets, monthly allowances."""

        async def account(name: str, parent: int | None, kind: str) -> int:
            body = {"name": name, "parent": parent, "kind": kind, "idempotency_key": f"acct:{name}"}
            self.accounts[name] = int((await self.admin("POST", "/admin/v1/accounts", body))["id"])
            return self.accounts[name]

        org = await account("acme", None, "organisation")
        await self.admin(
            "POST", f"/admin/v1/accounts/{org}/topups",
            {"amount": ORG_CREDIT, "idempotency_key": "topup:acme"},
        )  # fmt: skip
        for team, people in TEAMS.items():
            team_id = await account(team, org, "team")
            budget = {"amount": TEAM_MONTHLY_BUDGET, "period": "month"}
            await self.admin(
                "POST", f"/admin/v1/accounts/{team_id}/budgets",
                {**budget, "idempotency_key": f"budget:{team}"},
            )  # fmt: skip
            for person in people:
                user = await account(person, team_id, "user")
                await self.admin(
                    "POST", f"/admin/v1/accounts/{user}/grants",
                    {"amount": ALLOWANCE, "recurring": {"period": "month", "tz": "Europe/Berlin"},
                     "rollover": "0.50", "idempotency_key": f"allowance:{person}"},
                )  # fmt: skip

    async def new_agent_key(self, name: str, owner: str, limit: str) -> str:
        body = {"name": name, "account": self.accounts[owner],
                "limit": {"amount": limit, "period": "day"}}  # fmt: skip
        key = str((await self.admin("POST", "/admin/v1/keys", body))["key"])
        self.keys[name] = key
        return key

    async def spawn(self, parent_key: str, name: str) -> str | None:
        """A sub-agent key, its budget carved out of the parent key's room."""
        async with self.session.post(
            f"{self.url}/v1/keys",
            json={"name": name, "limit": {"amount": SUBAGENT_LIMIT}, "ttl_s": 3600},
            headers={"Authorization": f"Bearer {parent_key}"},
        ) as r:
            if r.status != 201:
                return None  # the parent has no room left to delegate
            return str((await r.json())["key"])

    async def admin(self, method: str, path: str, body: Any | None = None) -> Any:
        async with self.session.request(
            method,
            f"{self.url}{path}",
            json=body,
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as r:
            r.raise_for_status()
            return await r.json()

    async def call(
        self,
        key: str,
        model: str,
        messages: list[dict[str, str]],
        agent: str,
        max_tokens: int | None = None,
    ) -> str | None:
        """One turn; None when the gateway refused it for lack of budget (402)."""
        stream = self.random.random() < 0.5
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens or self.random.randint(16, 160),
            "stream": stream,
            "user": agent,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        headers = {"Authorization": f"Bearer {key}", "X-Tokenworks-Tags": f"agent={agent}"}
        self.tally.requests += 1
        try:
            async with self.session.post(
                f"{self.url}/v1/chat/completions", json=body, headers=headers
            ) as r:
                self.tally.by_status[r.status] = self.tally.by_status.get(r.status, 0) + 1
                if r.status == 402:
                    self.tally.refused += 1
                    await r.read()
                    return None
                if r.status != 200:
                    self.tally.failures += 1
                    await r.read()
                    return ""
                if not stream:
                    data = await r.json()
                    self._count(data.get("usage"))
                    return str(data["choices"][0]["message"]["content"])
                parts: list[str] = []
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    self._count(chunk.get("usage"))
                    for choice in chunk.get("choices") or ():
                        parts.append(choice["delta"].get("content") or "")
                return "".join(parts)
        except (TimeoutError, aiohttp.ClientError):
            self.tally.failures += 1
            return ""

    def _count(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.tally.input_tokens += int(usage.get("prompt_tokens") or 0)
            self.tally.output_tokens += int(usage.get("completion_tokens") or 0)
            with contextlib.suppress(ValueError, TypeError, ArithmeticError):
                self.tally.spent_nano += int(Decimal(str(usage.get("cost") or 0)) * NANO)

    async def task(self, key: str, agent: str, depth: int) -> None:
        """One task: a loop of turns with growing context; may spawn sub-agents."""
        self.tally.tasks += 1
        topic = self.random.choice(TOPICS)
        model = self.random.choice(("chat-fast", "chat-fast", "chat-cheap", "reasoner"))
        messages = [
            {"role": "system", "content": f"You are {agent}, a coding agent."},
            {"role": "user", "content": f"Please {topic}."},
        ]
        for turn in range(self.random.randint(2, MAX_TURNS_PER_TASK)):
            if self.stop.is_set():
                return
            reply = await self.call(key, model, messages, agent)
            if reply is None:
                return  # out of budget: the task stops here
            messages.append({"role": "assistant", "content": reply})
            messages.append({"role": "user", "content": f"Tool output for step {turn}: ok."})
            del messages[2 : max(2, len(messages) - MAX_CONTEXT_MESSAGES)]
            if depth == 0 and turn == 1 and self.random.random() < 0.4:
                count = self.random.randint(1, MAX_SUBAGENTS_PER_TASK)
                subs = []
                for _ in range(count):
                    name = f"{agent}/sub-{self.tally.subagents}"
                    sub_key = await self.spawn(key, name)
                    if sub_key is not None:
                        self.tally.subagents += 1
                        subs.append(self.task(sub_key, name, depth + 1))
                await asyncio.gather(*subs)

    async def agent(self, name: str, owner: str) -> None:
        key = await self.new_agent_key(name, owner, AGENT_DAILY_LIMIT)
        while not self.stop.is_set():
            await self.task(key, name, 0)
            await asyncio.sleep(0)

    async def runaway(self) -> None:
        """An agent stuck in a loop, asking for huge answers until its limit stops it."""
        name = "runaway"
        key = await self.new_agent_key(name, "dave", RUNAWAY_DAILY_LIMIT)
        messages = [{"role": "user", "content": "Keep going. Never stop."}]
        for turn in range(RUNAWAY_MAX_TURNS):
            if self.stop.is_set():
                return
            reply = await self.call(key, "reasoner", messages, name, max_tokens=600)
            if reply is None:
                self.tally.runaway_stopped_after = turn  # answered turns before the 402
                return
            messages.append({"role": "assistant", "content": reply[-2000:]})
            messages.append({"role": "user", "content": "More."})


def _table(title: str) -> Table:
    return Table(
        title=title or None,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        title_justify="left",
    )


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def runaway_line(turns: int) -> str:
    return f"runaway agent: stopped by its {RUNAWAY_DAILY_LIMIT} daily limit (402) after " + (
        _plural(turns, "answered turn")
    )


def screen(
    tally: Tally, snap: Snapshot, elapsed_s: float, duration_s: float | None, currency: str
) -> Group:
    """The live view, in 80x24: the fleet, then balances beside producers and the peak hour,
    then the top agents by spend."""
    t = tally
    if duration_s:  # the last turns drain after the end: the clock stops at it
        elapsed_s = min(elapsed_s, duration_s)
    title = f"tokenworks demo  {elapsed_s:5.1f}s" + (f" of {duration_s:.0f}s" if duration_s else "")
    served = t.requests - t.refused - t.failures
    fleet = (
        f"{_plural(t.requests, 'request')}: {served:,} served, {t.refused:,} refused (402), "
        f"{t.failures:,} failed\n"
        f"{_plural(t.tasks, 'task')}, {_plural(t.subagents, 'sub-agent')}; "
        f"tokens {t.input_tokens:,} in, {t.output_tokens:,} out; "
        f"spent {money_column([format_nano(t.spent_nano)])[0]} {currency}"
    ) + (f"\n{snap.peak_tenants}" if snap.peak_tenants else "")
    accounts = Table(
        title="balances", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title_justify="left"
    )
    accounts.add_column("account")
    accounts.add_column(f"avail {currency}", justify="right")
    accounts.add_column("spent", justify="right")
    for name, available, spent in snap.accounts:
        accounts.add_row(name, *money_column([available]), *money_column([spent]))
    producers = Table(
        title="producers",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        title_justify="left",
    )
    for column in ("producer", "got", "served", "429", "busy"):
        producers.add_column(column, justify="left" if column == "producer" else "right")
    for name, got, completed, rejected, active in snap.producers:
        producers.add_row(name, f"{got:,}", f"{completed:,}", f"{rejected:,}", f"{active:,}")
    agents = _table("")
    agents.add_column(f"top agents by spend ({snap.agent_count} in all)")
    agents.add_column("requests", justify="right")
    agents.add_column(f"spent {currency}", justify="right")
    spent_cells = money_column(a[2] for a in snap.agents)
    for (name, requests, _), spent in zip(snap.agents, spent_cells, strict=True):
        agents.add_row(name, f"{requests:,}", spent)
    grid = Table.grid(padding=(0, 4))
    grid.add_row(accounts, Group(producers, Text("\n".join(snap.peak), no_wrap=True)))
    parts: list[Any] = [Text(title, style="bold"), Text(fleet), grid, agents]
    if t.runaway_stopped_after is not None:
        parts.append(Text(runaway_line(t.runaway_stopped_after)))
    return Group(*parts)


def _summary(store: Any, key_names: dict[str, str]) -> tuple[list[Table], dict[str, Any]]:
    """Tokens and money by agent (the top few on screen, all in the report), model and
    producer."""
    store.flush()
    tables, report = [], {}
    for group, title in (("key", "agent"), ("model", "model"), ("producer", "producer")):
        rows = store.query([group])
        data = []
        for row in rows:
            label = row.group[group]
            if group == "key":
                label = key_names.get(label, label)
            if label is None:  # refused before any producer was chosen
                label = "(refused)" if group == "producer" else "(none)"
            data.append({title: label, "requests": row.requests, **row.sums})
        data.sort(key=lambda d: -int(d["price_nano"]))
        report[f"by_{title}"] = data
        shown = data[:TOP_AGENTS] if group == "key" else data
        more = len(data) - len(shown)
        table = Table(
            title=f"tokens by {title}" + (f" (top {len(shown)} of {len(data)})" if more else ""),
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            show_edge=False,
            title_justify="left",
        )
        for column in (title, "requests", "input", "output", f"spent {CURRENCY}"):
            table.add_column(column, justify="left" if column == title else "right")
        prices = money_column(format_nano(d["price_nano"]) for d in shown)
        for d, price in zip(shown, prices, strict=True):
            table.add_row(
                str(d[title]),
                f"{d['requests']:,}",
                f"{d['input_tokens']:,}",
                f"{d['output_tokens']:,}",
                price,
            )
        tables.append(table)
    return tables, report


async def _poll(fleet: Fleet, sims: dict[str, str], snap: Snapshot) -> None:
    """Refresh the snapshot: balances, spend by account subtree and by agent, producers, and
    the peak hour's dispatch state."""
    accounts = (await fleet.admin("GET", "/admin/v1/accounts"))["data"]
    by_account = await fleet.admin("GET", "/admin/v1/usage?group_by=account")
    spent = subtree_spend(accounts, by_account["data"])
    snap.accounts = [  # acme's tree: the peak hour's tenants show in its own lines
        (a["name"], a["balance"]["available"], spent.get(a["id"], "0"))
        for a in accounts
        if a["name"] in fleet.accounts
    ]
    state = await fleet.admin("GET", "/admin/v1/dispatch")
    snap.peak = peak_hour.live_lines(state, {str(a["id"]): a["name"] for a in accounts})
    by_key = (await fleet.admin("GET", "/admin/v1/usage?group_by=key"))["data"]
    names = {k["id"]: k["name"] for k in (await fleet.admin("GET", "/admin/v1/keys"))["data"]}
    ranked = sorted(by_key, key=lambda r: -int(r["price_nano"]))
    snap.agent_count = len(by_key)
    snap.agents = [
        (names.get(r["key"], "(no key)"), r["requests"], r["price"]) for r in ranked[:TOP_AGENTS]
    ]
    producers = []
    for name, url in sims.items():
        async with fleet.session.get(f"{url}/sim/stats") as r:
            st = await r.json()
        producers.append(
            (name, st["requests_total"], st["completed"], st["rejected_429"], st["active"])
        )
    snap.producers = producers


def subtree_spend(accounts: list[dict[str, Any]], usage: list[dict[str, Any]]) -> dict[int, str]:
    """Each account's spend with everything below it, from usage grouped by account."""
    parents = {a["id"]: a["parent_id"] for a in accounts}
    totals: dict[int, int] = {}
    for row in usage:
        current = int(row["account"]) if str(row["account"]).isdigit() else None
        for _ in range(len(parents) + 1):  # bounded walk up the tree
            if current is None:
                break
            totals[current] = totals.get(current, 0) + int(row["price_nano"])
            current = parents.get(current)
    return {k: format_nano(v) for k, v in totals.items()}


async def _run_fleet(
    gateway_url: str, duration_s: float | None, console: Console, sims: dict[str, str]
) -> tuple[Fleet, peak_hour.PeakHour, Snapshot]:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        fleet = Fleet(gateway_url, session)
        await fleet.setup_organisation()
        peak = peak_hour.PeakHour(gateway_url, session, fleet.admin, fleet.stop)
        await peak.setup()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, fleet.stop.set)
            loop.add_signal_handler(signal.SIGTERM, fleet.stop.set)
        started = time.monotonic()
        owners = [p for people in TEAMS.values() for p in people]
        agents = [
            asyncio.ensure_future(fleet.agent(f"{owner}-agent-{i}", owner))
            for owner in owners
            for i in range(AGENTS_PER_EMPLOYEE)
        ]
        agents.append(asyncio.ensure_future(fleet.runaway()))
        agents += peak.tasks()
        snap = Snapshot()

        def view() -> Group:
            snap.peak_tenants = peak.line()
            return screen(fleet.tally, snap, time.monotonic() - started, duration_s, CURRENCY)

        polled_s = 0.0
        with Live(view(), console=console, refresh_per_second=4) as live:
            while not fleet.stop.is_set():
                if duration_s is not None and time.monotonic() - started >= duration_s:
                    fleet.stop.set()
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(fleet.stop.wait(), 0.25)
                if time.monotonic() - polled_s >= POLL_S:
                    polled_s = time.monotonic()
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError):
                        await _poll(fleet, sims, snap)
                live.update(view())
            # Let turns in flight finish, bounded, so their usage is metered.
            await asyncio.wait(agents, timeout=REQUEST_TIMEOUT_S)
            for task in agents:
                task.cancel()
            await asyncio.gather(*agents, return_exceptions=True)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError):
                await _poll(fleet, sims, snap)
            live.update(view())
        console.print()
        return fleet, peak, snap


def _accounts(gateway_url: str) -> tuple[Table, list[dict[str, Any]]]:
    """Each account's balance as the ledger reports it, and what it and everything below it
    spent (metered usage, so a user without a budget of its own shows its spend too)."""
    accounts = request("GET", "/admin/v1/accounts", url=gateway_url, admin_key=ADMIN_KEY)["data"]
    usage = request(
        "GET", "/admin/v1/usage?group_by=account", url=gateway_url, admin_key=ADMIN_KEY
    )["data"]
    spent = subtree_spend(accounts, usage)
    table = Table(
        title="accounts", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title_justify="left"
    )
    for column in ("account", "kind", f"available {CURRENCY}", "held", "spent"):
        table.add_column(column, justify="left" if column in ("account", "kind") else "right")
    rows = []
    for a in accounts:
        b = a["balance"]
        cells = [b["available"], b["held"], spent.get(a["id"], "0")]
        table.add_row(a["name"], a["kind"], *(money_column([c])[0] for c in cells))
        rows.append({"account": a["name"], "id": a["id"], **b, "spent": spent.get(a["id"], "0")})
    return table, rows


EXPLORE = """\
The demo's database is kept in {db}; to explore it:
  export TOKENWORKS_ADMIN_KEY={admin}
  tokenworks serve --config {config} &
  tokenworks accounts list
  tokenworks usage --group-by team,model
  tokenworks usage --group-by key --since 1h
  tokenworks statement alice
(its producers are gone with the demo: the admin API answers, requests do not)"""


def run(duration_s: float | None = None) -> int:
    console = Console()
    REPORT_DIR.mkdir(exist_ok=True)
    db = (REPORT_DIR / "tokenworks.db").resolve()
    for old in REPORT_DIR.glob("tokenworks.db*"):  # every run starts from an empty ledger
        old.unlink()
    stack = contextlib.ExitStack()
    with stack:
        urls = {
            name: stack.enter_context(serve_in_thread(build_sim(profile)))
            for name, profile in (
                ("fast", "fast"),
                ("cheap", peak_hour.cheap_at_peak()),
                ("slow", "slow"),
                ("premium", "fast"),
            )
        }
        template = string.Template((resources.files("tokenworks.cli") / "demo.yaml").read_text())
        text = template.substitute(db=db, admin=ADMIN_KEY, **urls)
        config = loads(text, "demo.yaml")
        (REPORT_DIR / "tokenworks.yaml").write_text(text)
        app = build_app(config)
        gateway_url = stack.enter_context(serve_in_thread(app))
        console.print(
            "[bold]tokenworks demo[/]: producers fast, cheap, slow and premium; "
            f"gateway {gateway_url}; "
            f"{len(TEAMS)} teams, {AGENTS_PER_EMPLOYEE} agents per employee and one runaway; "
            f"peak hour on cheap: a swarm, a vip, a batch"
            + ("" if duration_s else " (Ctrl-C to stop)"),
            highlight=False,
        )
        fleet, peak, snap = asyncio.run(_run_fleet(gateway_url, duration_s, console, urls))
        gateway = app.state.gateway
        names = {k.id: k.name for k in gateway.keys.list()}
        tables, report = _summary(gateway.store, names)
        accounts_table, report["accounts"] = _accounts(gateway_url)
        tables.append(accounts_table)
        refused = sum(p[3] for p in snap.producers if p[0] == peak_hour.PEAK_PRODUCER)
        tenants = {str(a["id"]): a["account"] for a in report["accounts"]}
        peak_parts, report["peak"] = peak_hour.summary(
            peak, gateway.relay.dispatcher.snapshot(tenants_shown=None),
            gateway.store.records(), tenants, refused, CURRENCY,
        )  # fmt: skip
        for table in [*tables, *peak_parts]:
            console.print(table, highlight=False)
        check = request("GET", "/admin/v1/ledger/check", url=gateway_url, admin_key=ADMIN_KEY)
        report["ledger_check"] = check
        console.print(
            "ledger check: " + ("[green]ok[/]" if check["ok"] else f"[red]{check['violations']}[/]")
        )
        runaway = fleet.tally.runaway_stopped_after
        if runaway is not None:
            console.print(runaway_line(runaway), highlight=False)
        report["fleet"] = {
            "requests": fleet.tally.requests,
            "failed": fleet.tally.failures,
            "refused_402": fleet.tally.refused,
            "tasks": fleet.tally.tasks,
            "subagents": fleet.tally.subagents,
            "statuses": fleet.tally.by_status,
            "runaway_stopped_after_turns": runaway,
            "spent": format_nano(fleet.tally.spent_nano),
        }
        (REPORT_DIR / "summary.json").write_text(json.dumps(report, indent=2, default=str))
        console.print(f"report: {REPORT_DIR / 'summary.json'}", highlight=False)
    config_path = REPORT_DIR / "tokenworks.yaml"
    console.print(
        EXPLORE.format(db=REPORT_DIR / "tokenworks.db", admin=ADMIN_KEY, config=config_path),
        highlight=False,
        soft_wrap=True,
    )
    return 0
