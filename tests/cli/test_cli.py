"""The `tokenworks` command: config errors at start, and the admin subcommands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.conftest import ADMIN_KEY, Gateway, run_cli

CHAT = [{"role": "user", "content": "hi"}]


def tokenworks(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if args[:1] != ("serve",):  # a serve that wrongly started would hold this process
        return run_cli(*args, env={"COLUMNS": "200", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "tokenworks", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "producers:\n  - name: a\n    base_url: http://x\n    colour: red\n",
            ":4: producers[0].colour: unknown field",
        ),
        (
            "models:\n  - name: m\n    deployments:\n      - {producer: ghost, model: x}\n",
            ":4: models[0].deployments[0].producer: unknown producer 'ghost'",
        ),
        (
            "producers:\n  - name: a\n    base_url: http://x\n    timeout_s: fast\n",
            ":4: producers[0].timeout_s: Expected `float`",
        ),
        ("producers: [\n", "invalid YAML"),
        ("database: mysql://x\n", ":1: database: must be a sqlite:/// or postgresql:// URL"),
    ],
)
def test_a_bad_config_fails_at_start_naming_the_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = tokenworks("serve", "--config", str(path), "--port", "1")
    assert result.returncode == 2
    assert f"{path}" in result.stderr and expected in result.stderr, result.stderr


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    result = tokenworks("serve", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_the_example_config_loads() -> None:
    from tokenworks.config import load

    config = load(Path(__file__).parents[2] / "examples" / "tokenworks.yaml")
    assert [m.name for m in config.models] == ["chat-fast", "gpt", "deepseek", "embed"]
    assert config.pricing.default_tariff == "retail"


def test_keys_and_usage_subcommands(gateway: Gateway) -> None:
    env = {"TOKENWORKS_URL": gateway.url, "TOKENWORKS_ADMIN_KEY": ADMIN_KEY}
    created = tokenworks("keys", "create", "bob", "--model", "chat-fast", "--json", env=env)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["key"].startswith("tw-") and key["models"] == ["chat-fast"]
    c = openai.OpenAI(base_url=gateway.v1, api_key=key["key"], max_retries=0)
    c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=3)

    listed = tokenworks("keys", "list", env=env)
    assert listed.returncode == 0 and key["id"] in listed.stdout and "bob" in listed.stdout
    usage = tokenworks("usage", "--group-by", "key", "--json", env=env)
    [row] = json.loads(usage.stdout)["data"]
    assert row["key"] == key["id"] and row["output_tokens"] == 3
    table = tokenworks("usage", "--group-by", "model", env=env)
    assert "chat-fast" in table.stdout

    revoked = tokenworks("keys", "revoke", key["id"], env=env)
    assert revoked.returncode == 0 and key["id"] in revoked.stdout
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=3)

    wrong = tokenworks("keys", "list", env={**env, "TOKENWORKS_ADMIN_KEY": "nope"})
    assert wrong.returncode == 1 and "401" in wrong.stderr


def test_reprice_shows_what_a_price_rise_would_have_cost(gateway: Gateway, tmp_path: Path) -> None:
    key = gateway.create_key()
    c = openai.OpenAI(base_url=gateway.v1, api_key=key["key"], max_retries=0)
    for _ in range(3):
        c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=10)
    records = gateway.records(expect=3)
    cost = sum(r.cost_nano for r in records)
    assert cost > 0
    config = tmp_path / "gw.yaml"
    from tests.conftest import MODELS, gateway_config

    sims = {"a": "http://127.0.0.1:1", "b": "http://127.0.0.1:2"}
    config.write_text(gateway_config(gateway.db_path, sims, MODELS))
    scenario = tmp_path / "rise.yaml"
    scenario.write_text('name: rise\nchanges:\n  - {kind: scale_cost, factor: "1.3"}\n')
    result = tokenworks("reprice", "--config", str(config), "--scenario", str(scenario), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    total = out["rows"][-1]
    assert total["requests"] == 3
    from decimal import Decimal

    base = int(Decimal(total["cost"]) * 10**9)
    new = int(Decimal(total["new_cost"]) * 10**9)
    assert base == cost
    assert abs(new - cost * 13 // 10) <= 3  # each request rounds once, half a nano at most
    table = tokenworks("reprice", "--config", str(config), "--scenario", str(scenario))
    assert "rise" in table.stdout or "chat-fast" in table.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nchanges:\n  - {kind: scale_cost, factor: 1.3e}\n")
    failed = tokenworks("reprice", "--config", str(config), "--scenario", str(bad))
    assert failed.returncode == 2 and "bad.yaml" in failed.stderr


def test_rate_limits_from_the_command_line(gateway: Gateway) -> None:
    env = {"TOKENWORKS_URL": gateway.url, "TOKENWORKS_ADMIN_KEY": ADMIN_KEY}
    made = tokenworks("accounts", "create", "acme", "--rpm", "30", "--json", env=env)
    assert made.returncode == 0, made.stderr
    account = json.loads(made.stdout)
    assert account["rate_limits"] == {"rpm": 30, "tpm": None, "max_concurrency": None}
    changed = tokenworks(
        "accounts", "rate-limits", str(account["id"]), "--tpm", "5000", "--max-concurrency", "2",
        env=env,
    )  # fmt: skip
    assert changed.returncode == 0, changed.stderr
    assert "tpm 5000" in changed.stdout and "max_concurrency 2" in changed.stdout
    shown = gateway.admin("GET", f"/admin/v1/accounts/{account['id']}").json()
    assert shown["rate_limits"] == {"rpm": None, "tpm": 5000, "max_concurrency": 2}
    key = tokenworks("keys", "create", "capped", "--rpm", "1", "--json", env=env)
    assert key.returncode == 0, key.stderr
    assert json.loads(key.stdout)["rate_limits"] == {"rpm": 1, "tpm": None, "max_concurrency": None}
    c = openai.OpenAI(base_url=gateway.v1, api_key=json.loads(key.stdout)["key"], max_retries=0)
    c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=3)
    with pytest.raises(openai.RateLimitError):  # the SDK reads OpenAI's 429
        c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=3)
