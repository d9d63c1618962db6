"""The key store's counts as loaded from the table."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from tokenworks.keys.store import LOAD_LIMITS, LOAD_LIVE, KeyStore, open_key_rows

from ..conftest import both_stores

pytestmark = both_stores


def test_a_child_made_in_its_parents_millisecond_counts_in_the_parents_tree(
    database: str,
) -> None:
    """Rows load by (created_ms, id): here the child sorts before its parent."""
    rows = open_key_rows(database)
    try:
        for key_id, parent_id in (("key_b_root", None), ("key_a_child", "key_b_root")):
            rows.insert(
                (key_id, key_id, f"hash-{key_id}", "tw-...", None, None, parent_id,
                 1_000, None, None, json.dumps({}))
            )  # fmt: skip
    finally:
        rows.close()
    keys = KeyStore.open(database)
    try:
        child = keys.get("key_a_child")
        assert child is not None and keys.root_of(child).id == "key_b_root"
        assert keys.live_descendants("key_b_root", 2_000, cap=10) == 1
        assert keys.live_children("key_b_root", 2_000, cap=10) == 1
    finally:
        keys.close()


def _row(key_id: str, parent_id: str | None, created_ms: int, **dead: int | None) -> tuple:
    return (
        key_id, key_id, f"hash-{key_id}", "tw-...", None, None, parent_id, created_ms,
        dead.get("expires_ms"), dead.get("revoked_ms"), json.dumps({}),
    )  # fmt: skip


def test_start_up_loads_the_live_keys_only(database: str) -> None:
    """N live keys among M >> N revoked and expired sub-agent keys: memory holds the N (and
    an expired parent a live key counts under); a dead key is still found by id, and
    listings page through all of them."""
    live, dead = 5, 400
    now_ms = int(time.time() * 1000)
    rows = open_key_rows(database)
    try:
        rows.insert(_row("key_root", None, 1_000))
        rows.insert(_row("key_old_parent", "key_root", 1_001, expires_ms=2_000))
        rows.insert(_row("key_live_child", "key_old_parent", 1_002))
        for i in range(live - 2):
            rows.insert(_row(f"key_live{i}", "key_root", 2_000 + i))
        for i in range(dead):
            gone = {"revoked_ms": 3_000} if i % 2 else {"expires_ms": now_ms - 1}
            rows.insert(_row(f"key_dead{i:04}", "key_root", 3_000 + i, **gone))
    finally:
        rows.close()
    keys = KeyStore.open(database)
    try:
        in_memory = set(keys._by_id)
        assert in_memory == {
            "key_root", "key_old_parent", "key_live_child", *(f"key_live{i}" for i in range(3))
        }  # fmt: skip
        assert keys.authenticate("anything") is None
        child = keys.get("key_live_child")
        assert child is not None and keys.root_of(child).id == "key_root"
        assert keys.live_descendants("key_root", now_ms, cap=10_000) == live - 1
        revoked = keys.get("key_dead0001")
        assert revoked is not None and revoked.revoked_ms == 3_000  # "revoked", not unknown
        assert "key_dead0001" not in keys._by_id  # looked up, not cached
        assert keys.get("key_never") is None
        everything = keys.list()
        assert len(everything) == 1 + 1 + 1 + (live - 2) + dead
        assert [k.id for k in everything] == sorted(
            (k.id for k in everything),
            key=lambda i: (keys.get(i).created_ms, i),  # type: ignore[union-attr]
        )
        assert len(keys.list(include_revoked=False)) == len(everything) - dead // 2
        # Revoking a live key takes it (and its subtree) out of memory.
        revoked_now = {k.id for k in keys.revoke("key_old_parent")}
        assert revoked_now == {"key_old_parent", "key_live_child"}
        assert "key_live_child" not in keys._by_id
        gone = keys.get("key_live_child")
        assert gone is not None and gone.revoked_ms is not None
    finally:
        keys.close()


def test_a_name_finds_its_keys_in_any_case_dead_ones_included(database: str) -> None:
    """The `name` filter the CLI resolves a typed name with: one indexed read on both
    databases, every key of that name (any case, revoked too), in creation order, paged."""
    rows = open_key_rows(database)
    try:
        for i, name in enumerate(["Ada-Agent", "bob", "ada-agent", "ADA-AGENT", "ada-agents"]):
            row = list(_row(f"key_{i}", None, 1_000 + i, revoked_ms=5_000 if i == 2 else None))
            row[1] = name
            rows.insert(tuple(row))
    finally:
        rows.close()
    keys = KeyStore.open(database)
    try:
        assert [k.id for k in keys.page(10, name="ada-agent")] == ["key_0", "key_2", "key_3"]
        assert [k.id for k in keys.page(10, name="ada-agent", include_revoked=False)] == [
            "key_0",
            "key_3",
        ]
        first = keys.page(1, name="ADA-agent")
        assert [k.id for k in first] == ["key_0"]
        rest = keys.page(10, (first[0].created_ms, first[0].id), name="ADA-agent")
        assert [k.id for k in rest] == ["key_2", "key_3"]
        assert keys.page(10, name="ada") == [] and keys.page(10, name="ada-agent%") == []
    finally:
        keys.close()


def test_start_up_reads_neither_revoked_nor_expired_rows(database: str) -> None:
    """The start-up read is two index ranges (no expiry; expiry after now): a million
    sub-agent keys that simply expired are not scanned to find the live ones."""
    if not database.startswith("sqlite"):
        pytest.skip("the plan asserted is SQLite's; PostgreSQL's planner weighs statistics")
    open_key_rows(database).close()
    conn = sqlite3.connect(database.removeprefix("sqlite:///"))
    try:
        plan = [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {LOAD_LIVE.format(ph='?')}", (1,))]
    finally:
        conn.close()
    searches = [p for p in plan if p.startswith("SEARCH")]
    assert searches == [
        "SEARCH api_keys USING INDEX api_keys_unrevoked_expiry (expires_ms=?)",
        "SEARCH api_keys USING INDEX api_keys_unrevoked_expiry (expires_ms>?)",
    ], plan
    # Their rate limits: the accounts' range, then one lookup per live key; no scan.
    conn = sqlite3.connect(database.removeprefix("sqlite:///"))
    try:
        plan = [
            r[3]
            for r in conn.execute(f"EXPLAIN QUERY PLAN {LOAD_LIMITS.format(ph='?', c='')}", (1,))
        ]
    finally:
        conn.close()
    assert not [p for p in plan if p.startswith("SCAN")], plan
    assert sum("rate_limits" in p and p.startswith("SEARCH") for p in plan) >= 2, plan
