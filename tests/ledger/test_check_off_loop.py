"""`Ledger.check` copies the engine's figures on the loop and checks them on a thread: paying
traffic goes on while a large ledger is checked, the check still finds what is wrong, and
it stops at its time limit like the other admin reads."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from tests.ledger.test_store import Clock, run, url, with_ledger  # noqa: F401
from tokenworks.db.reads import ReadTimeout
from tokenworks.ledger import Ledger, auditor

WAIT_S = 20.0
TENANTS = 500


async def _many_tenants(L: Ledger) -> int:
    """TENANTS accounts with credit, through the engine (fast); returns a payer's id."""
    e = L.engine
    now_ms = L.now_ms()
    for i in range(TENANTS):
        acc = e.create_account(f"u{i}", None, "organisation", draws_on_parent=False,
                               idempotency_key=f"a{i}", now_ms=now_ms)  # fmt: skip
        e.top_up(acc["id"], 1_000, idempotency_key=f"t{i}", now_ms=now_ms)
    payer = (await L.create_account("payer", None, "organisation", idempotency_key="p")).id
    await L.top_up(payer, 10**9, idempotency_key="pt")
    await L.flush()
    return payer


def test_paying_requests_complete_while_a_check_compares(
    url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The comparison is held on its thread until a paying request has completed: were it on
    the event loop, the request could not run and the order would be the other way."""
    comparing, release = threading.Event(), threading.Event()
    real = auditor.cut_violations

    def held_compare(*args: Any) -> list[str]:
        comparing.set()
        release.wait(WAIT_S)
        return real(*args)

    monkeypatch.setattr(auditor, "cut_violations", held_compare)

    async def body(L: Ledger, _: Clock) -> None:
        payer = await _many_tenants(L)
        assert await asyncio.wait_for(_checked(L, release), WAIT_S) == []
        # Something wrong in memory (a bucket holding what no hold holds) is still found.
        bucket = next(b for b in L.engine.buckets.values() if b.account_id != payer)
        bucket.held_nano += 1
        order: list[str] = []
        comparing.clear()
        release.clear()

        async def check() -> None:
            order.append(f"checked: {await L.check()}")

        task = asyncio.create_task(check())
        assert await asyncio.to_thread(comparing.wait, WAIT_S)
        await L.hold([payer], 100, request_id="during")
        await L.settle("during", price_nano=50, cost_nano=10, producer="p", model="m",
                       durable=True)  # fmt: skip
        order.append("paid")
        release.set()
        await asyncio.wait_for(task, WAIT_S)
        assert order[0] == "paid"
        assert f"bucket {bucket.id}: held {bucket.held_nano} != open legs 0" in order[1]
        assert L.store_compared

    run(with_ledger(url, body))


async def _checked(L: Ledger, release: threading.Event) -> list[str]:
    release.set()
    return await L.check()


def test_a_check_past_its_time_limit_raises_read_timeout(
    url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    real = auditor.cut_violations

    def slow_compare(*args: Any) -> list[str]:
        release.wait(WAIT_S)
        return real(*args)

    monkeypatch.setattr(auditor, "cut_violations", slow_compare)

    async def body(L: Ledger, _: Clock) -> None:
        await _many_tenants(L)
        L.read_timeout_s = 0.2
        with pytest.raises(ReadTimeout):
            await L.check()
        release.set()
        assert L.store_compared is False
        L.read_timeout_s = WAIT_S
        assert await L.check() == []  # the next check runs to the end
        assert L.store_compared

    try:
        run(with_ledger(url, body))
    finally:
        release.set()
