"""`tokenworks demo --duration S` runs the whole system, reports and exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path


def test_demo_runs_for_its_duration_and_writes_a_report(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tokenworks", "demo", "--duration", "8"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "80", "LINES": "24"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokens by agent" in result.stdout and "tokens by producer" in result.stdout
    report = json.loads((tmp_path / "demo-report" / "summary.json").read_text())
    fleet = report["fleet"]
    assert fleet["requests"] > 10 and fleet["tasks"] >= 12
    metered = sum(row["requests"] for row in report["by_model"])
    peak = report["peak"]
    roles = peak["roles"]
    # Every request the fleet and the peak hour's tenants made is metered exactly once
    # (failed and shed ones too).
    assert metered == fleet["requests"] + sum(r["requests"] for r in roles.values())
    assert sum(row["requests"] for row in report["by_producer"]) == metered
    agents = {row["agent"] for row in report["by_agent"]}
    assert any("/sub-" in a for a in agents) or fleet["subagents"] == 0
    assert all(row["output_tokens"] > 0 for row in report["by_model"])
    # The organisation paid for it all, exactly, and the runaway agent hit its limit.
    assert report["ledger_check"]["ok"] is True
    assert fleet["runaway_stopped_after_turns"] is not None
    assert fleet["statuses"].get("402", 0) >= 1
    accounts = {row["account"]: row for row in report["accounts"]}
    assert set(accounts) == {"acme", "platform", "research", "alice", "bob", "carol", "dave",
                             "swarm", "vip", "batch"}  # fmt: skip
    assert all(row["held"] == "0" for row in accounts.values())
    spent = sum(Decimal(row["price_nano"]) for row in report["by_model"]) / 10**9
    team_spend = Decimal(accounts["platform"]["spent"]) + Decimal(accounts["research"]["spent"])
    assert team_spend == Decimal(accounts["acme"]["spent"])
    tenants = sum(Decimal(accounts[a]["spent"]) for a in ("acme", "swarm", "vip", "batch"))
    assert tenants == spent
    # A user's spend shows though it has no budget of its own, and adds up to its team's.
    users = sum(Decimal(accounts[u]["spent"]) for u in ("alice", "bob"))
    assert users == Decimal(accounts["platform"]["spent"]) and users > 0
    # The slow producer serves too (first in line for chat-cheap); cheap takes what slow
    # refuses at capacity, which depends on the load of the moment, so it is not asserted.
    served = {row["producer"]: row["requests"] for row in report["by_producer"]}
    assert served.get("fast", 0) > 0 and served.get("slow", 0) > 0, served
    # The peak hour: the cheap producer refused work (429) and the gateway learned its limit,
    # yet no client saw a producer's refusal: it was retried or moved to premium.
    assert peak["refused_by_cheap"] >= 1 and peak["cheap_limit_cuts"] >= 1, peak
    assert peak["upstream_429s_seen_by_clients"] == 0 and "429" not in fleet["statuses"]
    assert peak["failovers"] >= 1
    # The urgent call, cheap-only with a 100 ms deadline behind its own swarm, is shed at
    # once with the deadline's code; the scheduler counts it.
    assert roles["urgent"]["codes"].get("deadline_unmeetable", 0) >= 1, roles["urgent"]
    assert sum(n for r, n in peak["sheds"].items() if r.startswith("deadline")) >= 1
    # The vip (priority) and the batch (flex) are served, the swarm too; every tenant shows
    # in the fair shares, and each tier's queue wait and payment is reported.
    assert roles["vip"]["statuses"].get("200", 0) >= 1 and "429" not in roles["vip"]["statuses"]
    assert roles["swarm"]["statuses"].get("200", 0) >= 1
    tiers = {t["tier"]: t for t in peak["tiers"]}
    assert tiers["priority"]["served"] >= 1 and tiers["priority"]["paid_nano"] > 0
    assert tiers["flex"]["served"] >= 1 and tiers["standard"]["served"] >= 1
    assert {"swarm", "vip", "batch"} <= set(peak["fair_shares"])
    for line in ("peak hour: cheap refused", "failovers:", "concurrency limit learned",
                 "shed: ", "fair shares", "queue wait and price by tier", "peak: swarm"):  # fmt: skip
        assert line in result.stdout, line
    assert "None" not in result.stdout
    for line in result.stdout.splitlines():
        assert len(line) <= 80, line
    # The database stays to be explored, and the way to is printed.
    assert (tmp_path / "demo-report" / "tokenworks.db").exists()
    assert "tokenworks serve --config demo-report/tokenworks.yaml" in result.stdout
    assert "export TOKENWORKS_ADMIN_KEY=demo-admin-key" in result.stdout


def test_the_live_screen_fits_80_by_24_and_says_what_happened() -> None:
    from rich.console import Console

    from tokenworks.cli.demo import TOP_AGENTS, Snapshot, Tally, screen
    from tokenworks.cli.peak import PeakHour
    from tokenworks.cli.peak import live_lines as peak_lines

    tally = Tally(requests=1234, refused=3, failures=2, tasks=99, subagents=12)
    tally.spent_nano, tally.runaway_stopped_after = 1_234_567_891, 1
    accounts = ["acme", "platform", "alice", "bob", "research", "carol", "dave"]
    snap = Snapshot(
        accounts=[(name, "12.5", "0.000123") for name in accounts],
        producers=[
            ("fast", 900, 890, 0, 3),
            ("cheap", 200, 150, 50, 8),
            ("slow", 80, 40, 40, 4),
            ("premium", 99_999, 99_999, 0, 32),
        ],
        agents=[(f"agent-{i}", 10 * i, f"0.{i:06d}") for i in range(TOP_AGENTS)],
        agent_count=58,
    )
    state = {
        "pools": {
            "cheap": {
                "capacity": {"concurrency_limit": 8, "adaptive_cuts": 12},
                "tiers": {"standard": {"queued": 123}, "flex": {"queued": 4567}},
                "served_weighted_tokens": {"9": 123_456.0, "10": 1.0},
            },
            "premium": {"tiers": {"priority": {"queued": 3}}, "served_weighted_tokens": {}},
        }
    }
    snap.peak = peak_lines(state, {"9": "swarm-of-a-long-name"})
    assert all(len(line) <= 36 for line in snap.peak), snap.peak  # beside the balances
    peak = PeakHour("http://127.0.0.1:1", None, None, None)  # type: ignore[arg-type]
    for role, n in (("swarm", 99_999), ("vip", 999), ("batch", 9_999), ("urgent", 999)):
        peak.tally[role].requests = n
    peak.tally["urgent"].codes = {"deadline_unmeetable": 98, "deadline_expired": 1, "x": 9}
    snap.peak_tenants = peak.line()
    console = Console(width=80, height=24, record=True, color_system=None)
    console.print(screen(tally, snap, 30.0, 60.0, "USD"))
    text = console.export_text()
    lines = text.rstrip("\n").splitlines()
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines), text
    assert "spent 1.234568 USD" in text and "1,229 served" in text.replace("1,234 requests: ", "")
    assert "58 in all" in text and "slow" in text and "429" in text
    assert "after 1 answered turn" in text and "turns" not in text.split("runaway")[1]
    assert "None" not in text
    assert "cheap limit 8 learned, 12 cuts" in text and "queued 3 prio 123 std 4567 flex" in text
    assert "top share swarm-of-a 100% of 2" in text and "99/999 urgent shed" in text
