"""A restart loads live budgets only: revoked sub-agent keys' budgets stay in the table, not
in memory; a revoked account's budget still loads (it refuses that account's holds)."""

from __future__ import annotations

import pytest

from tests.ledger.test_store import START, Clock, run, url, with_ledger  # noqa: F401
from tokenworks.ledger import Ledger, Refused


def test_restart_loads_live_key_budgets_and_revoked_accounts(url: str) -> None:  # noqa: F811
    clock = Clock(START)
    dead, live = 40, 3

    async def fill(L: Ledger, clock: Clock) -> int:
        org = (await L.create_account("org", None, "organisation", idempotency_key="o")).id
        await L.top_up(org, 10**6, idempotency_key="t")
        await L.set_budget(("key", "k-main"), 10**6, "month", idempotency_key="b")
        for i in range(dead + live):
            await L.delegate("k-main", f"k-sub{i}", 100, idempotency_key=f"d{i}", ttl_s=3600)
        for i in range(dead):
            await L.revoke(("key", f"k-sub{i}"), idempotency_key=f"r{i}")
        gone = (await L.create_account("gone", org, "team", idempotency_key="g")).id
        await L.revoke(gone, idempotency_key="rg")
        return gone

    gone = run(with_ledger(url, fill, clock))

    async def reopened(L: Ledger, clock: Clock) -> None:
        scopes = set(L.engine.budgets)
        assert {f"key:k-sub{i}" for i in range(dead)}.isdisjoint(scopes)
        assert {f"key:k-sub{i}" for i in range(dead, dead + live)} <= scopes
        main = L.budgets(("key", "k-main"))[0]
        assert main["delegated_nano"] == 100 * live  # the dead children's room came back
        with pytest.raises(Refused) as e:
            await L.hold([gone], 10, request_id="r")
        assert e.value.limit_kind == "revoked"
        assert await L.check() == []

    run(with_ledger(url, reopened, clock))
