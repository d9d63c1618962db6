"""Rate limits persist beside the keys, in both stores: a key's with the key, an account's
when set, both back after a restart with every key's scopes rebuilt; and a database an
earlier version made (no `rate_limits` table) opens, keeps its keys and takes limits."""

from __future__ import annotations

import json
import sqlite3
import time

from tokenworks.db.postgres import connect
from tokenworks.keys.rate_limits import RateLimits
from tokenworks.keys.store import KEYS, KeyStore, hash_key

from ..conftest import both_stores

pytestmark = both_stores


def test_key_and_account_limits_survive_a_restart(database: str) -> None:
    keys = KeyStore.open(database)
    try:
        parent, _ = keys.create("parent", account_id="7", rate_limits=RateLimits(rpm=10))
        child, _ = keys.create(
            "child", account_id="7", parent_id=parent.id, rate_limits=RateLimits(rpm=5, tpm=900)
        )
        plain, _ = keys.create("plain", account_id="8")
        keys.set_account_limits("7", RateLimits(max_concurrency=4))
        assert plain.rate_scopes == ()
    finally:
        keys.close()
    again = KeyStore.open(database)
    try:
        child_again = again.get(child.id)
        assert child_again is not None and child_again.rate_limits == RateLimits(rpm=5, tpm=900)
        assert child_again.rate_scopes == (
            (f"key:{child.id}", RateLimits(rpm=5, tpm=900)),
            (f"key:{parent.id}", RateLimits(rpm=10)),
            ("account:7", RateLimits(max_concurrency=4)),
        )
        assert again.account_limits("7") == RateLimits(max_concurrency=4)
        plain_again = again.get(plain.id)
        assert plain_again is not None and plain_again.rate_scopes == ()
        # Changing an account's limits reaches its keys at once; clearing them drops the scope.
        again.set_account_limits("8", RateLimits(rpm=2))
        assert plain_again.rate_scopes == (("account:8", RateLimits(rpm=2)),)
        again.set_account_limits("7", RateLimits())
        assert child_again.rate_scopes[-1][0] == f"key:{parent.id}"
    finally:
        again.close()


def test_only_live_keys_limits_are_loaded(database: str) -> None:
    """A revoked key's limits stay in the table but not in memory: start-up follows the
    live tenants, however many limited sub-agent keys have come and gone."""
    keys = KeyStore.open(database)
    try:
        live, _ = keys.create("live", account_id="7", rate_limits=RateLimits(rpm=10))
        dead, _ = keys.create("dead", account_id="7", rate_limits=RateLimits(rpm=5))
        keys.set_account_limits("7", RateLimits(tpm=1000))
        keys.revoke(dead.id)
        scopes = {row["scope"] for row in keys._rows.load_limits(int(time.time() * 1000))}
        assert scopes == {f"key:{live.id}", "account:7"}
    finally:
        keys.close()


def _old_database(database: str) -> None:
    """What an earlier version left: `api_keys` with one key, no `rate_limits` table."""
    row = (
        "key_old", "old", hash_key("tw-old"), "tw-old...old", json.dumps(["m"]), "3", None,
        int(time.time() * 1000), None, None, "{}",
    )  # fmt: skip
    insert = f"INSERT INTO api_keys VALUES ({', '.join(['?'] * len(row))})"
    if database.startswith("sqlite:///"):
        conn = sqlite3.connect(database.removeprefix("sqlite:///"))
        for stmt in KEYS.ddl("sqlite"):
            conn.execute(stmt)
        conn.execute(insert, row)
        conn.commit()
        conn.close()
        return
    pg = connect(database, KEYS.ddl("postgres"))
    pg.execute(insert.replace("?", "%s"), row)
    pg.close()


def test_a_database_without_the_rate_limits_table_is_upgraded_on_open(database: str) -> None:
    _old_database(database)
    keys = KeyStore.open(database)
    try:
        old = keys.authenticate("tw-old")
        assert old is not None and old.rate_limits is None and old.rate_scopes == ()
        keys.set_account_limits("3", RateLimits(rpm=1))
        new, _ = keys.create("new", rate_limits=RateLimits(tpm=10))
    finally:
        keys.close()
    again = KeyStore.open(database)
    try:
        old_again = again.get("key_old")
        assert old_again is not None
        assert old_again.rate_scopes == (("account:3", RateLimits(rpm=1)),)
        new_again = again.get(new.id)
        assert new_again is not None and new_again.rate_limits == RateLimits(tpm=10)
    finally:
        again.close()
