"""The key store's counts as loaded from the table."""

from __future__ import annotations

import json

from tokenworks.keys.store import KeyStore, open_key_rows

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
