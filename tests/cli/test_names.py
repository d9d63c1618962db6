"""The CLI takes names where it takes ids, says both, refuses ambiguity; its tables fit 80
columns with every id whole; `--version`, `config check` and relative times."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import openai

from tests.conftest import ADMIN_KEY, Gateway, run_cli
from tokenworks.cli.admin import relative_time
from tokenworks.cli.tables import money_column

CHAT = [{"role": "user", "content": "hi"}]
ROOT = Path(__file__).parents[2]


def tw(gw: Gateway | None, *args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {"COLUMNS": str(columns), "TOKENWORKS_ADMIN_KEY": ADMIN_KEY}
    if gw is not None:
        env["TOKENWORKS_URL"] = gw.url
    return run_cli(*args, env=env)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    for line in result.stdout.splitlines():
        assert len(line) <= 80, f"wider than 80 columns: {line!r}"
    return result.stdout


def test_names_work_wherever_ids_do_and_are_printed_with_them(gateway: Gateway) -> None:
    out = ok(tw(gateway, "accounts", "create", "Acme Corp"))
    org = re.search(r"account (\d+) \(Acme Corp\)", out)
    assert org, out
    out = ok(tw(gateway, "accounts", "create", "research", "--parent", "acme corp"))
    assert f"under account {org.group(1)} (Acme Corp)" in out  # case-insensitive when unique
    ok(tw(gateway, "topup", "Acme Corp", "10"))
    assert "10.00 USD" in ok(tw(gateway, "topup", org.group(1), "10"))
    ok(tw(gateway, "accounts", "create", "ada", "--parent", "research"))
    ok(tw(gateway, "transfer", "Acme Corp", "research", "2.5"))
    created = ok(tw(gateway, "keys", "create", "ada-agent", "--account", "ada"))
    key_id = re.search(r"created key (key_\w+) \(ada-agent\)", created)
    assert key_id and "paid by:  account" in created and "(ada)" in created

    # Operator accounts are named too; they hold no budgets, and saying so is an error.
    revenue = tw(gateway, "budgets", "list", "operator:revenue")
    assert revenue.returncode == 1 and "operator account (revenue)" in revenue.stderr

    # Ambiguity is an error listing the candidates, never a guess.
    ok(tw(gateway, "accounts", "create", "ada", "--parent", "Acme Corp"))
    twice = tw(gateway, "topup", "ada", "1")
    assert twice.returncode == 1
    assert "account 'ada' is ambiguous" in twice.stderr and twice.stderr.count("(ada)") == 2
    missing = tw(gateway, "topup", "nobody", "1")
    assert missing.returncode == 1 and "no account 'nobody'" in missing.stderr

    listed = ok(tw(gateway, "keys", "list"))
    assert key_id.group(1) in listed  # the id the next command needs, whole
    revoked = ok(tw(gateway, "keys", "revoke", "ada-agent"))
    assert f"revoked key {key_id.group(1)} (ada-agent)" in revoked
    again = ok(tw(gateway, "keys", "revoke", "ada-agent"))
    assert "already revoked" in again


def test_tables_fit_80_columns_with_long_names_and_keep_ids_whole(gateway: Gateway) -> None:
    long = "a-team-with-a-name-much-longer-than-any-terminal-column-should-have-to-show"
    out = ok(tw(gateway, "accounts", "create", long))
    account = re.search(r"account (\d+)", out)
    assert account
    ok(tw(gateway, "topup", account.group(1), "5"))
    keys = []
    for i in range(3):
        made = tw(gateway, "keys", "create", f"{long}-{i}", "--account", account.group(1), "--json")
        key = json.loads(made.stdout)
        keys.append(key)
        c = openai.OpenAI(base_url=gateway.v1, api_key=key["key"], max_retries=0)
        c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=5)
    listed = ok(tw(gateway, "keys", "list"))
    assert all(k["id"] in listed for k in keys)
    assert "ID" in listed and "STATUS" in listed and "active" in listed
    usage = ok(tw(gateway, "usage", "--group-by", "key,model,producer,day", "--since", "1d"))
    assert "PRICE (USD)" in usage and "REQUESTS" in usage
    accounts = ok(tw(gateway, "accounts", "list"))
    assert "AVAILABLE (USD)" in accounts and account.group(1) in accounts
    # Amounts in a column share one number of decimals, so the points line up.
    rows = [line for line in accounts.splitlines() if line.startswith(account.group(1))]
    assert re.search(r"\b4\.\d{6}\b", rows[0]), rows  # 5.00 less three small requests


def test_usage_rolls_up_the_account_tree_and_periods(gateway: Gateway) -> None:
    def account(name: str, parent: int | None, kind: str) -> int:
        body = {"name": name, "parent": parent, "kind": kind, "idempotency_key": f"n-{name}"}
        r = gateway.admin("POST", "/admin/v1/accounts", json=body)
        assert r.status_code == 201, r.text
        return int(r.json()["id"])

    org = account("org", None, "organisation")
    gateway.admin(
        "POST", f"/admin/v1/accounts/{org}/topups", json={"amount": "5", "idempotency_key": "t"}
    )
    teams = [account(f"team{i}", org, "team") for i in range(2)]
    users = [account(f"user{i}", teams[i % 2], "user") for i in range(3)]
    for i, user in enumerate(users):
        key = gateway.create_key(f"k{i}", account=str(user))
        c = openai.OpenAI(base_url=gateway.v1, api_key=key["key"], max_retries=0)
        for _ in range(i + 1):
            c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=2)
    by_team = {r["team"]: r["requests"] for r in gateway.usage(group_by="team")}
    assert by_team == {str(teams[0]): 1 + 3, str(teams[1]): 2}
    [by_org] = gateway.usage(group_by="org,month")
    assert by_org["org"] == str(org) and by_org["requests"] == 6
    assert re.fullmatch(r"\d{4}-\d{2}", by_org["month"])
    [week] = gateway.usage(group_by="week")
    assert re.fullmatch(r"\d{4}-W\d{2}", week["week"]) and week["requests"] == 6
    bad = gateway.admin("GET", "/admin/v1/usage", params={"group_by": "galaxy"})
    assert bad.status_code == 400 and "team, org, week, month" in bad.json()["error"]["message"]
    table = ok(tw(gateway, "usage", "--group-by", "team"))
    assert f"team0 ({teams[0]})" in table and f"team1 ({teams[1]})" in table


def test_version_config_check_and_help() -> None:
    version = tw(None, "--version")
    assert version.returncode == 0 and re.fullmatch(
        r"tokenworks \d+\.\d+\.\d+\S*\n", version.stdout
    )
    good = tw(None, "config", "check", str(ROOT / "examples" / "tokenworks.yaml"))
    assert good.returncode == 0 and ": ok: 4 producers, 4 models" in good.stdout
    providers = tw(None, "config", "check", str(ROOT / "examples" / "providers.yaml"))
    assert providers.returncode == 0 and ": ok: 3 producers, 2 models" in providers.stdout
    sim_help = tw(None, "upstream-sim", "--help").stdout  # its fault list is its own
    for profile in ("instant", "fast", "cheap", "slow", "flaky"):
        assert profile in sim_help
    serve_help = " ".join(ok(tw(None, "serve", "--help")).split())
    for text in ("address to listen on", "TCP port", "log one line per request"):
        assert text in serve_help
    usage_help = " ".join(ok(tw(None, "usage", "--help")).split())
    for text in ("7d, 24h or 30m ago", "up to this time", "the gateway's base URL", "team, org"):
        assert text in usage_help


def test_config_check_names_file_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("producers:\n  - name: a\n    base_url: http://x\n    colour: red\n")
    result = tw(None, "config", "check", str(bad))
    assert result.returncode == 2
    assert f"{bad}:4: producers[0].colour: unknown field" in result.stderr


def test_relative_times() -> None:
    assert relative_time("7d", now_s=1_000_000) == str(1_000_000 - 7 * 86400)
    assert relative_time("24h", now_s=100_000) == str(100_000 - 86400)
    assert relative_time("30m", now_s=10_000) == str(10_000 - 1800)
    assert relative_time("2026-11-01") == "2026-11-01"


def test_money_columns_share_their_decimals() -> None:
    assert money_column(["100", "4.999902", None]) == ["100.000000", "4.999902", "-"]
    assert money_column(["1", "2.5"]) == ["1.00", "2.50"]
    assert money_column(["1234.5"]) == ["1,234.50"]
    assert money_column(["0.000000001"]) == ["0.000000"]  # six places at most


def test_grants_list_and_revoke(gateway: Gateway) -> None:
    ok(tw(gateway, "accounts", "create", "acme"))
    ok(tw(gateway, "topup", "acme", "1"))
    made = ok(tw(gateway, "grants", "add", "acme", "5", "--every", "month", "--rollover", "2"))
    grant = re.search(r"grant (\d+): 5\.00 USD to account \d+ \(acme\) every month", made)
    assert grant, made
    listed = ok(tw(gateway, "grants", "list", "acme"))
    assert grant.group(1) in listed and "month" in listed and "up to 2" in listed
    revoked = ok(tw(gateway, "grants", "revoke", "acme", grant.group(1)))
    assert f"revoked grant {grant.group(1)} of account" in revoked
    assert "5.00 USD of unspent credit expired" in revoked
    assert grant.group(1) not in ok(tw(gateway, "grants", "list", "acme")).split("───")[-1]
    again = ok(tw(gateway, "grants", "revoke", "acme", grant.group(1)))  # idempotent
    assert "revoked grant" in again
    shown = json.loads(tw(gateway, "accounts", "show", "acme", "--json").stdout)
    assert shown["balance"]["available"] == "1"  # the cash stays
    missing = tw(gateway, "grants", "revoke", "acme", "999")
    assert missing.returncode == 1 and "404" in missing.stderr
    check = ok(tw(gateway, "ledger", "check"))
    assert "sound" in check
