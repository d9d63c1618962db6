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
import os
import random
import signal
import string
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tokenworks.app import build_app
from tokenworks.cli.admin import request
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
REPORT_DIR = Path("demo-report")


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

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
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
                self.tally.runaway_stopped_after = turn
                return
            messages.append({"role": "assistant", "content": reply[-2000:]})
            messages.append({"role": "user", "content": "More."})


def _progress(fleet: Fleet, started_s: float, duration_s: float | None) -> Table:
    t = fleet.tally
    elapsed = time.monotonic() - started_s
    title = f"tokenworks demo — {elapsed:5.1f}s" + (f" / {duration_s:.0f}s" if duration_s else "")
    table = Table(title=title, show_header=True)
    for column in ("requests", "402", "failed", "tasks", "sub-agents", "input tok", "output tok"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{t.requests:,}",
        f"{t.refused:,}",
        f"{t.failures:,}",
        f"{t.tasks:,}",
        f"{t.subagents:,}",
        f"{t.input_tokens:,}",
        f"{t.output_tokens:,}",
    )
    if t.runaway_stopped_after is not None:
        table.caption = f"runaway agent stopped at its limit after {t.runaway_stopped_after} turns"
    return table


def _summary(store: Any, key_names: dict[str, str]) -> tuple[list[Table], dict[str, Any]]:
    store.flush()
    tables, report = [], {}
    for group, title in (("key", "agent"), ("model", "model"), ("producer", "producer")):
        rows = store.query([group])
        table = Table(title=f"tokens by {title}")
        for column in (title, "requests", "input", "cached", "output", "reasoning", "price"):
            table.add_column(column, justify="left" if column == title else "right")
        data = []
        if group == "key":
            rows.sort(key=lambda r: key_names.get(r.group["key"], str(r.group["key"])))
        for row in rows:
            label = row.group[group]
            label = key_names.get(label, label) if group == "key" else label
            s = row.sums
            table.add_row(
                str(label),
                f"{row.requests:,}",
                f"{s['input_tokens']:,}",
                f"{s['cached_input_tokens']:,}",
                f"{s['output_tokens']:,}",
                f"{s['reasoning_tokens']:,}",
                format_nano(s["price_nano"]),
            )
            data.append({title: label, "requests": row.requests, **s})
        tables.append(table)
        report[f"by_{title}"] = data
    return tables, report


async def _run_fleet(gateway_url: str, duration_s: float | None, console: Console) -> Fleet:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        fleet = Fleet(gateway_url, session)
        await fleet.setup_organisation()
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
        first = _progress(fleet, started, duration_s)
        with Live(first, console=console, refresh_per_second=4) as live:
            while not fleet.stop.is_set():
                if duration_s is not None and time.monotonic() - started >= duration_s:
                    fleet.stop.set()
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(fleet.stop.wait(), 0.25)
                live.update(_progress(fleet, started, duration_s))
            # Let turns in flight finish, bounded, so their usage is metered.
            await asyncio.wait(agents, timeout=REQUEST_TIMEOUT_S)
            for task in agents:
                task.cancel()
            await asyncio.gather(*agents, return_exceptions=True)
            live.update(_progress(fleet, started, duration_s))
        return fleet


def _accounts(gateway_url: str, accounts: dict[str, int]) -> tuple[Table, list[dict[str, Any]]]:
    """Each account's balance as the ledger reports it."""
    table = Table(title="accounts")
    for column in ("account", "available", "held", "spent this period"):
        table.add_column(column, justify="left" if column == "account" else "right")
    rows = []
    for name, account_id in accounts.items():
        data = request(
            "GET", f"/admin/v1/accounts/{account_id}", url=gateway_url, admin_key=ADMIN_KEY
        )
        balance = data["balance"]
        table.add_row(name, balance["available"], balance["held"], balance["spent_this_period"])
        rows.append({"account": name, **balance})
    return table, rows


def run(duration_s: float | None = None) -> int:
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="tokenworks-demo-"))
    db = workdir / "tokenworks.db"
    stack = contextlib.ExitStack()
    with stack:
        urls = {
            name: stack.enter_context(serve_in_thread(build_sim(name)))
            for name in ("fast", "cheap", "slow")
        }
        template = string.Template((resources.files("tokenworks.cli") / "demo.yaml").read_text())
        config = loads(template.substitute(db=db, admin=ADMIN_KEY, **urls), "demo.yaml")
        app = build_app(config)
        gateway_url = stack.enter_context(serve_in_thread(app))
        console.print(
            f"[bold]tokenworks demo[/]: producers fast/cheap/slow, gateway {gateway_url}, "
            f"{len(TEAMS)} teams, {AGENTS_PER_EMPLOYEE} agents per employee and one runaway; "
            f"database {db}" + ("" if duration_s else "  (Ctrl-C to stop)")
        )
        fleet = asyncio.run(_run_fleet(gateway_url, duration_s, console))
        gateway = app.state.gateway
        names = {k.id: k.name for k in gateway.keys.list()}
        tables, report = _summary(gateway.store, names)
        accounts_table, report["accounts"] = _accounts(gateway_url, fleet.accounts)
        tables.append(accounts_table)
        for table in tables:
            console.print(table)
        check = request("GET", "/admin/v1/ledger/check", url=gateway_url, admin_key=ADMIN_KEY)
        report["ledger_check"] = check
        console.print(
            "ledger check: " + ("[green]ok[/]" if check["ok"] else f"[red]{check['violations']}[/]")
        )
        runaway = fleet.tally.runaway_stopped_after
        if runaway is not None:
            console.print(f"runaway agent: stopped at its daily limit after {runaway} turns")
        REPORT_DIR.mkdir(exist_ok=True)
        report["fleet"] = {
            "requests": fleet.tally.requests,
            "failed": fleet.tally.failures,
            "refused_402": fleet.tally.refused,
            "tasks": fleet.tally.tasks,
            "subagents": fleet.tally.subagents,
            "statuses": fleet.tally.by_status,
            "runaway_stopped_after_turns": runaway,
        }
        (REPORT_DIR / "summary.json").write_text(json.dumps(report, indent=2, default=str))
        console.print(f"report: {REPORT_DIR / 'summary.json'}")
    if os.environ.get("TOKENWORKS_DEMO_KEEP_DB") is None:
        for path in workdir.glob("*"):
            path.unlink()
        workdir.rmdir()
    return 0
