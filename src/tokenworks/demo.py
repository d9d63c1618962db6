"""`tokenworks demo`: the token burn of the agent era in miniature, on the embedded default.

Three simulated producers (fast, cheap, slow), the gateway on SQLite, and a fleet of agents:
each agent works through tasks, each task a loop of calls whose context grows with every
turn, and some tasks spawn sub-agents with keys of their own. The terminal shows live
progress; the end is a summary of tokens by agent, model and producer, also written to
`demo-report/`.
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
from tokenworks.config import loads
from tokenworks.pricing.money import format_nano
from tokenworks.producers.sim import build_app as build_sim
from tokenworks.serving import serve_in_thread

ADMIN_KEY = "demo-admin-key"
AGENTS = 12
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
    by_status: dict[int, int] = field(default_factory=dict)


class Fleet:
    """Agents calling the gateway like real coding agents do: long loops, growing context."""

    def __init__(self, gateway_url: str, session: aiohttp.ClientSession, seed: int = 7) -> None:
        self.url = gateway_url
        self.session = session
        self.random = random.Random(seed)
        self.tally = Tally()
        self.stop = asyncio.Event()

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(
            method,
            f"{self.url}{path}",
            json=body,
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as r:
            r.raise_for_status()
            return await r.json()

    async def new_key(self, name: str) -> str:
        return str((await self.admin("POST", "/admin/v1/keys", {"name": name}))["key"])

    async def call(self, key: str, model: str, messages: list[dict[str, str]], agent: str) -> str:
        stream = self.random.random() < 0.5
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": self.random.randint(16, 160),
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
            messages.append({"role": "assistant", "content": reply})
            messages.append({"role": "user", "content": f"Tool output for step {turn}: ok."})
            del messages[2 : max(2, len(messages) - MAX_CONTEXT_MESSAGES)]
            if depth == 0 and turn == 1 and self.random.random() < 0.4:
                count = self.random.randint(1, MAX_SUBAGENTS_PER_TASK)
                subs = []
                for i in range(count):
                    name = f"{agent}/sub-{self.tally.subagents + i}"
                    subs.append(self.task(await self.new_key(name), name, depth + 1))
                self.tally.subagents += count
                await asyncio.gather(*subs)

    async def agent(self, index: int) -> None:
        name = f"agent-{index:02d}"
        key = await self.new_key(name)
        while not self.stop.is_set():
            await self.task(key, name, 0)


def _progress(fleet: Fleet, started_s: float, duration_s: float | None) -> Table:
    t = fleet.tally
    elapsed = time.monotonic() - started_s
    title = f"tokenworks demo — {elapsed:5.1f}s" + (f" / {duration_s:.0f}s" if duration_s else "")
    table = Table(title=title, show_header=True)
    for column in ("requests", "failed", "tasks", "sub-agents", "input tok", "output tok"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{t.requests:,}",
        f"{t.failures:,}",
        f"{t.tasks:,}",
        f"{t.subagents:,}",
        f"{t.input_tokens:,}",
        f"{t.output_tokens:,}",
    )
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
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, fleet.stop.set)
            loop.add_signal_handler(signal.SIGTERM, fleet.stop.set)
        started = time.monotonic()
        agents = [asyncio.ensure_future(fleet.agent(i)) for i in range(AGENTS)]
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
        template = string.Template((resources.files("tokenworks") / "demo.yaml").read_text())
        config = loads(template.substitute(db=db, admin=ADMIN_KEY, **urls), "demo.yaml")
        app = build_app(config)
        gateway_url = stack.enter_context(serve_in_thread(app))
        console.print(
            f"[bold]tokenworks demo[/]: producers fast/cheap/slow, gateway {gateway_url}, "
            f"{AGENTS} agents; database {db}"
            + ("" if duration_s else "  (Ctrl-C to stop)")
        )
        fleet = asyncio.run(_run_fleet(gateway_url, duration_s, console))
        gateway = app.state.gateway
        names = {k.id: k.name for k in gateway.keys.list()}
        tables, report = _summary(gateway.store, names)
        for table in tables:
            console.print(table)
        REPORT_DIR.mkdir(exist_ok=True)
        report["fleet"] = {
            "requests": fleet.tally.requests,
            "failed": fleet.tally.failures,
            "tasks": fleet.tally.tasks,
            "subagents": fleet.tally.subagents,
            "statuses": fleet.tally.by_status,
        }
        (REPORT_DIR / "summary.json").write_text(json.dumps(report, indent=2, default=str))
        console.print(f"report: {REPORT_DIR / 'summary.json'}")
    if os.environ.get("TOKENWORKS_DEMO_KEEP_DB") is None:
        for path in workdir.glob("*"):
            path.unlink()
        workdir.rmdir()
    return 0
