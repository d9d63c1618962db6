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
        env={**os.environ, "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokens by agent" in result.stdout and "tokens by producer" in result.stdout
    report = json.loads((tmp_path / "demo-report" / "summary.json").read_text())
    fleet = report["fleet"]
    assert fleet["requests"] > 10 and fleet["tasks"] >= 12
    metered = sum(row["requests"] for row in report["by_model"])
    # Every request the fleet made is metered exactly once (failed ones too).
    assert metered == fleet["requests"]
    assert sum(row["requests"] for row in report["by_producer"]) == metered
    agents = {row["agent"] for row in report["by_agent"]}
    assert any("/sub-" in a for a in agents) or fleet["subagents"] == 0
    assert all(row["output_tokens"] > 0 for row in report["by_model"])
    # The organisation paid for it all, exactly, and the runaway agent hit its limit.
    assert report["ledger_check"]["ok"] is True
    assert fleet["runaway_stopped_after_turns"] is not None
    assert fleet["statuses"].get("402", 0) >= 1
    accounts = {row["account"]: row for row in report["accounts"]}
    assert set(accounts) == {"acme", "platform", "research", "alice", "bob", "carol", "dave"}
    assert all(row["held"] == "0" for row in accounts.values())
    spent = sum(Decimal(row["price_nano"]) for row in report["by_model"]) / 10**9
    team_spend = Decimal(accounts["platform"]["spent_this_period"]) + Decimal(
        accounts["research"]["spent_this_period"]
    )
    assert team_spend == spent
