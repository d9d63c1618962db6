"""Every admin body (and POST /v1/keys) refuses a field it does not know, as the config
does: a 400 in the API's shape naming the field, and nothing made. A misspelt "limits" must
never make a key without its budget."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Gateway


def _refused(r: httpx.Response, field: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "unknown_field"
    assert error["param"] == field
    assert repr(field) in error["message"]


def test_a_misspelt_limit_on_key_creation_makes_no_key(gateway: Gateway) -> None:
    account, _ = gateway.funded_key(10**9)
    before = gateway.admin("GET", "/admin/v1/keys").json()["data"]
    body = {"name": "k", "account": account, "limits": {"amount": "5.00", "period": "day"}}
    _refused(gateway.admin("POST", "/admin/v1/keys", json=body), "limits")
    nested = {"name": "k", "account": account, "limit": {"amount": "5.00", "perod": "day"}}
    _refused(gateway.admin("POST", "/admin/v1/keys", json=nested), "limit.perod")
    assert gateway.admin("GET", "/admin/v1/keys").json()["data"] == before


def test_a_misspelt_field_on_a_child_key_makes_no_child(gateway: Gateway) -> None:
    _, parent = gateway.funded_key(10**9, limit={"amount": "1", "period": "total"})
    headers = {"Authorization": f"Bearer {parent['key']}"}
    for body, field in [
        ({"name": "c", "limit": {"amount": "0.1"}, "ttl": 5}, "ttl"),
        ({"name": "c", "limit": {"amount": "0.1", "priod": "total"}}, "limit.priod"),
        ({"name": "c", "limit": {"amount": "0.1"}, "rate_limits": {"rmp": 1}}, "rate_limits.rmp"),
    ]:
        r = httpx.post(f"{gateway.v1}/keys", headers=headers, json=body, timeout=30)
        _refused(r, field)
    assert len(gateway.admin("GET", "/admin/v1/keys").json()["data"]) == 1


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/admin/v1/accounts", {"name": "x", "kindd": "team"}, "kindd"),
        ("/admin/v1/accounts", {"name": "x", "rate_limits": {"tmp": 5}}, "rate_limits.tmp"),
        ("/admin/v1/accounts/{a}/topups", {"amount": "1", "amout": "2"}, "amout"),
        (
            "/admin/v1/accounts/{a}/grants",
            {"amount": "1", "recurring": {"period": "month", "tzz": "UTC"}},
            "recurring.tzz",
        ),
        ("/admin/v1/accounts/{a}/grants", {"amount": "1", "expires": "2030-01-01"}, "expires"),
        ("/admin/v1/transfers", {"from": "{a}", "to": "{a}", "amount": "1", "actr": "x"}, "actr"),
        ("/admin/v1/accounts/{a}/budgets", {"amount": "1", "period": "day", "tzz": "UTC"}, "tzz"),
        ("/admin/v1/accounts/{a}/rate_limits", {"rpn": 5}, "rpn"),
    ],
)
def test_every_ledger_admin_body_names_an_unknown_field(
    gateway: Gateway, path: str, body: dict, field: str
) -> None:
    account, _ = gateway.funded_key(10**9)
    filled = {k: (str(account) if v == "{a}" else v) for k, v in body.items()}
    r = gateway.admin(
        "POST", path.format(a=account), json={**filled, "idempotency_key": f"strict-{field}"}
    )
    _refused(r, field)
    view = gateway.admin("GET", f"/admin/v1/accounts/{account}").json()
    assert view["balance"]["available"] == "1"  # nothing moved
    assert view["rate_limits"] is None and view["budgets"] == [] and len(view["grants"]) == 0
    names = [a["name"] for a in gateway.admin("GET", "/admin/v1/accounts").json()["data"]]
    assert "x" not in names
