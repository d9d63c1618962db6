"""Consumer rate limits over real HTTP (gateway and upstream-sim on 127.0.0.1): OpenAI's
x-ratelimit-* headers, the 429 (Retry-After, retry-after-ms, metered, never charged), tokens
reserved then corrected to the actual, and exact counts under concurrent bursts, per key,
per account, and down a tree of sub-agent keys."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import MODELS, Gateway, Sim

CHAT = [{"role": "user", "content": "hello there"}]
# The reset headers are Go durations, as OpenAI's: "12ms", "1.5s", "6m0s".
GO_DURATION = re.compile(r"^(\d+ms|\d+(\.\d+)?s|\d+m\d+(\.\d+)?s)$")


@pytest.fixture
def gw(make_gateway, sims: tuple[Sim, Sim]) -> Iterator[Gateway]:
    a, b = sims
    # A long upstream timeout: the concurrency tests hold stalled streams open on purpose.
    with make_gateway({"a": (a.url, 60.0), "b": (b.url, 60.0)}, MODELS) as gateway:
        yield gateway


def body_bytes(max_tokens: int = 5, **extra: object) -> bytes:
    return json.dumps(
        {"model": "chat-fast", "messages": CHAT, "max_tokens": max_tokens, **extra}
    ).encode()


def post(gw: Gateway, secret: str, content: bytes) -> httpx.Response:
    return httpx.post(
        f"{gw.v1}/chat/completions",
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        content=content,
        timeout=30,
    )


def limited_key(gw: Gateway, name: str = "payer", **limits: int) -> tuple[int, dict]:
    return gw.funded_key(10**12, name=name, rate_limits=limits)


def balance(gw: Gateway, account: int):
    async def read(ledger):
        return ledger.balance(account)

    return gw.ledger(read)


def test_answers_carry_openai_headers_that_count_down(gw: Gateway) -> None:
    _, key = limited_key(gw, rpm=5, tpm=100_000)
    content = body_bytes()
    seen = [post(gw, key["key"], content) for _ in range(3)]
    assert [r.status_code for r in seen] == [200, 200, 200]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in seen] == ["4", "3", "2"]
    for r in seen:
        assert r.headers["x-ratelimit-limit-requests"] == "5"
        assert r.headers["x-ratelimit-limit-tokens"] == "100000"
        assert GO_DURATION.match(r.headers["x-ratelimit-reset-requests"])
        assert GO_DURATION.match(r.headers["x-ratelimit-reset-tokens"])
    tokens_left = [int(r.headers["x-ratelimit-remaining-tokens"]) for r in seen]
    assert tokens_left[0] > tokens_left[1] > tokens_left[2]


def test_a_key_without_limits_gets_no_ratelimit_headers(gw: Gateway) -> None:
    _, key = gw.funded_key(10**12)
    r = post(gw, key["key"], body_bytes())
    assert r.status_code == 200
    assert not [h for h in r.headers if h.startswith("x-ratelimit-")]


def test_a_refusal_is_openais_429_metered_and_never_charged(gw: Gateway) -> None:
    account, key = limited_key(gw, rpm=1)
    assert post(gw, key["key"], body_bytes()).status_code == 200
    before = balance(gw, account)
    r = post(gw, key["key"], body_bytes())
    assert r.status_code == 429
    error = r.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert "requests per minute" in error["message"] and key["id"] in error["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    retry_ms = int(r.headers["retry-after-ms"])
    assert 1 <= retry_ms <= 60_000 and int(r.headers["Retry-After"]) == -(-retry_ms // 1000)
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    after = balance(gw, account)
    assert after.available_nano == before.available_nano and after.held_nano == 0
    statuses = sorted(rec.status for rec in gw.records(expect=2))
    assert statuses == [200, 429]
    refused = [rec for rec in gw.records(expect=2) if rec.status == 429]
    assert refused[0].price_nano == 0 and refused[0].key_id == key["id"]
    assert "rate limit" in (refused[0].error or "")


def test_tokens_are_reserved_then_corrected_to_the_actual(gw: Gateway) -> None:
    tpm = 10_000
    _, key = limited_key(gw, tpm=tpm)
    content = body_bytes(max_tokens=40)
    reserve = len(content) + 40  # the body's bytes bound its tokens, plus max_tokens
    first = post(gw, key["key"], content)
    assert first.status_code == 200
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == tpm - reserve
    used = first.json()["usage"]["total_tokens"]
    assert used < reserve
    second = post(gw, key["key"], content)
    # The first request now counts what it used, not what it reserved.
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == tpm - used - reserve


def test_a_request_larger_than_the_tpm_never_fits_and_says_why(gw: Gateway) -> None:
    _, key = limited_key(gw, tpm=100)
    r = post(gw, key["key"], body_bytes(max_tokens=500))
    assert r.status_code == 429
    assert "lower max_tokens" in r.json()["error"]["message"]
    assert r.headers["Retry-After"] == "60"


async def _burst(gw: Gateway, secret: str, count: int, content: bytes) -> list[int]:
    async with httpx.AsyncClient(timeout=30) as client:
        headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        replies = await asyncio.gather(
            *(
                client.post(f"{gw.v1}/chat/completions", headers=headers, content=content)
                for _ in range(count)
            )
        )
    return [r.status_code for r in replies]


def test_an_rpm_burst_with_concurrency_serves_exactly_the_limit(gw: Gateway) -> None:
    _, key = limited_key(gw, rpm=5)
    statuses = asyncio.run(_burst(gw, key["key"], 16, body_bytes()))
    assert statuses.count(200) == 5 and statuses.count(429) == 11


async def _open_streams(gw: Gateway, secrets: list[str]) -> list[int]:
    """Open one stalled stream per secret at once; the statuses once every head has come
    (the admitted ones are still in flight then: their upstream stalls for a minute)."""
    content = body_bytes(
        max_tokens=20, stream=True, sim_fault="stall", sim_delay_s=60
    )  # the sim pauses halfway through the answer
    async with httpx.AsyncClient(timeout=30) as client:
        streams = [
            client.stream(
                "POST",
                f"{gw.v1}/chat/completions",
                headers={"Authorization": f"Bearer {s}", "Content-Type": "application/json"},
                content=content,
            )
            for s in secrets
        ]
        responses = await asyncio.gather(*(s.__aenter__() for s in streams))
        statuses = [r.status_code for r in responses]
        for stream in streams:  # hang up: the gateway cancels and settles each one
            await stream.__aexit__(None, None, None)
    return statuses


def test_max_concurrency_under_a_burst_of_streams_serves_exactly_the_limit(gw: Gateway) -> None:
    account, key = limited_key(gw, max_concurrency=3)
    statuses = asyncio.run(_open_streams(gw, [key["key"]] * 10))
    assert statuses.count(200) == 3 and statuses.count(429) == 7
    # The streams ended when the client hung up (499): their slots are free again.
    records = gw.records(expect=10)
    assert sorted(r.status for r in records) == [429] * 7 + [499] * 3
    assert post(gw, key["key"], body_bytes()).status_code == 200
    assert balance(gw, account).held_nano == 0


def test_an_account_limit_applies_across_its_keys(gw: Gateway) -> None:
    account, first = gw.funded_key(10**12, name="org")
    second = gw.create_key(name="second", account=account)
    r = gw.admin("POST", f"/admin/v1/accounts/{account}/rate_limits", json={"rpm": 3})
    assert r.status_code == 200, r.text
    assert r.json()["rpm"] == 3 and r.json()["tpm"] is None
    view = gw.admin("GET", f"/admin/v1/accounts/{account}").json()
    assert view["rate_limits"] == {"rpm": 3, "tpm": None, "max_concurrency": None}
    secrets = [first["key"], second["key"]] * 3
    statuses = [post(gw, s, body_bytes()).status_code for s in secrets]
    assert statuses == [200, 200, 200, 429, 429, 429]
    refused = post(gw, second["key"], body_bytes())
    assert f"account {account}" in refused.json()["error"]["message"]
    # Lifting the limit takes effect on the next request.
    assert gw.admin("POST", f"/admin/v1/accounts/{account}/rate_limits", json={}).status_code == 200
    assert post(gw, second["key"], body_bytes()).status_code == 200


def test_account_limits_set_when_the_account_is_created(gw: Gateway) -> None:
    r = gw.admin(
        "POST",
        "/admin/v1/accounts",
        json={"name": "capped", "rate_limits": {"max_concurrency": 2}, "idempotency_key": "c1"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["rate_limits"] == {"rpm": None, "tpm": None, "max_concurrency": 2}
    account = r.json()["id"]
    gw.ledger(lambda ledger: ledger.top_up(account, 10**12, idempotency_key="t1"))
    keys = [gw.create_key(name=f"k{i}", account=account)["key"] for i in range(2)]
    statuses = asyncio.run(_open_streams(gw, keys * 3))
    assert statuses.count(200) == 2 and statuses.count(429) == 4


def mint(gw: Gateway, secret: str, name: str, **extra: object) -> httpx.Response:
    body = {"name": name, "limit": {"amount": "1"}, **extra}
    return httpx.post(
        f"{gw.v1}/keys", headers={"Authorization": f"Bearer {secret}"}, json=body, timeout=30
    )


def test_a_child_inherits_its_parents_limits_and_may_only_narrow_them(gw: Gateway) -> None:
    _, parent = gw.funded_key(
        10**12, limit={"amount": "100", "period": "total"}, rate_limits={"rpm": 4, "tpm": 50_000}
    )
    assert parent["rate_limits"] == {"rpm": 4, "tpm": 50_000, "max_concurrency": None}
    looser = mint(gw, parent["key"], "greedy", rate_limits={"rpm": 10})
    assert looser.status_code == 403
    assert looser.json()["error"]["param"] == "rate_limits.rpm"
    assert looser.json()["error"]["code"] == "rate_limits_beyond_parent"
    inherited = mint(gw, parent["key"], "plain")
    assert inherited.status_code == 201, inherited.text
    assert inherited.json()["rate_limits"] == {"rpm": 4, "tpm": 50_000, "max_concurrency": None}
    narrower = mint(gw, parent["key"], "narrow", rate_limits={"rpm": 2, "max_concurrency": 1})
    assert narrower.json()["rate_limits"] == {"rpm": 2, "tpm": 50_000, "max_concurrency": 1}
    # A child's requests draw on its parent's limits too: minting cannot multiply the rate.
    child = inherited.json()["key"]
    statuses = [post(gw, s, body_bytes()).status_code for s in [parent["key"], child] * 3]
    assert statuses == [200, 200, 200, 200, 429, 429]
    r = post(gw, child, body_bytes())
    assert f"key {parent['id']}" in r.json()["error"]["message"]


def test_key_rate_limits_are_validated(gw: Gateway) -> None:
    for bad, param in [
        ({"rpm": 0}, "rate_limits.rpm"),
        ({"tpm": "5"}, "rate_limits.tpm"),
        ({"max_concurrency": True}, "rate_limits.max_concurrency"),
        ({"rpn": 5}, "rate_limits.rpn"),
        (7, "rate_limits"),
    ]:
        r = gw.admin("POST", "/admin/v1/keys", json={"name": "x", "rate_limits": bad})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["param"] == param
    assert gw.admin("GET", "/admin/v1/keys").json()["data"] == []


async def _burst_usage(gw: Gateway, secret: str, count: int, content: bytes) -> list[int | None]:
    """Each reply's total_tokens, None for a refusal."""
    async with httpx.AsyncClient(timeout=30) as client:
        headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        replies = await asyncio.gather(
            *(
                client.post(f"{gw.v1}/chat/completions", headers=headers, content=content)
                for _ in range(count)
            )
        )
    assert {r.status_code for r in replies} <= {200, 429}
    return [r.json()["usage"]["total_tokens"] if r.status_code == 200 else None for r in replies]


def test_a_tpm_burst_with_concurrency_never_serves_more_tokens_than_the_limit(
    gw: Gateway,
) -> None:
    """LiteLLM's #18730: concurrency beat a 100 TPM limit. Reservations are upper bounds,
    so whatever the interleaving the tokens served stay within the limit."""
    content = body_bytes(max_tokens=30)
    tpm = 3 * (len(content) + 30) + 10  # room for three reservations at once
    _, key = limited_key(gw, tpm=tpm)
    served = asyncio.run(_burst_usage(gw, key["key"], 16, content))
    used = [u for u in served if u is not None]
    assert len(used) >= 3 and None in served
    assert sum(used) <= tpm


def test_streams_carry_the_headers_too(gw: Gateway) -> None:
    _, key = limited_key(gw, rpm=7)
    with httpx.stream(
        "POST",
        f"{gw.v1}/chat/completions",
        headers={"Authorization": f"Bearer {key['key']}", "Content-Type": "application/json"},
        content=body_bytes(stream=True),
        timeout=30,
    ) as r:
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "7"
        assert r.headers["x-ratelimit-remaining-requests"] == "6"
        assert "data: [DONE]" in r.read().decode()


def test_a_retried_key_creation_must_ask_for_the_same_limits(gw: Gateway) -> None:
    body = {"name": "r", "rate_limits": {"rpm": 5}, "idempotency_key": "same"}
    first = gw.admin("POST", "/admin/v1/keys", json=body)
    again = gw.admin("POST", "/admin/v1/keys", json=body)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    assert first.json()["key"] == again.json()["key"]
    other = gw.admin("POST", "/admin/v1/keys", json={**body, "rate_limits": {"rpm": 6}})
    assert other.status_code == 409


def test_account_rate_limits_need_a_customer_account(gw: Gateway) -> None:
    r = gw.admin("POST", "/admin/v1/accounts/999999/rate_limits", json={"rpm": 1})
    assert r.status_code == 404
    r = gw.admin("POST", "/admin/v1/accounts/1/rate_limits", json={"rpm": 1})  # the operator's
    assert r.status_code == 400, r.text
    account, _ = gw.funded_key(10**9)
    r = gw.admin("POST", f"/admin/v1/accounts/{account}/rate_limits", json={"rpm": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rpm"
