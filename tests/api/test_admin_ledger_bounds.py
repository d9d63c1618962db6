"""Admin client mistakes are 400s in the admin API's error shape, never 500s (issue 8)."""

from __future__ import annotations

from typing import Any

from tests.api.test_admin_ledger import create, error, ok, post, send
from tests.conftest import Gateway, both_stores


def test_unbounded_admin_inputs_are_400(gateway: Gateway) -> None:
    org = create(gateway, "acme")
    grants = f"/admin/v1/accounts/{org}/grants"
    cases: list[tuple[str, dict[str, Any], str]] = [
        (grants, {"amount": "1", "expires_at": 10**17}, "expires_at"),
        (grants, {"amount": "1", "expires_at": "9" * 400}, "expires_at"),
        (grants, {"amount": "1", "effective_at": "1500-01-01"}, "effective_at"),
        (grants, {"amount": "1", "expires_at": "1969-12-31"}, "expires_at"),
        (grants, {"amount": "1", "priority": 2**70}, "priority"),
        (grants, {"amount": "1", "recurring": {"period": "day", "tz": "X" * 10_000}}, "recurring.tz"),
        (grants, {"amount": "1", "recurring": {"period": "day", "tz": "Mars/Base"}}, "recurring.tz"),
        (f"/admin/v1/accounts/{org}/budgets", {"amount": "1", "period": "day", "tz": "a\x00b"}, "tz"),
        ("/admin/v1/transfers", {"from": org, "to": org, "amount": "1", "actor": "account:" + "9" * 5000}, "actor"),
    ]  # fmt: skip
    for path, body, param in cases:
        err = error(post(gateway, path, body), 400)
        assert err["param"] == param, (body, err)
    # Back-dated 36 years, daily: refused rather than issuing 13,000 periods.
    body = {"amount": "1", "effective_at": "1990-01-01", "recurring": "day"}
    err = error(post(gateway, grants, body), 400, "invalid_request")
    assert "effective_at" in err["message"]
    statement = f"/admin/v1/accounts/{org}/statement"
    for query in ({"since": "9" * 400}, {"until": "1e400"}, {"since": "99999999999999"}):
        error(send(gateway, "GET", statement, {}, params=query), 400)
    ok(send(gateway, "GET", statement, {}, params={"since": "2026-01-01"}), 200)


@both_stores
def test_changing_a_budgets_tz_applies_it(gateway: Gateway) -> None:
    org = create(gateway, "acme")
    path = f"/admin/v1/accounts/{org}/budgets"
    first = ok(post(gateway, path, {"amount": "1", "period": "day"}), 200)
    assert first["tz"] == "UTC"
    changed = ok(post(gateway, path, {"amount": "1", "period": "day", "tz": "Asia/Tokyo"}), 200)
    assert changed["tz"] == "Asia/Tokyo"
    assert changed["period_end"].endswith("T15:00:00.000Z")  # Tokyo midnight
    listed = ok(gateway.admin("GET", path), 200)["data"]
    assert [b["tz"] for b in listed] == ["Asia/Tokyo"]
