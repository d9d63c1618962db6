"""Key creation, retries, sub-agent minting and its undo, at the keys/ level (no HTTP)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tokenworks.config import KeyLimits
from tokenworks.keys import lifecycle
from tokenworks.keys.lifecycle import MintRate, NewChild, NewKey
from tokenworks.keys.store import KeyStore
from tokenworks.ledger import AccountKind, Ledger

from ..conftest import both_stores

pytestmark = both_stores

NANO = 1_000_000_000
ROOMY = KeyLimits(max_children_per_key=100, max_keys_per_tree=100, mint_burst=100)


def run(database: str, body: Callable[[KeyStore, Ledger, int], Awaitable[Any]]) -> Any:
    """`body(keys, ledger, account)` against fresh stores, with an account holding 100."""

    async def main() -> Any:
        keys = KeyStore.open(database)
        ledger = await Ledger.open(database, sweep_interval_s=None)
        try:
            acc = await ledger.create_account(
                "org", None, AccountKind.ORGANISATION, idempotency_key="org"
            )
            await ledger.top_up(acc.id, 100 * NANO, idempotency_key="top")
            return await body(keys, ledger, acc.id)
        finally:
            await ledger.close()
            keys.close()

    return asyncio.run(main())


def new_key(account: int, name: str = "agent", limit_nano: int = 10 * NANO) -> NewKey:
    return NewKey(name, None, str(account), {}, None, (limit_nano, "month"))


def mint(
    keys: KeyStore, ledger: Ledger, parent: Any, secret: str, idem: str | None,
    child: NewChild, limits: KeyLimits = ROOMY, rate: MintRate | None = None,
) -> Awaitable[Any]:  # fmt: skip
    return lifecycle.mint_child(
        keys, ledger, parent, secret, idem, child, limits=limits,
        mint_rate=rate or MintRate(1000.0, 1000), now_ms=int(time.time() * 1000),
    )  # fmt: skip


def test_create_key_retry_returns_the_same_key_and_a_changed_retry_is_refused(
    database: str,
) -> None:
    async def body(keys: KeyStore, ledger: Ledger, account: int) -> None:
        key, secret = await lifecycle.create_key(keys, ledger, "seed", "idem-1", new_key(account))
        again, again_secret = await lifecycle.create_key(
            keys, ledger, "seed", "idem-1", new_key(account)
        )
        assert (again.id, again_secret) == (key.id, secret)
        assert len(keys.list()) == 1
        assert ledger.budgets(("key", key.id))[0]["limit_nano"] == 10 * NANO
        with pytest.raises(lifecycle.IdempotencyKeyReused):
            await lifecycle.create_key(keys, ledger, "seed", "idem-1", new_key(account, "other"))
        other, other_secret = await lifecycle.create_key(
            keys, ledger, "seed", None, new_key(account)
        )
        assert other.id != key.id and other_secret != secret

    run(database, body)


def test_a_child_is_carved_from_its_parent_and_a_retry_gets_the_same_child(
    database: str,
) -> None:
    async def body(keys: KeyStore, ledger: Ledger, account: int) -> None:
        parent, secret = await lifecycle.create_key(keys, ledger, "seed", None, new_key(account))
        ask = NewChild("sub", None, 4 * NANO, 60.0)
        child, child_secret = await mint(keys, ledger, parent, secret, "c1", ask)
        assert child.parent_id == parent.id and child.account_id == str(account)
        again, again_secret = await mint(keys, ledger, parent, secret, "c1", ask)
        assert (again.id, again_secret) == (child.id, child_secret)
        assert ledger.budgets(("key", parent.id))[0]["delegated_nano"] == 4 * NANO
        with pytest.raises(lifecycle.IdempotencyKeyReused):
            await mint(keys, ledger, parent, secret, "c1", NewChild("sub", None, 5 * NANO, 60.0))

    run(database, body)


def test_a_refused_delegation_revokes_the_child_and_its_retry_stays_refused(
    database: str,
) -> None:
    async def body(keys: KeyStore, ledger: Ledger, account: int) -> None:
        parent, secret = await lifecycle.create_key(keys, ledger, "seed", None, new_key(account))
        too_much = NewChild("greedy", None, 11 * NANO, None)
        with pytest.raises(lifecycle.DelegationRefused) as refused:
            await mint(keys, ledger, parent, secret, "c1", too_much)
        assert "room is 10, less than the 11 asked for" in refused.value.message
        # Revoked, the child left memory; the table still has it.
        assert keys.children(parent.id) == []
        (made,) = [k for k in keys.list() if k.parent_id == parent.id]
        assert made.revoked_ms is not None
        with pytest.raises(lifecycle.RetryOfDeadKey):
            await mint(keys, ledger, parent, secret, "c1", too_much)

    run(database, body)


def test_a_ledger_outage_undoes_the_child(database: str) -> None:
    async def body(keys: KeyStore, ledger: Ledger, account: int) -> None:
        parent, secret = await lifecycle.create_key(keys, ledger, "seed", None, new_key(account))
        await ledger.close()
        with pytest.raises(lifecycle.KeysLedgerUnavailable):
            await mint(keys, ledger, parent, secret, None, NewChild("sub", None, NANO, None))
        # Revoked, the child left memory; the table still has it.
        assert keys.children(parent.id) == []
        (made,) = [k for k in keys.list() if k.parent_id == parent.id]
        assert made.revoked_ms is not None

    run(database, body)


def test_mint_caps_rate_children_and_models(database: str) -> None:
    async def body(keys: KeyStore, ledger: Ledger, account: int) -> None:
        parent, secret = await lifecycle.create_key(
            keys, ledger, "seed", None, NewKey("p", ["m1"], str(account), {}, None, (NANO, "month"))
        )
        small = NewChild("sub", None, 1, None)
        rate = MintRate(0.5, 1)
        await mint(keys, ledger, parent, secret, None, small, rate=rate)
        with pytest.raises(lifecycle.MintRateExceeded) as limited:
            await mint(keys, ledger, parent, secret, None, small, rate=rate)
        assert limited.value.retry_after_s == 2  # one token at 0.5/s
        one_child = KeyLimits(max_children_per_key=1, max_keys_per_tree=100, mint_burst=100)
        with pytest.raises(lifecycle.TooManyKeys):
            await mint(keys, ledger, parent, secret, None, small, limits=one_child)
        with pytest.raises(lifecycle.ModelsBeyondParent):
            await mint(keys, ledger, parent, secret, None, NewChild("s", ["m2"], 1, None))
        orphan, orphan_secret = await lifecycle.create_key(
            keys, ledger, "seed", None, NewKey("o", None, None, {}, None, None)
        )
        with pytest.raises(lifecycle.NotDelegable):
            await mint(keys, ledger, orphan, orphan_secret, None, small)

    run(database, body)


def test_revoke_closes_the_delegated_budget_and_an_unknown_key_is_named(database: str) -> None:
    async def body(keys: KeyStore, ledger: Ledger, account: int) -> None:
        parent, secret = await lifecycle.create_key(keys, ledger, "seed", None, new_key(account))
        child, _ = await mint(keys, ledger, parent, secret, None, NewChild("s", None, NANO, None))
        revoked = await lifecycle.revoke_key(keys, ledger, child.id)
        assert [k.id for k in revoked] == [child.id]
        assert ledger.budgets(("key", parent.id))[0]["delegated_nano"] == 0
        with pytest.raises(lifecycle.UnknownKey):
            await lifecycle.revoke_key(keys, ledger, "key_nope")

    run(database, body)
