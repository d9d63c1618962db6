"""The ledger's admin API and CLI over real HTTP: accounts, credits, transfers, budgets,
statements, idempotent retries of every write, money validation and the invariant check."""

from __future__ import annotations

import asyncio
import csv
import http.server
import io
import json
import sqlite3
import subprocess
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_KEY, MODELS, Gateway, Sim, both_stores, run_cli

NANO = 10**9


# --------------------------------------------------------------------------- helpers


def post(gw: Gateway, path: str, body: dict[str, Any], key: str | None = "fresh") -> Any:
    if key == "fresh":
        key = str(uuid.uuid4())
    payload = dict(body) if key is None else {**body, "idempotency_key": key}
    return gw.admin("POST", path, json=payload)


def send(gw: Gateway, method: str, path: str, headers: dict[str, str], **kw: Any) -> Any:
    """Like `gw.admin`, with headers of one's own (the admin key unless they say otherwise)."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", **headers}
    return httpx.request(method, f"{gw.url}{path}", headers=headers, timeout=30, **kw)


def ok(response: Any, status: int = 201) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()


def account(gw: Gateway, account_id: int) -> dict[str, Any]:
    return ok(gw.admin("GET", f"/admin/v1/accounts/{account_id}"), 200)


def available_nano(gw: Gateway, account_id: int) -> int:
    return account(gw, account_id)["balance"]["available_nano"]


def create(gw: Gateway, name: str, parent: int | None = None, **extra: Any) -> int:
    return ok(post(gw, "/admin/v1/accounts", {"name": name, "parent": parent, **extra}))["id"]


def top_up(gw: Gateway, account_id: int, amount: str) -> None:
    ok(post(gw, f"/admin/v1/accounts/{account_id}/topups", {"amount": amount}))


def iso(dt: datetime) -> str:
    return dt.isoformat()


def on_server(gw: Gateway, coro: Any) -> Any:
    """Run a ledger coroutine on the gateway's own event loop (the ledger is bound to it)."""
    gateway = gw.app.state.gateway
    loop = getattr(gateway, "loop", None) or gateway.ledger.writer._task.get_loop()
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=10)


def spend(gw: Gateway, account_id: int, price_nano: int, model: str) -> None:
    """A settled request on `account_id`, as the relay would post it."""
    ledger = gw.app.state.gateway.ledger
    request_id = f"req-{uuid.uuid4()}"
    on_server(gw, ledger.hold([account_id], price_nano * 2, request_id=request_id))
    on_server(
        gw,
        ledger.settle(request_id, price_nano=price_nano, cost_nano=1, producer="a", model=model),
    )


def error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["message"] and err["type"]
    if code is not None:
        assert err["code"] == code, err
    return err


def tokenworks(gw: Gateway, *args: str, admin_key: str = ADMIN_KEY) -> subprocess.CompletedProcess:
    env = {"COLUMNS": "200", "TOKENWORKS_URL": gw.url, "TOKENWORKS_ADMIN_KEY": admin_key}
    return run_cli(*args, env=env)


# --------------------------------------------------------------------------- lifecycle


def test_account_lifecycle_with_exact_balances(gateway: Gateway) -> None:
    now = datetime.now(UTC)
    org = ok(post(gateway, "/admin/v1/accounts", {"name": "acme"}))
    assert org["kind"] == "organisation" and org["parent_id"] is None
    assert not org["draws_on_parent"]  # a root has no parent to draw on
    team = ok(post(gateway, "/admin/v1/accounts", {"name": "research", "parent": org["id"]}))
    assert team["kind"] == "team" and team["draws_on_parent"]
    user = create(gateway, "ada", team["id"])
    solo = create(gateway, "bob", team["id"], kind="user", draws_on_parent=False)
    assert account(gateway, user)["kind"] == "user"
    assert account(gateway, solo)["draws_on_parent"] is False

    # Top-up into the organisation, then cash down the tree.
    topped = ok(post(gateway, f"/admin/v1/accounts/{org['id']}/topups", {"amount": "100.00"}))
    assert topped["amount"] == "100" and topped["amount_nano"] == 100 * NANO
    moved = ok(
        post(
            gateway,
            "/admin/v1/transfers",
            {"from": org["id"], "to": team["id"], "amount": "30.000000001"},
        )
    )
    assert moved["from"] == org["id"] and moved["amount"] == "30.000000001"
    assert available_nano(gateway, org["id"]) == 69_999_999_999
    assert available_nano(gateway, team["id"]) == 30_000_000_001
    # An account may move its own credit (actor) down to its subtree.
    ok(
        post(
            gateway,
            "/admin/v1/transfers",
            {"from": team["id"], "to": user, "amount": "0.5", "actor": f"account:{team['id']}"},
        )
    )

    # A one-off grant with expiry, spent before cash (lower priority first).
    one_off = ok(
        post(
            gateway,
            f"/admin/v1/accounts/{user}/grants",
            {"amount": "10.00", "expires_at": iso(now + timedelta(days=1)), "priority": 1},
        )
    )
    assert one_off["recurring"] is None and one_off["rollover"] == "expire"
    # A monthly grant at Paris time, started 70 days ago: at least two boundaries have
    # passed, so the current bucket is the refill (10) plus the rolled-over cap (5).
    monthly = ok(
        post(
            gateway,
            f"/admin/v1/accounts/{user}/grants",
            {
                "amount": "10.00",
                "recurring": {"period": "month", "tz": "Europe/Paris"},
                "rollover": "5.00",
                "effective_at": iso(now - timedelta(days=70)),
            },
        )
    )
    assert monthly["recurring"] == {"period": "month", "tz": "Europe/Paris"}
    assert monthly["rollover"] == "5"
    # A grant that took effect and expired in the past adds nothing now.
    ok(
        post(
            gateway,
            f"/admin/v1/accounts/{user}/grants",
            {
                "amount": "7",
                "effective_at": iso(now - timedelta(days=3)),
                "expires_at": iso(now - timedelta(days=2)),
            },
        )
    )

    view = account(gateway, user)
    assert view["balance"]["available"] == "25.5"  # 0.5 cash + 10 one-off + 15 monthly
    # It may draw on its team (29.500000001) and organisation (69.999999999) too.
    assert view["balance"]["chain_available"] == "125"
    by_source = {(b["source"], b["grant_id"]): b for b in view["buckets"]}
    assert by_source[("cash", None)]["remaining"] == "0.5"
    assert by_source[("grant", one_off["id"])]["expires_at"] is not None
    assert by_source[("grant", one_off["id"])]["remaining"] == "10"
    assert by_source[("grant", monthly["id"])]["remaining"] == "15"
    [grant] = [g for g in view["grants"] if g["id"] == monthly["id"]]
    assert grant["recurring"]["tz"] == "Europe/Paris" and grant["next_due_at"] is not None

    # A monthly budget; spend goes to the monthly grant first (priority 0).
    budget = ok(
        post(gateway, f"/admin/v1/accounts/{user}/budgets", {"amount": "3.00", "period": "month"}),
        200,
    )
    assert budget["limit"] == "3" and budget["scope"] == f"account:{user}"
    spend(gateway, user, 1_250_000_000, "chat-fast")
    view = account(gateway, user)
    assert view["balance"]["available"] == "24.25"
    assert view["balance"]["spent_this_period"] == "1.25"
    assert view["balance"]["period"] == "month"
    assert view["balance"]["spent_by_period"] == {"month": "1.25"}
    # A daily budget set now counts from now; the month stays the period reported.
    day = {"amount": "2.00", "period": "day", "tz": "Europe/Paris"}
    ok(post(gateway, f"/admin/v1/accounts/{user}/budgets", day), 200)
    balance = account(gateway, user)["balance"]
    assert balance["spent_by_period"] == {"month": "1.25", "day": "0"}
    assert (balance["spent_this_period"], balance["period"]) == ("1.25", "month")
    assert view["budgets"][0]["room"] == "1.75"
    by_source = {(b["source"], b["grant_id"]): b for b in view["buckets"]}
    assert by_source[("grant", monthly["id"])]["remaining"] == "13.75"
    listed = ok(gateway.admin("GET", f"/admin/v1/accounts/{user}/budgets"), 200)["data"]
    assert {b["period"]: (b["spent"], b["tz"]) for b in listed} == {
        "month": ("1.25", "UTC"),
        "day": ("0", "Europe/Paris"),
    }

    # Listing: the tree, filtered by parent; operator accounts only when asked.
    children = ok(gateway.admin("GET", f"/admin/v1/accounts?parent={team['id']}"), 200)["data"]
    assert [c["id"] for c in children] == [user, solo]
    everything = ok(gateway.admin("GET", "/admin/v1/accounts"), 200)["data"]
    assert {a["kind"] for a in everything} == {"organisation", "team", "user"}
    with_ops = ok(gateway.admin("GET", "/admin/v1/accounts?include_operator=true"), 200)["data"]
    assert sum(a["balance"]["total_nano"] for a in with_ops) == 0  # double entry


def test_unknown_accounts_are_404(gateway: Gateway) -> None:
    org = create(gateway, "acme")
    error(gateway.admin("GET", "/admin/v1/accounts/999"), 404, "not_found")
    error(gateway.admin("GET", "/admin/v1/accounts/nope"), 404, "not_found")
    error(post(gateway, "/admin/v1/accounts/999/topups", {"amount": "1"}), 404)
    error(post(gateway, "/admin/v1/accounts/999/grants", {"amount": "1"}), 404)
    error(post(gateway, "/admin/v1/accounts/999/budgets", {"amount": "1", "period": "day"}), 404)
    error(gateway.admin("GET", "/admin/v1/accounts/999/statement"), 404)
    error(post(gateway, "/admin/v1/accounts", {"name": "t", "parent": 999}), 404)
    error(post(gateway, "/admin/v1/transfers", {"from": org, "to": 999, "amount": "1"}), 404)
    # None of it opened an account.
    assert [a["id"] for a in ok(gateway.admin("GET", "/admin/v1/accounts"), 200)["data"]] == [org]


BAD_AMOUNTS = [
    ("1e3", "plain decimal"),
    ("0.0000000001", "more than 9 decimal places"),
    ("-5", "greater than 0"),
    ("0", "greater than 0"),
    (12.5, "JSON numbers are refused"),
    (10, "JSON numbers are refused"),
    (True, "JSON numbers are refused"),
    ("", "plain decimal"),
    ("1,5", "plain decimal"),
    (" 1", "plain decimal"),
    ("NaN", "plain decimal"),
    ("9" * 41, "too long"),
    (None, "missing"),
]


@both_stores  # PostgreSQL too: it is the store that cannot hold NUL
def test_bad_amounts_are_400_and_move_nothing(gateway: Gateway) -> None:
    org = create(gateway, "acme")
    team = create(gateway, "team", org)
    top_up(gateway, org, "5")
    for amount, says in BAD_AMOUNTS:
        body = {} if amount is None else {"amount": amount}
        for path, extra in [
            (f"/admin/v1/accounts/{org}/topups", {}),
            (f"/admin/v1/accounts/{org}/grants", {}),
            ("/admin/v1/transfers", {"from": org, "to": team}),
        ]:
            err = error(post(gateway, path, {**body, **extra}), 400)
            assert err["param"] == "amount" and says in err["message"], (amount, err)
    assert available_nano(gateway, org) == 5 * NANO
    assert available_nano(gateway, team) == 0


def test_budget_amounts_may_be_zero_but_not_floats(gateway: Gateway) -> None:
    org = create(gateway, "acme")
    path = f"/admin/v1/accounts/{org}/budgets"
    assert ok(post(gateway, path, {"amount": "0", "period": "day"}), 200)["limit_nano"] == 0
    error(post(gateway, path, {"amount": 0.5, "period": "day"}), 400, "invalid_amount")
    error(post(gateway, path, {"amount": "1", "period": "fortnight"}), 400)
    error(post(gateway, path, {"amount": "1", "period": "day", "tz": "Mars/Olympus"}), 400)


def test_ledger_errors_are_openai_shaped(gateway: Gateway) -> None:
    org = create(gateway, "acme")
    team = create(gateway, "team", org)
    other_org = create(gateway, "globex")
    top_up(gateway, org, "1")
    top_up(gateway, other_org, "1")
    transfers = "/admin/v1/transfers"
    err = error(post(gateway, transfers, {"from": org, "to": team, "amount": "2"}), 402)
    assert err["code"] == "insufficient_quota" and err["type"] == "insufficient_quota"
    assert "needs 2, 1 available" in err["message"]
    error(post(gateway, transfers, {"from": org, "to": other_org, "amount": "1"}), 403)
    # A team may not move its parent's credit.
    body = {"from": org, "to": team, "amount": "1", "actor": f"account:{team}"}
    assert error(post(gateway, transfers, body), 403, "policy_denied")
    error(post(gateway, transfers, {"from": org, "to": org, "amount": "1"}), 400)
    # Operator accounts (1: topups) take no top-ups.
    error(post(gateway, "/admin/v1/accounts/1/topups", {"amount": "1"}), 400)
    # A misspelt field is refused rather than ignored.
    err = error(
        post(gateway, f"/admin/v1/accounts/{org}/grants", {"amount": "1", "expires": "x"}), 400
    )
    assert err["code"] == "unknown_field" and err["param"] == "expires"
    err = error(
        post(gateway, f"/admin/v1/accounts/{org}/grants", {"amount": "1", "rollover": "all"}), 400
    )
    assert "recurring grants only" in err["message"]
    body = {"amount": "1", "recurring": {"period": "total"}}
    error(post(gateway, f"/admin/v1/accounts/{org}/grants", body), 400)
    body = {"amount": "1", "recurring": {"period": "day", "tz": "Nowhere/Land"}}
    error(post(gateway, f"/admin/v1/accounts/{org}/grants", body), 400, "invalid_request")
    body = {"amount": "1", "expires_at": "2000-01-01"}
    error(post(gateway, f"/admin/v1/accounts/{org}/grants", body), 400)
    error(post(gateway, "/admin/v1/accounts", {"name": ""}), 400)
    error(post(gateway, "/admin/v1/accounts", {"name": "x", "kind": "topups"}), 400)
    # NUL, which PostgreSQL cannot store: refused as input, never a failed write (or a 500).
    error(post(gateway, "/admin/v1/accounts", {"name": "a\x00b"}), 400)
    error(post(gateway, "/admin/v1/keys", {"name": "k\x00"}), 400)
    error(send(gateway, "GET", "/admin/v1/usage?key=%00", {}), 400)
    # Nothing moved on any of these.
    assert available_nano(gateway, org) == NANO and available_nano(gateway, team) == 0
    r = post(gateway, "/admin/v1/accounts", {"name": "x"})
    assert r.status_code == 201
    r = send(gateway, "GET", "/admin/v1/ledger/check", {"Authorization": "Bearer no"})
    error(r, 401)
    # A refused write records nothing under its key: once the cause is gone, it goes through.
    body = {"from": org, "to": team, "amount": "2"}
    error(post(gateway, transfers, body, key="move-2"), 402)
    top_up(gateway, org, "1")
    ok(post(gateway, transfers, body, key="move-2"))
    assert available_nano(gateway, team) == 2 * NANO


# --------------------------------------------------------------------------- idempotency

# (name, path, first body, conflicting body, first status); `{org}`, `{team}` are filled in.
WRITES = [
    ("account", "/admin/v1/accounts", {"name": "ops", "parent": "{org}"}, {"name": "ops2", "parent": "{org}"}, 201),
    ("topup", "/admin/v1/accounts/{org}/topups", {"amount": "2.5"}, {"amount": "2.6"}, 201),
    ("grant", "/admin/v1/accounts/{team}/grants", {"amount": "3", "priority": 2}, {"amount": "3", "priority": 3}, 201),
    ("transfer", "/admin/v1/transfers", {"from": "{org}", "to": "{team}", "amount": "1"}, {"from": "{org}", "to": "{team}", "amount": "1.5"}, 201),
    ("budget", "/admin/v1/accounts/{team}/budgets", {"amount": "4", "period": "week"}, {"amount": "4", "period": "week", "tz": "Asia/Tokyo"}, 200),
]  # fmt: skip


def _fill(value: Any, ids: dict[str, int]) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return ids[value[1:-1]]
    return value.format(**ids) if isinstance(value, str) else value


def _state(gw: Gateway) -> list[tuple[int, int, dict[str, int]]]:
    accounts = ok(gw.admin("GET", "/admin/v1/accounts?include_operator=true"), 200)["data"]
    return [
        (a["id"], a["balance"]["total_nano"], a["balance"]["spent_by_period_nano"])
        for a in accounts
    ]


@pytest.mark.parametrize("write", WRITES, ids=[w[0] for w in WRITES])
def test_every_admin_write_is_idempotent(gateway: Gateway, write: tuple) -> None:
    _, path, first, conflicting, status = write
    ids = {"org": create(gateway, "acme")}
    ids["team"] = create(gateway, "team", ids["org"])
    top_up(gateway, ids["org"], "10")
    path, first, conflicting = _fill(path, ids), _fill(first, ids), _fill(conflicting, ids)

    # Without a key, nothing happens and the answer says why.
    before = _state(gateway)
    err = error(post(gateway, path, first, key=None), 400, "missing_idempotency_key")
    assert err["param"] == "idempotency_key"
    assert _state(gateway) == before

    key = f"k-{uuid.uuid4()}"
    r1 = post(gateway, path, first, key=key)
    assert r1.status_code == status, r1.text
    after = _state(gateway)
    assert after != before  # the write did something...
    for _ in range(2):  # ...and its retries do nothing more, answering the same
        r = post(gateway, path, first, key=key)
        assert (r.status_code, r.json()) == (status, r1.json())
    r = send(gateway, "POST", path, {"Idempotency-Key": key}, json=first)
    assert (r.status_code, r.json()) == (status, r1.json())
    assert _state(gateway) == after

    err = error(post(gateway, path, conflicting, key=key), 409, "idempotency_conflict")
    assert err["type"] == "conflict_error"
    # A key is one operation: reusing it for another kind of write conflicts too.
    other = post(gateway, f"/admin/v1/accounts/{ids['org']}/topups", {"amount": "9"}, key=key)
    error(other, 409, "idempotency_conflict")
    assert _state(gateway) == after
    # Header and body must agree when both are given.
    r = send(
        gateway, "POST", path, {"Idempotency-Key": "other"}, json={**first, "idempotency_key": key}
    )
    error(r, 400)


def test_retries_are_recognised_after_a_restart(make_gateway, sim_a: Sim) -> None:
    producers = {"a": sim_a.url, "b": sim_a.url}
    with make_gateway(producers, MODELS, name="restart") as gw:
        org = create(gw, "acme")
        first = ok(post(gw, f"/admin/v1/accounts/{org}/topups", {"amount": "4"}, key="t-1"))
    with make_gateway(producers, MODELS, name="restart") as gw:
        again = ok(post(gw, f"/admin/v1/accounts/{org}/topups", {"amount": "4"}, key="t-1"))
        assert again == first
        # The same amount spelt differently is the same request.
        same = ok(post(gw, f"/admin/v1/accounts/{org}/topups", {"amount": "4.000"}, key="t-1"))
        assert same == first
        assert available_nano(gw, org) == 4 * NANO
        error(post(gw, f"/admin/v1/accounts/{org}/topups", {"amount": "5"}, key="t-1"), 409)


def test_a_revoked_grant_stays_revoked_after_a_restart(make_gateway, sim_a: Sim) -> None:
    producers = {"a": sim_a.url, "b": sim_a.url}
    with make_gateway(producers, MODELS, name="revoke") as gw:
        org = create(gw, "acme")
        top_up(gw, org, "1")
        body = {"amount": "3", "recurring": {"period": "day"}}
        grant = ok(post(gw, f"/admin/v1/accounts/{org}/grants", body))["id"]
        r = ok(gw.admin("DELETE", f"/admin/v1/accounts/{org}/grants/{grant}"), 200)
        assert r["revoked"] is True and r["expired"] == "3"
        assert available_nano(gw, org) == NANO
    with make_gateway(producers, MODELS, name="revoke") as gw:
        assert available_nano(gw, org) == NANO
        assert account(gw, org)["grants"] == []
        error(gw.admin("DELETE", f"/admin/v1/accounts/{org}/grants/{grant + 1}"), 404)
        assert ok(gw.admin("GET", "/admin/v1/ledger/check"), 200)["ok"] is True


# --------------------------------------------------------------------------- statements


def test_a_statement_before_the_retention_horizon_is_a_400(gateway: Gateway) -> None:
    """Transfers before the horizon were deleted by retention: a statement that would need
    them is refused, naming the horizon and the export; from the horizon on it answers."""
    org = create(gateway, "acme")
    top_up(gateway, org, "5")
    week_ms = 7 * 86_400_000
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    horizon_ms = (now_ms - 50 * 86_400_000) // week_ms * week_ms
    db = sqlite3.connect(gateway.db_path, timeout=10)
    try:
        with db:  # what the retention job writes as it moves the horizon
            db.execute(
                "INSERT INTO ledger_meta (k, v) VALUES ('transfers_horizon_ms', ?)", (horizon_ms,)
            )
    finally:
        db.close()
    path = f"/admin/v1/accounts/{org}/statement"
    horizon = datetime.fromtimestamp(horizon_ms / 1000, UTC)
    early = {"since": iso(horizon - timedelta(days=1))}
    for fmt in ("json", "csv"):
        err = error(gateway.admin("GET", path, params={**early, "format": fmt}), 400)
        assert err["code"] == "before_retention_horizon" and err["param"] == "since", err
        assert horizon.isoformat().replace("+00:00", "Z") in err["message"], err
        assert "tokenworks export" in err["message"], err
    s = ok(gateway.admin("GET", path, params={"since": iso(horizon)}), 200)
    assert s["closing_nano"] == 5 * NANO


def test_statement_json_and_csv_agree_with_the_movements(gateway: Gateway) -> None:
    now = datetime.now(UTC)
    org = create(gateway, "acme")
    user = create(gateway, "ada", org, kind="user")
    top_up(gateway, org, "50")
    top_up(gateway, user, "2.000000001")
    ok(post(gateway, "/admin/v1/transfers", {"from": org, "to": user, "amount": "8"}))
    ok(post(gateway, f"/admin/v1/accounts/{user}/grants", {"amount": "20"}))
    past = {
        "effective_at": iso(now - timedelta(days=3)),
        "expires_at": iso(now - timedelta(days=2)),
    }
    ok(post(gateway, f"/admin/v1/accounts/{user}/grants", {"amount": "7", **past}))
    ok(post(gateway, "/admin/v1/transfers", {"from": user, "to": org, "amount": "1"}))
    spend(gateway, user, 1_500_000_000, "chat-fast")
    spend(gateway, user, 250_000_000, "chat-fast")
    spend(gateway, user, 3_000_000_007, "embed")

    query = {"since": iso(now - timedelta(days=7)), "until": iso(now + timedelta(minutes=1))}
    path = f"/admin/v1/accounts/{user}/statement"
    s = ok(gateway.admin("GET", path, params=query), 200)
    assert s["opening_nano"] == 0
    assert s["top_ups_nano"] == 2_000_000_001
    assert s["grants_nano"] == 27 * NANO and s["expired_nano"] == 7 * NANO
    assert s["transfers_in_nano"] == 8 * NANO and s["transfers_out_nano"] == NANO
    assert s["spend_nano"] == 4_750_000_007
    assert s["spend_by_model"] == {
        "chat-fast": {"spend_nano": 1_750_000_000, "requests": 2, "spend": "1.75"},
        "embed": {"spend_nano": 3_000_000_007, "requests": 1, "spend": "3.000000007"},
    }
    lines_in = s["top_ups_nano"] + s["grants_nano"] + s["transfers_in_nano"]
    lines_out = s["transfers_out_nano"] + s["expired_nano"] + s["spend_nano"]
    assert s["closing_nano"] == s["opening_nano"] + lines_in - lines_out
    assert s["closing_nano"] == account(gateway, user)["balance"]["total_nano"] == 24_249_999_994
    assert s["display"]["closing"] == "24.249999994"

    r = gateway.admin("GET", path, params={**query, "format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    totals = {row["line"]: int(row["amount_nano"]) for row in rows if not row["model"]}
    for line in (
        "opening",
        "top_ups",
        "grants",
        "transfers_in",
        "transfers_out",
        "expired",
        "spend",
        "closing",
    ):
        assert totals[line] == s[f"{line}_nano"], line
    per_model = {
        row["model"]: (int(row["amount_nano"]), row["requests"]) for row in rows if row["model"]
    }
    assert per_model == {"chat-fast": (1_750_000_000, "2"), "embed": (3_000_000_007, "1")}

    # A later window opens where this one closed and has no lines.
    later = {"since": query["until"], "until": iso(now + timedelta(minutes=2))}
    s2 = ok(gateway.admin("GET", path, params=later), 200)
    assert s2["opening_nano"] == s2["closing_nano"] == s["closing_nano"]
    assert s2["spend_nano"] == s2["grants_nano"] == 0
    # The default window (this month, up to now) sees this statement's closing balance.
    assert ok(gateway.admin("GET", path), 200)["closing_nano"] == s["closing_nano"]
    bad = {"since": query["until"], "until": query["since"]}
    error(gateway.admin("GET", path, params=bad), 400)
    error(gateway.admin("GET", path, params={"since": "yesterday"}), 400)


# --------------------------------------------------------------------------- check and CLI


def _corrupt_a_balance(gw: Gateway, account_id: int) -> None:
    db = sqlite3.connect(gw.db_path, timeout=10)
    with db:
        db.execute(
            "UPDATE ledger_accounts SET balance_nano = balance_nano + 1 WHERE id = ?",
            (account_id,),
        )
    db.close()


def test_ledger_check_endpoint_and_cli(gateway: Gateway) -> None:
    org = create(gateway, "acme")
    top_up(gateway, org, "3")
    spend(gateway, org, 10, "chat-fast")
    r = ok(gateway.admin("GET", "/admin/v1/ledger/check"), 200)
    assert r["ok"] is True and r["violations"] == [] and r["store_compared"] is True
    cli = tokenworks(gateway, "ledger", "check")
    assert cli.returncode == 0 and "sound" in cli.stdout, cli.stderr

    _corrupt_a_balance(gateway, org)
    r = gateway.admin("GET", "/admin/v1/ledger/check")
    assert r.status_code == 500
    body = r.json()
    assert body["ok"] is False and body["error"]["code"] == "ledger_unsound"
    assert any(f"store account {org}" in v for v in body["violations"]), body
    cli = tokenworks(gateway, "ledger", "check")
    assert cli.returncode == 1 and f"store account {org}" in cli.stderr, cli.stderr


def test_cli_covers_the_lifecycle(gateway: Gateway) -> None:
    def run(*args: str) -> Any:
        result = tokenworks(gateway, *args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    org = run("accounts", "create", "acme")["id"]
    team = run("accounts", "create", "research", "--parent", str(org))
    assert team["kind"] == "team"
    user = run("accounts", "create", "ada", "--parent", str(team["id"]), "--no-draw")
    assert user["kind"] == "user" and user["draws_on_parent"] is False
    first = run("topup", str(org), "12.5", "--idempotency-key", "cli-topup-1")
    again = run("topup", str(org), "12.5", "--idempotency-key", "cli-topup-1")
    assert first == again
    run("transfer", str(org), str(team["id"]), "2.5")
    grant = run(
        "grants", "add", str(user["id"]), "4", "--every", "week", "--tz", "Asia/Tokyo",
        "--rollover", "all", "--priority", "3",
    )  # fmt: skip
    assert grant["recurring"] == {"period": "week", "tz": "Asia/Tokyo"}
    assert grant["rollover"] == "all" and grant["priority"] == 3
    run("budgets", "set", str(user["id"]), "1.5", "--period", "day")

    shown = run("accounts", "show", str(org))
    assert shown["balance"]["available"] == "10"  # 12.5 once, not twice, less 2.5
    assert run("accounts", "show", str(user["id"]))["budgets"][0]["limit"] == "1.5"
    listed = run("accounts", "list", "--parent", str(org))
    assert [a["id"] for a in listed["data"]] == [team["id"]]

    table = tokenworks(gateway, "accounts", "show", str(user["id"]))
    assert table.returncode == 0 and "grant" in table.stdout and "budget per day" in table.stdout
    since = iso(datetime.now(UTC) - timedelta(hours=1))
    csv_out = tokenworks(gateway, "statement", str(org), "--since", since, "--csv")
    assert csv_out.returncode == 0, csv_out.stderr
    totals = {row["line"]: row["amount"] for row in csv.DictReader(io.StringIO(csv_out.stdout))}
    assert totals["top_ups"] == "12.5" and totals["transfers_out"] == "2.5"
    assert totals["closing"] == "10"
    text = tokenworks(gateway, "statement", str(org), "--since", since)
    assert text.returncode == 0 and "Closing balance" in text.stdout and "10.00" in text.stdout

    # Refusals exit 1 with the gateway's message; a missing admin key exits 2.
    bad = tokenworks(gateway, "topup", str(org), "1e3")
    assert bad.returncode == 1 and "400" in bad.stderr and "plain decimal" in bad.stderr
    conflict = tokenworks(gateway, "topup", str(org), "99", "--idempotency-key", "cli-topup-1")
    assert conflict.returncode == 1 and "409" in conflict.stderr
    assert tokenworks(gateway, "ledger", "check", admin_key="").returncode == 2
    assert run("accounts", "show", str(org))["balance"]["available"] == "10"


def test_cli_prints_a_retry_key_when_the_outcome_is_unknown(tmp_path: Any) -> None:
    unreachable = Gateway("http://127.0.0.1:9", None, tmp_path / "none.db")
    result = tokenworks(unreachable, "topup", "1", "5")
    assert result.returncode == 1
    # Nothing was sent (the account is looked up first), so there is nothing to retry.
    assert "cannot reach" in result.stderr and "--idempotency-key" not in result.stderr

    class Failing(http.server.BaseHTTPRequestHandler):
        """Finds the account, then fails the write with a 502: its outcome is unknown."""

        def do_GET(self) -> None:
            acme = {"id": 1, "name": "acme", "kind": "organisation"}
            self._answer(200, {"data": [acme]} if "?" in self.path else acme)

        def do_POST(self) -> None:
            self._answer(502, {"error": {"message": "bad gateway"}})

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        failing = Gateway(f"http://127.0.0.1:{server.server_port}", None, tmp_path / "x.db")
        result = tokenworks(failing, "topup", "acme", "5")
    finally:
        server.shutdown()
        thread.join(timeout=10)
    assert result.returncode == 1
    assert "502" in result.stderr
    assert "--idempotency-key" in result.stderr


def test_a_transfer_refused_for_grant_credit_says_it_cannot_be_transferred(
    gateway: Gateway,
) -> None:
    org = create(gateway, "acme")
    team = create(gateway, "team", org)
    top_up(gateway, org, "0.01")
    body = {"amount": "4.99", "idempotency_key": "g-1"}
    ok(gateway.admin("POST", f"/admin/v1/accounts/{org}/grants", json=body))
    transfer = {"from": org, "to": team, "amount": "1", "idempotency_key": "t-1"}
    r = gateway.admin("POST", "/admin/v1/transfers", json=transfer)
    assert r.status_code == 402
    message = r.json()["error"]["message"]
    assert "0.01 available" in message, message
    assert "other 4.99 is grant credit" in message and "cannot be transferred" in message
