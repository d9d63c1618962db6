"""Everything a client can make the gateway keep through key creation is bounded: sub-agent
keys per key and per tree, their mint rate, names, metadata, TTLs; and a retried creation
that asks for something else is a 409, on both endpoints. Real HTTP, on both stores."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import MODELS, Gateway, Sim, both_stores
from tokenworks.keys.store import KeyStore
from tokenworks.ledger import AccountKind

pytestmark = both_stores

LIMITS = """\
keys:
  max_children_per_key: 3
  max_keys_per_tree: 4
  mint_burst: 50
  mint_rate_per_s: 0.001
"""


@pytest.fixture
def limited(make_gateway, sims: tuple[Sim, Sim]) -> Iterator[Gateway]:
    a, b = sims
    with make_gateway({"a": a.url, "b": b.url}, MODELS, LIMITS) as gw:
        yield gw


def mint(gw: Gateway, secret: str, name: str, **extra: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"}
    headers.update(extra.pop("headers", {}))  # type: ignore[arg-type]
    body = {"name": name, "limit": {"amount": "0.001"}, **extra}
    return httpx.post(f"{gw.v1}/keys", headers=headers, json=body, timeout=30)


def key_names(gw: Gateway) -> list[str]:
    return [k["name"] for k in gw.admin("GET", "/admin/v1/keys").json()["data"]]


def test_live_children_per_key_are_capped_and_revoking_one_makes_room(limited: Gateway) -> None:
    _, parent = limited.funded_key(10**9, limit={"amount": "1", "period": "total"})
    children = [mint(limited, parent["key"], f"sub-{i}") for i in range(3)]
    assert [r.status_code for r in children] == [201, 201, 201]
    r = mint(limited, parent["key"], "sub-3")
    assert r.status_code == 403 and r.json()["error"]["code"] == "too_many_keys"
    assert "sub-3" not in key_names(limited)
    assert limited.admin("DELETE", f"/admin/v1/keys/{children[0].json()['id']}").status_code == 200
    assert mint(limited, parent["key"], "sub-3").status_code == 201


def test_expired_keys_stop_counting_once_a_count_reaches_its_cap(database: str) -> None:
    """The counts behind the caps, at chosen times (no sleeping): an expired child is pruned
    when its parent's count reaches the cap, and so is it from its tree's count."""
    keys = KeyStore.open(database)
    try:
        root, _ = keys.create("root")
        child, _ = keys.create("child", parent_id=root.id)
        keys.create("brief", parent_id=root.id, ttl_s=60)
        keys.create("grandchild", parent_id=child.id, ttl_s=60)
        now_ms = int(time.time() * 1000)
        later_ms = now_ms + 61_000
        assert keys.live_children(root.id, now_ms, cap=2) == 2
        assert keys.live_descendants(root.id, now_ms, cap=3) == 3
        assert keys.live_children(root.id, later_ms, cap=10) == 2  # below the cap: not pruned
        assert keys.live_children(root.id, later_ms, cap=2) == 1
        assert keys.live_descendants(root.id, later_ms, cap=3) == 1
        assert len(keys.revoke(child.id)) == 2  # and its grandchild
        assert keys.live_descendants(root.id, later_ms, cap=1) == 0
        again = KeyStore.open(database)  # counted afresh from the table at start
        try:
            assert again.live_children(root.id, now_ms, cap=1) == 1  # "brief", for a minute
            assert again.live_descendants(root.id, now_ms, cap=1) == 1
        finally:
            again.close()
    finally:
        keys.close()


def test_a_key_tree_is_capped_at_every_depth(limited: Gateway) -> None:
    _, root = limited.funded_key(10**9, limit={"amount": "1", "period": "total"})
    first = mint(limited, root["key"], "child-1", limit={"amount": "0.1"})
    assert first.status_code == 201
    assert mint(limited, root["key"], "child-2").status_code == 201
    child = first.json()["key"]
    assert mint(limited, child, "grandchild-1").status_code == 201
    assert mint(limited, child, "grandchild-2").status_code == 201
    # Four live keys below the root: no fifth, whichever key asks.
    for secret in (root["key"], child):
        r = mint(limited, secret, "one-too-many")
        assert r.status_code == 403 and r.json()["error"]["code"] == "too_many_keys"


def test_minting_is_rate_limited_per_tree_with_retry_after(make_gateway, sims) -> None:
    a, _ = sims
    extra = "keys: {mint_burst: 3, mint_rate_per_s: 0.01}\n"
    with make_gateway({"a": a.url, "b": a.url}, MODELS, extra) as gw:
        _, parent = gw.funded_key(10**9, limit={"amount": "1", "period": "total"})
        first = mint(gw, parent["key"], "s-0", headers={"Idempotency-Key": "s-0"})
        assert first.status_code == 201
        child = first.json()["key"]
        assert mint(gw, parent["key"], "s-1").status_code == 201
        assert mint(gw, child, "g-0").status_code == 201  # a child draws on the same bucket
        for secret in (parent["key"], child):
            r = mint(gw, secret, "s-3")
            assert r.status_code == 429, r.text
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert int(r.headers["retry-after"]) >= 1
        # A retry of a key already made grows nothing: it is answered, not limited.
        again = mint(gw, parent["key"], "s-0", headers={"Idempotency-Key": "s-0"})
        assert again.status_code == 201 and again.json() == first.json()


def test_names_and_metadata_are_bounded(gateway: Gateway) -> None:
    account, parent = gateway.funded_key(10**9, limit={"amount": "1", "period": "total"})
    big = "n" * 100_000
    for body, param in [
        ({"name": big}, "name"),
        ({"name": "x" * 257}, "name"),
        ({"name": "ok", "metadata": {f"k{i}": "v" for i in range(33)}}, "metadata"),
        ({"name": "ok", "metadata": {"k": "v" * 513}}, "metadata"),
        ({"name": "ok", "metadata": {"k" * 65: "v"}}, "metadata"),
        ({"name": "ok", "metadata": {"k": {"nested": "object"}}}, "metadata"),
        ({"name": "ok", "metadata": {"k": "a\x00b"}}, "metadata"),
        ({"name": "ok", "metadata": ["not", "an", "object"]}, "metadata"),
    ]:
        r = gateway.admin("POST", "/admin/v1/keys", json={**body, "account": account})
        assert r.status_code == 400, (param, r.text)
        assert r.json()["error"]["param"] == param
    # The finding: sub-agent keys with huge names, minted again and again, were kept for good.
    for i in range(20):
        r = mint(gateway, parent["key"], f"{i}-{big}")
        assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert not [n for n in key_names(gateway) if len(n) > 256]
    ok = gateway.admin(
        "POST", "/admin/v1/keys", json={"name": "n" * 256, "metadata": {"team": "ml", "n": 3}}
    )
    assert ok.status_code == 201 and ok.json()["metadata"] == {"team": "ml", "n": "3"}


def test_absurd_ttls_are_400_not_a_store_overflow(gateway: Gateway) -> None:
    _, parent = gateway.funded_key(10**9, limit={"amount": "1", "period": "total"})
    for ttl in (1e300, 10**30, 2**63, -1, 0, True, "600"):
        r = gateway.admin("POST", "/admin/v1/keys", json={"name": "t", "ttl_s": ttl})
        assert r.status_code == 400 and r.json()["error"]["param"] == "ttl_s", (ttl, r.text)
        r = mint(gateway, parent["key"], "t", ttl_s=ttl)
        assert r.status_code == 400 and r.json()["error"]["param"] == "ttl_s", (ttl, r.text)
    assert "t" not in key_names(gateway)


def test_a_key_cannot_pay_from_an_operator_account(gateway: Gateway) -> None:
    async def revenue(ledger) -> int:
        return ledger.engine.operator_account(AccountKind.REVENUE).id

    operator = gateway.ledger(revenue)
    r = gateway.admin("POST", "/admin/v1/keys", json={"name": "op", "account": operator})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "operator_account"
    assert "op" not in key_names(gateway)
    for bad, status in (("abc", 400), ("7\x00", 400), (10**30, 404), (1.5, 400)):
        r = gateway.admin("POST", "/admin/v1/keys", json={"name": "x", "account": bad})
        assert r.status_code == status, (bad, r.text)


def test_child_models_must_be_known_and_storable(gateway: Gateway) -> None:
    _, parent = gateway.funded_key(10**9, limit={"amount": "1", "period": "total"})  # all models
    for models in (["chat-fast\x00"], ["no-such-model"], "chat-fast", [1]):
        r = mint(gateway, parent["key"], "m", models=models)
        assert r.status_code == 400 and r.json()["error"]["param"] == "models", (models, r.text)
    assert "m" not in key_names(gateway)


def test_a_retry_that_asks_for_more_is_a_conflict(gateway: Gateway) -> None:
    account, parent = gateway.funded_key(10**9, limit={"amount": "1", "period": "total"})
    headers = {"Idempotency-Key": "admin-1"}
    body = {"name": "bot", "account": account}
    first = gateway.admin("POST", "/admin/v1/keys", json=body, headers=headers)
    assert first.status_code == 201
    # The finding: a limit added on the retry made the same key with a new budget, 201.
    for changed in (
        {**body, "limit": {"amount": "5", "period": "day"}},
        {**body, "ttl_s": 60},
        {**body, "metadata": {"team": "x"}},
    ):
        r = gateway.admin("POST", "/admin/v1/keys", json=changed, headers=headers)
        assert r.status_code == 409, (changed, r.text)
        assert r.json()["error"]["code"] == "idempotency_conflict"
    same = gateway.admin("POST", "/admin/v1/keys", json=body, headers=headers)
    assert same.status_code == 201 and same.json() == first.json()

    child_headers = {"Idempotency-Key": "spawn-1"}
    first = mint(gateway, parent["key"], "sub", headers=child_headers)
    assert first.status_code == 201
    for changed in ({"ttl_s": 60}, {"models": ["chat-fast"]}, {"limit": {"amount": "0.002"}}):
        r = mint(gateway, parent["key"], "sub", headers=child_headers, **changed)
        assert r.status_code == 409, (changed, r.text)
        assert r.json()["error"]["code"] == "idempotency_conflict"
    same = mint(gateway, parent["key"], "sub", headers=child_headers)
    assert same.status_code == 201 and same.json() == first.json()
    assert key_names(gateway).count("sub") == 1


def test_key_creation_refuses_bad_bodies_with_400(gateway: Gateway) -> None:
    _, parent = gateway.funded_key(10**9, limit={"amount": "1", "period": "total"})
    bodies = [
        b"[]", b'"text"', b"1e400", b"null", b"{", b'{"name": 5}', b'{"name": "a\\u0000"}',
        b'{"name": "x", "models": "chat-fast"}', b'{"name": "x", "limit": 5}',
        b'{"name": "x", "limit": {"amount": "99999999999999999999999"}}',
        b'{"name": "x", "ttl_s": 1e999}', b'{"name": "x", "idempotency_key": 7}',
        b"[" * 5000 + b"]" * 5000, b'{"name": {"a": ' * 200 + b"1" + b"}" * 200 + b"}",
    ]  # fmt: skip
    for body in bodies:
        r = gateway.admin("POST", "/admin/v1/keys", content=body)
        assert r.status_code == 400, (body[:40], r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = httpx.post(
            f"{gateway.v1}/keys",
            headers={"Authorization": f"Bearer {parent['key']}"},
            content=body,
            timeout=30,
        )
        assert r.status_code == 400, (body[:40], r.text)
