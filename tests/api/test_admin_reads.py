"""Admin reads never block paying traffic, and stop at their time limit with a 503."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, both_stores
from tokenworks.metering import store as usage_store

pytestmark = both_stores

CHAT = [{"role": "user", "content": "hello"}]
WAIT_S = 20.0  # bound on every wait; reached only when the behaviour under test is broken


def test_a_slow_usage_query_does_not_stall_a_paying_request(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usage query blocks until the paying request has finished: with the query on the
    event loop, the request could not finish first and the order below would flip."""
    _, key = gateway.funded_key(1_000_000_000)
    store = gateway.app.state.gateway.store  # type: ignore[attr-defined]
    entered, release = threading.Event(), threading.Event()
    query = store.query_page  # a grouped summary is read a page at a time

    def slow_query(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(WAIT_S)
        return query(*args, **kwargs)

    monkeypatch.setattr(store, "query_page", slow_query)
    finished: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:

        def admin() -> int:
            status = gateway.admin("GET", "/admin/v1/usage", params={"group_by": "key"})
            finished.append("usage")
            return status.status_code

        pending = pool.submit(admin)
        assert entered.wait(WAIT_S)
        r = httpx.post(
            f"{gateway.v1}/chat/completions",
            headers={"Authorization": f"Bearer {key['key']}"},
            json={"model": "chat-fast", "messages": CHAT, "max_tokens": 5},
            timeout=WAIT_S * 2,
        )
        finished.append("paying")
        release.set()
        assert pending.result(WAIT_S * 2) == 200
    assert r.status_code == 200, r.text
    assert finished == ["paying", "usage"]


def test_a_usage_query_past_its_time_limit_is_a_503(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query that would run for minutes is stopped at the limit: a 503 in the API's shape."""
    store = gateway.app.state.gateway.store  # type: ignore[attr-defined]
    store.read_timeout_s = 0.2
    slow = {
        # A count to 10^10: minutes of work on either database, never finishing in a test.
        "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
        "WHERE x < 10000000000) SELECT count(*) AS requests FROM c",
        "postgres": "SELECT count(*) AS requests FROM generate_series(1, 10000000000)",
    }[store.dialect]

    def query_sql(*args: Any, **kwargs: Any) -> tuple[str, list[Any]]:
        return slow, []

    monkeypatch.setattr(usage_store, "query_sql", query_sql)
    r = gateway.admin("GET", "/admin/v1/usage")
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "query_timeout" and "time limit" in error["message"]
    # The store's read connection is usable again afterwards.
    monkeypatch.undo()
    assert gateway.admin("GET", "/admin/v1/usage").status_code == 200


def test_keys_are_listed_in_pages(gateway: Gateway) -> None:
    """`limit` and `after` (the previous page's last id) with `has_more`, in creation order,
    revoked keys included unless asked otherwise; a bad `after` or `limit` is a 400."""
    made = [gateway.create_key(name=f"k{i}")["id"] for i in range(5)]
    assert gateway.admin("DELETE", f"/admin/v1/keys/{made[1]}").status_code == 200
    seen: list[str] = []
    after: dict[str, str] = {}
    for _ in range(10):
        r = gateway.admin("GET", "/admin/v1/keys", params={"limit": "2", **after})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["data"]) <= 2
        seen += [k["id"] for k in body["data"]]
        if not body["has_more"]:
            break
        after = {"after": body["data"][-1]["id"]}
    assert seen == made
    live = gateway.admin("GET", "/admin/v1/keys", params={"include_revoked": "false"}).json()
    assert [k["id"] for k in live["data"]] == [k for k in made if k != made[1]]
    revoked = gateway.admin("GET", f"/admin/v1/keys/{made[1]}").json()
    assert revoked["revoked_at"] is not None  # read from the table: memory keeps live keys
    for params in ({"after": "key_nope"}, {"limit": "0"}, {"limit": "1001"}):
        r = gateway.admin("GET", "/admin/v1/keys", params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] in params, r.text


def test_listings_filter_by_name_in_any_case(gateway: Gateway) -> None:
    """`name` on the key and account listings: what the CLI resolves a typed name with."""
    made = [gateway.create_key(name=n)["id"] for n in ("ada-agent", "Ada-Agent", "bob")]
    r = gateway.admin("GET", "/admin/v1/keys", params={"name": "ADA-AGENT"})
    assert r.status_code == 200, r.text
    assert [k["id"] for k in r.json()["data"]] == made[:2]
    for name in ("Acme", "acme corp", "ACME"):
        body = {"name": name, "idempotency_key": f"a-{name}"}
        assert gateway.admin("POST", "/admin/v1/accounts", json=body).status_code == 201
    r = gateway.admin("GET", "/admin/v1/accounts", params={"name": "acme", "limit": "1"})
    page = r.json()
    assert [a["name"] for a in page["data"]] == ["Acme"] and page["has_more"] is True
    after = {"name": "acme", "after": page["data"][0]["id"]}
    rest = gateway.admin("GET", "/admin/v1/accounts", params=after).json()
    assert [a["name"] for a in rest["data"]] == ["ACME"] and rest["has_more"] is False
    for path in ("/admin/v1/keys", "/admin/v1/accounts"):
        r = gateway.admin("GET", path, params={"name": "x" * 257})
        assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text


def test_a_ledger_check_past_its_time_limit_is_a_503(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check's comparison, held on its thread past the ledger's read limit, is answered
    as a 503 `query_timeout` like the other admin reads; released, the next check passes."""
    from tokenworks.ledger import auditor

    ledger = gateway.app.state.gateway.ledger  # type: ignore[attr-defined]
    release = threading.Event()
    real = auditor.cut_violations

    def held(*args: Any) -> list[str]:
        release.wait(WAIT_S)
        return real(*args)

    monkeypatch.setattr(auditor, "cut_violations", held)
    ledger.read_timeout_s = 0.2
    try:
        r = gateway.admin("GET", "/admin/v1/ledger/check")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "query_timeout"
    finally:
        release.set()
    ledger.read_timeout_s = WAIT_S
    r = gateway.admin("GET", "/admin/v1/ledger/check")
    assert r.status_code == 200 and r.json()["ok"], r.text


def test_a_usage_answer_is_whole_json_whatever_its_size(gateway: Gateway) -> None:
    """The answer is encoded in chunks (`ENCODE_CHUNK_ROWS`); empty, one chunk and more
    must all be one valid JSON document."""
    empty = gateway.admin("GET", "/admin/v1/usage", params={"group_by": "key"})
    assert empty.status_code == 200 and empty.json() == {
        "object": "list", "group_by": ["key"], "has_more": False, "next_after": None, "data": []
    }  # fmt: skip
    for i in range(3):
        key = gateway.create_key(name=f"u{i}")
        c = httpx.post(
            f"{gateway.v1}/chat/completions",
            headers={"Authorization": f"Bearer {key['key']}"},
            json={"model": "chat-fast", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert c.status_code == 200, c.text
    body = gateway.admin("GET", "/admin/v1/usage", params={"group_by": "key"}).json()
    assert len(body["data"]) == 3 and all(r["requests"] == 1 for r in body["data"])
    assert {"cost", "price", "total_tokens"} <= set(body["data"][0])


def test_a_grouped_usage_answer_comes_in_pages(gateway: Gateway) -> None:
    """`limit` values of the first group a page, `next_after` to the next; the CLI's walk
    (`resolve.usage`) puts the pages back together into the whole answer."""
    from tokenworks.cli import resolve

    for i in range(5):
        key = gateway.create_key(name=f"p{i}")
        c = httpx.post(
            f"{gateway.v1}/chat/completions",
            headers={"Authorization": f"Bearer {key['key']}"},
            json={"model": "chat-fast", "messages": CHAT, "max_tokens": 5},
            timeout=30,
        )
        assert c.status_code == 200, c.text

    def get(path: str) -> Any:
        r = gateway.admin("GET", path)
        assert r.status_code == 200, r.text
        return r.json()

    whole = get("/admin/v1/usage?group_by=key,model&limit=10000")
    assert len(whole["data"]) == 5 and whole["has_more"] is False
    pages, after = [], None
    for _ in range(10):
        page = get(
            "/admin/v1/usage?group_by=key,model&limit=2" + (f"&after={after}" if after else "")
        )
        pages.append(page["data"])
        if not page["has_more"]:
            break
        after = page["next_after"]
        assert after == page["data"][-1]["key"]
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [r for p in pages for r in p] == whole["data"]
    walked = resolve.usage(get, {"group_by": "key,model", "limit": "2"})
    assert walked["data"] == whole["data"] and walked["has_more"] is False
    # By day: a page of calendar days; by status: `after` is a number.
    assert get("/admin/v1/usage?group_by=day&limit=1")["has_more"] is False
    assert get("/admin/v1/usage?group_by=status&after=200")["data"] == []


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("group_by=team&after=3", "after"),  # a rolled-up first group cannot be paged
        ("group_by=month&limit=5", "limit"),
        ("group_by=key&limit=0", "limit"),
        ("group_by=key&limit=10001", "limit"),
        ("group_by=key&limit=ten", "limit"),
        ("group_by=status&after=ok", "after"),
        ("group_by=day&after=2026-13-01", "after"),
        ("group_by=key&after=a%00b", "after"),
        ("group_by=colour&limit=5", "group_by"),  # an unknown group is named as such
    ],
)
def test_a_bad_usage_page_is_a_400(gateway: Gateway, query: str, param: str) -> None:
    r = gateway.admin("GET", f"/admin/v1/usage?{query}")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
