"""Paying for tokens through the gateway: holds, settlement, 402s, limits and sub-agent keys.

Test deployments cost 1.00/2.00 per million input/output tokens and the default tariff charges
cost, so a request's price is input x 1,000 + output x 2,000 nano-units.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import time
from decimal import Decimal

import httpx
import openai
import pytest

from tests.conftest import Gateway, Sim, both_stores

# Every test here runs on SQLite and on PostgreSQL.
pytestmark = both_stores

CHAT = [{"role": "user", "content": "Summarise the grid report."}]


def nano(text: str) -> int:
    return int(Decimal(text) * 1_000_000_000)


def client(gw: Gateway, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=secret, max_retries=0)


def spent(gw: Gateway, account_id: int) -> int:
    async def read(ledger):
        return ledger.balance(account_id)

    balance = gw.ledger(read)
    return balance


def check(gw: Gateway) -> list[str]:
    async def run(ledger):
        await ledger.sweep_expired()
        return await ledger.check()

    return gw.ledger(run)


def test_a_served_request_is_charged_its_exact_price(gateway: Gateway) -> None:
    account, key = gateway.funded_key(1_000_000_000)  # 1.00
    raw = client(gateway, key["key"]).chat.completions.with_raw_response.create(
        model="chat-fast", messages=CHAT, max_tokens=10
    )
    reply = raw.parse()
    price = reply.usage.prompt_tokens * 1_000 + 10 * 2_000
    assert nano(raw.headers["x-tokenworks-price"]) == price
    assert nano(raw.headers["x-tokenworks-balance"]) == 1_000_000_000 - price
    balance = spent(gateway, account)
    assert balance.available_nano == 1_000_000_000 - price
    assert balance.held_nano == 0
    assert check(gateway) == []


def test_streams_are_charged_before_their_last_byte(gateway: Gateway) -> None:
    account, key = gateway.funded_key(1_000_000_000)
    with httpx.stream(
        "POST",
        f"{gateway.v1}/chat/completions",
        headers={"Authorization": f"Bearer {key['key']}"},
        json={
            "model": "chat-fast",
            "messages": CHAT,
            "max_tokens": 12,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        held_balance = nano(r.headers["x-tokenworks-balance"])
        body = r.read().decode()
        # The last byte has arrived: the charge is already in the ledger.
        balance = spent(gateway, account)
    usage = next(
        json.loads(e[6:])["usage"]
        for e in body.split("\n\n")
        if e.startswith('data: {"') and '"usage":{' in e
    )
    price = usage["prompt_tokens"] * 1_000 + 12 * 2_000
    assert nano(usage["cost"]) == price
    assert balance.available_nano == 1_000_000_000 - price and balance.held_nano == 0
    assert held_balance < 1_000_000_000 - price  # the hold was the worst case, then released


@pytest.mark.parametrize("stream", [False, True])
def test_a_price_above_the_hold_charges_the_hold_and_shows_in_metrics(
    gateway: Gateway, stream: bool
) -> None:
    """An upstream billing far more input than the request carried (as an image the byte
    bound cannot see would): the hold caps the charge, the client and the usage records are
    shown what was charged, and operators see the shortfall."""
    account, key = gateway.funded_key(1_000_000_000)
    body = {"model": "chat-fast", "messages": CHAT, "max_tokens": 5, "sim_fault": "overcount"}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(
        f"{gateway.v1}/chat/completions",
        headers={"Authorization": f"Bearer {key['key']}"},
        json=body,
    )
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e.startswith('data: {"')]
    usage = (
        next(json.loads(e[6:])["usage"] for e in events if '"usage":{' in e)
        if stream
        else r.json()["usage"]
    )
    price = usage["prompt_tokens"] * 1_000 + usage["completion_tokens"] * 2_000
    charged = 1_000_000_000 - spent(gateway, account).available_nano
    assert 0 < charged < price  # the hold, not the price
    assert nano(usage["cost"]) == charged
    if not stream:
        assert nano(r.headers["x-tokenworks-price"]) == charged
    [record] = [x for x in gateway.records() if x.account_id == str(account)]
    assert record.price_nano == charged  # usage reports agree with the ledger
    assert record.clamped_nano == price - charged  # the loss, on the record of the request
    metrics = httpx.get(f"{gateway.url}/metrics").text
    line = next(
        x for x in metrics.splitlines() if x.startswith("tokenworks_clamped_price_nano_total")
    )
    assert float(line.split()[-1]) == price - charged
    # By model and key: the operator sees who the loss was on.
    labels = f'key="{key["id"]}",model="chat-fast"'
    assert f"tokenworks_clamped_requests_total{{{labels}}} 1.0" in metrics
    assert check(gateway) == []


def test_no_credit_is_402_and_no_upstream_work(gateway: Gateway, sims: tuple[Sim, Sim]) -> None:
    a, _ = sims
    account, key = gateway.funded_key(10_000)  # 0.00001: less than any request's worst case
    with pytest.raises(openai.APIStatusError) as err:
        client(gateway, key["key"]).chat.completions.create(
            model="chat-fast", messages=CHAT, max_tokens=100
        )
    assert err.value.status_code == 402
    body = err.value.body
    assert body["code"] == "insufficient_quota"
    assert f"account:{account}" in body["message"] and "insufficient credit" in body["message"]
    assert a.stats()["requests_total"] == 0
    assert spent(gateway, account).available_nano == 10_000


def test_a_failed_request_releases_its_hold(gateway: Gateway, sims: tuple[Sim, Sim]) -> None:
    a, b = sims
    account, key = gateway.funded_key(1_000_000_000)
    a.fault("500")
    b.fault("500")
    with pytest.raises(openai.InternalServerError):
        client(gateway, key["key"]).chat.completions.create(
            model="chat-fast", messages=CHAT, max_tokens=10
        )
    balance = spent(gateway, account)
    assert balance.available_nano == 1_000_000_000 and balance.held_nano == 0


def test_a_key_limit_stops_spending_at_the_limit(gateway: Gateway) -> None:
    limit = 200_000  # 0.0002: a few small requests
    account, key = gateway.funded_key(1_000_000_000, limit={"amount": "0.0002", "period": "day"})
    c = client(gateway, key["key"])
    served = 0
    refused = None
    for _ in range(40):  # bounded: each request costs >= 10,000 nano
        try:
            c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=5)
            served += 1
        except openai.APIStatusError as exc:
            refused = exc
            break
    assert served >= 1 and refused is not None and refused.status_code == 402
    assert f"key:{key['id']}" in refused.body["message"]
    assert "day budget too small" in refused.body["message"]  # room left, below the worst case
    charged = 1_000_000_000 - spent(gateway, account).available_nano
    assert 0 < charged <= limit
    assert check(gateway) == []


def test_sub_agent_keys_spend_from_the_parent_and_die_with_it(gateway: Gateway) -> None:
    account, parent = gateway.funded_key(1_000_000_000, limit={"amount": "0.01", "period": "total"})
    headers = {"Authorization": f"Bearer {parent['key']}"}
    r = httpx.post(
        f"{gateway.v1}/keys", headers=headers, json={"name": "sub-1", "limit": {"amount": "0.002"}}
    )
    assert r.status_code == 201, r.text
    child = r.json()
    assert child["parent"] == parent["id"] and child["account"] == str(account)
    # More than the parent's room is refused.
    r = httpx.post(
        f"{gateway.v1}/keys", headers=headers, json={"name": "greedy", "limit": {"amount": "1"}}
    )
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_quota"
    # The child spends from the parent's account.
    reply = client(gateway, child["key"]).chat.completions.create(
        model="chat-fast", messages=CHAT, max_tokens=4
    )
    price = reply.usage.prompt_tokens * 1_000 + 4 * 2_000
    assert spent(gateway, account).available_nano == 1_000_000_000 - price
    # Revoking the parent revokes the child at once.
    r = gateway.admin("DELETE", f"/admin/v1/keys/{parent['id']}")
    assert set(r.json()["revoked"]) == {parent["id"], child["id"]}
    with pytest.raises(openai.AuthenticationError):
        client(gateway, child["key"]).chat.completions.create(
            model="chat-fast", messages=CHAT, max_tokens=4
        )
    assert check(gateway) == []


def test_a_child_key_cannot_widen_its_models(gateway: Gateway) -> None:
    _, parent = gateway.funded_key(1_000_000_000, models=["chat-fast"])
    r = httpx.post(
        f"{gateway.v1}/keys",
        headers={"Authorization": f"Bearer {parent['key']}"},
        json={"name": "wide", "models": ["chat-a-only"], "limit": {"amount": "0.001"}},
    )
    assert r.status_code == 403


def test_spawning_many_sub_agents_is_cheap_and_bounded(gateway: Gateway) -> None:
    account, parent = gateway.funded_key(1_000_000_000, limit={"amount": "1.00", "period": "total"})
    headers = {"Authorization": f"Bearer {parent['key']}"}
    with httpx.Client(base_url=gateway.v1, headers=headers) as http:
        for i in range(200):
            r = http.post("/keys", json={"name": f"sub-{i}", "limit": {"amount": "0.005"}})
            assert r.status_code == 201
        # 200 x 0.005 = 1.00: the parent's room is used up; one more is refused.
        r = http.post("/keys", json={"name": "one-too-many", "limit": {"amount": "0.001"}})
        assert r.status_code == 402
    assert spent(gateway, account).available_nano == 1_000_000_000  # delegation is not spend
    r = gateway.admin("DELETE", f"/admin/v1/keys/{parent['id']}")
    assert len(r.json()["revoked"]) == 201
    assert check(gateway) == []


def test_concurrent_hammer_never_exceeds_a_limit(gateway: Gateway) -> None:
    """Hundreds of concurrent requests, streaming and not, on small limits: no overrun."""
    credit = 3_000_000  # 0.003 of credit on the account
    account, tight = gateway.funded_key(credit, name="hammer")
    key_limit = 1_000_000
    _, limited = gateway.funded_key(
        5_000_000, name="hammer-limited", limit={"amount": "0.001", "period": "total"}
    )
    rng = random.Random(11)

    def one(secret: str) -> tuple[int, int]:
        stream = rng.random() < 0.5
        body = {
            "model": "chat-fast",
            "messages": CHAT,
            "max_tokens": rng.randint(1, 40),
            "stream": stream,
        }
        r = httpx.post(
            f"{gateway.v1}/chat/completions",
            headers={"Authorization": f"Bearer {secret}"},
            json=body,
            timeout=30,
        )
        return r.status_code, len(r.content)

    deadline = time.monotonic() + 60
    jobs = [tight["key"], limited["key"]] * 150
    statuses: dict[int, int] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=48) as pool:
        for status, _ in pool.map(one, jobs):
            statuses[status] = statuses.get(status, 0) + 1
            assert time.monotonic() < deadline
    assert set(statuses) <= {200, 402}, statuses
    assert statuses.get(402, 0) > 0 and statuses.get(200, 0) > 0
    assert 0 <= spent(gateway, account).available_nano <= credit
    # The limited key's spend never passes its limit.
    records = gateway.records(expect=statuses[200])
    limited_spend = sum(
        r.price_nano for r in records if r.key_id == limited["id"] and r.status == 200
    )
    tight_spend = sum(r.price_nano for r in records if r.key_id == tight["id"] and r.status == 200)
    assert limited_spend <= key_limit
    assert tight_spend == credit - spent(gateway, account).available_nano
    assert check(gateway) == []


def test_keys_without_an_account_are_metered_but_not_charged(gateway: Gateway) -> None:
    key = gateway.create_key()
    raw = client(gateway, key["key"]).chat.completions.with_raw_response.create(
        model="chat-fast", messages=CHAT, max_tokens=3
    )
    assert "x-tokenworks-balance" not in raw.headers
    assert gateway.records()[0].price_nano > 0


def test_admin_key_options_are_checked(gateway: Gateway) -> None:
    r = gateway.admin("POST", "/admin/v1/keys", json={"name": "x", "account": 99999})
    assert r.status_code == 404
    r = gateway.admin("POST", "/admin/v1/keys", json={"name": "x", "limit": {"amount": "1"}})
    assert r.status_code == 400 and "account" in r.json()["error"]["message"]
    account, _ = gateway.funded_key(0, name="empty")
    for bad in ({"amount": 1.5}, {"amount": "1e3"}, {"amount": "1", "period": "hour"}):
        r = gateway.admin(
            "POST", "/admin/v1/keys", json={"name": "x", "account": account, "limit": bad}
        )
        assert r.status_code == 400, bad


def test_a_client_that_hangs_up_pays_for_what_was_produced_and_leaks_no_hold(
    make_gateway,
) -> None:
    from tests.conftest import running_sim

    with running_sim("fast") as slow:
        models = "models:\n  - name: m\n    deployments:\n      - {producer: s, model: x}\n"
        with make_gateway({"s": slow.url}, models) as gw:
            account, key = gw.funded_key(1_000_000_000)
            with httpx.stream(
                "POST",
                f"{gw.v1}/chat/completions",
                headers={"Authorization": f"Bearer {key['key']}"},
                json={"model": "m", "messages": CHAT, "max_tokens": 2000, "stream": True},
                timeout=10,
            ) as r:
                assert nano(r.headers["x-tokenworks-balance"]) < 1_000_000_000 - 2000 * 2_000
                for line in r.iter_lines():
                    if line.count('"content":"') and '"content":""' not in line:
                        break
            [record] = gw.records()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and spent(gw, account).held_nano:
                time.sleep(0.05)
            balance = spent(gw, account)
            assert record.status == 499 and 0 < record.usage.output_tokens < 2000
            assert balance.held_nano == 0, "a cancelled stream must not strand its hold"
            assert balance.available_nano == 1_000_000_000 - record.price_nano
            assert (
                record.price_nano
                == record.usage.input_tokens * 1_000 + record.usage.output_tokens * 2_000
            )
            assert check(gw) == []


def test_key_creation_retries_are_idempotent(gateway: Gateway) -> None:
    account, parent = gateway.funded_key(1_000_000_000)
    body = {"name": "ci-bot", "account": account, "limit": {"amount": "0.50", "period": "day"}}
    first = gateway.admin("POST", "/admin/v1/keys", json=body, headers={"Idempotency-Key": "k-1"})
    again = gateway.admin("POST", "/admin/v1/keys", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()  # the same key, and the same secret, shown again
    names = [k["name"] for k in gateway.admin("GET", "/admin/v1/keys").json()["data"]]
    assert names.count("ci-bot") == 1
    other = gateway.admin(
        "POST", "/admin/v1/keys", json={**body, "name": "other"}, headers={"Idempotency-Key": "k-1"}
    )
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    dearer = gateway.admin(
        "POST",
        "/admin/v1/keys",
        json={**body, "limit": {"amount": "5", "period": "day"}},
        headers={"Idempotency-Key": "k-1"},
    )
    assert dearer.status_code == 409
    # A sub-agent key retried by its agent: one child, one delegated budget.
    headers = {"Authorization": f"Bearer {parent['key']}", "Idempotency-Key": "spawn-7"}
    child_body = {"name": "sub-7", "limit": {"amount": "0.01"}}
    a = httpx.post(f"{gateway.v1}/keys", headers=headers, json=child_body)
    b = httpx.post(f"{gateway.v1}/keys", headers=headers, json=child_body)
    assert a.status_code == b.status_code == 201 and a.json() == b.json()
    c = httpx.post(f"{gateway.v1}/keys", headers=headers, json={**child_body, "name": "sub-8"})
    assert c.status_code == 409
    children = [
        k
        for k in gateway.admin("GET", "/admin/v1/keys").json()["data"]
        if k["parent"] == parent["id"]
    ]
    assert len(children) == 1
    assert check(gateway) == []


def test_child_key_retries_with_a_ttl_and_after_a_refusal(gateway: Gateway) -> None:
    _account, parent = gateway.funded_key(
        1_000_000_000, limit={"amount": "0.01", "period": "total"}
    )
    headers = {"Authorization": f"Bearer {parent['key']}", "Idempotency-Key": "ttl-1"}
    body = {"name": "timed", "limit": {"amount": "0.001"}, "ttl_s": 600}
    a = httpx.post(f"{gateway.v1}/keys", headers=headers, json=body)
    time.sleep(0.01)  # the retry comes later: its "now" differs, its answer must not
    b = httpx.post(f"{gateway.v1}/keys", headers=headers, json=body)
    assert a.status_code == b.status_code == 201, b.text
    assert a.json() == b.json()
    # Refused first (more than the parent's room), retried with the same key: still refused,
    # and no dead child keeps a share of the parent's room.
    headers["Idempotency-Key"] = "greedy-1"
    greedy = {"name": "greedy", "limit": {"amount": "5"}}
    assert httpx.post(f"{gateway.v1}/keys", headers=headers, json=greedy).status_code == 402
    retry = httpx.post(f"{gateway.v1}/keys", headers=headers, json=greedy)
    assert retry.status_code == 409
    headers["Idempotency-Key"] = "fits-1"
    fits = httpx.post(
        f"{gateway.v1}/keys", headers=headers, json={"name": "fits", "limit": {"amount": "0.009"}}
    )
    assert fits.status_code == 201, fits.text  # 0.01 - 0.001 = 0.009 left: nothing stranded
    assert check(gateway) == []


def test_an_absurd_key_limit_is_a_400_and_makes_no_key(gateway: Gateway) -> None:
    account, _ = gateway.funded_key(0, name="x")
    r = gateway.admin(
        "POST",
        "/admin/v1/keys",
        json={"name": "huge", "account": account, "limit": {"amount": "100000000000"}},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit.amount"
    assert "huge" not in [k["name"] for k in gateway.admin("GET", "/admin/v1/keys").json()["data"]]


def test_the_balance_header_is_what_this_key_may_still_spend(gateway: Gateway) -> None:
    """A key with a 0.01 limit on a 1.00 account sees its own 0.01 less what it spent, not
    the organisation's balance; plain answers and streams alike."""
    limit = {"amount": "0.01", "period": "day"}
    _, key = gateway.funded_key(1_000_000_000, limit=limit)
    raw = client(gateway, key["key"]).chat.completions.with_raw_response.create(
        model="chat-fast", messages=CHAT, max_tokens=10
    )
    price = nano(raw.headers["x-tokenworks-price"])
    assert nano(raw.headers["x-tokenworks-balance"]) == 10_000_000 - price
    with httpx.stream(
        "POST",
        f"{gateway.v1}/chat/completions",
        headers={"Authorization": f"Bearer {key['key']}"},
        json={"model": "chat-fast", "messages": CHAT, "max_tokens": 12, "stream": True},
    ) as r:
        held = nano(r.headers["x-tokenworks-balance"])
        r.read()
    assert 0 <= held < 10_000_000 - price  # the stream's worst case is held out of the limit


def test_a_402_from_the_worst_case_hold_says_a_lower_max_tokens_may_fit(gateway: Gateway) -> None:
    limit = {"amount": "0.01", "period": "day"}  # 5,000 output tokens at 2.00 per million
    _, key = gateway.funded_key(1_000_000_000, limit=limit)
    c = client(gateway, key["key"])
    with pytest.raises(openai.APIStatusError) as err:
        c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=100_000)
    assert err.value.status_code == 402
    message = err.value.body["message"]
    assert "day budget too small" in message and "0.01 available" in message, message
    assert "a lower max_tokens may be served" in message
    c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=10)  # and it is
