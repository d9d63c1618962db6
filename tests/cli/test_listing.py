"""CLI listings follow the API's pages (`limit`, `after`, `has_more`) to the end."""

from __future__ import annotations

import urllib.parse
from typing import Any

import pytest

from tokenworks.cli import admin, resolve


def test_list_all_follows_every_page(monkeypatch: pytest.MonkeyPatch) -> None:
    items = [{"id": f"key_{i:04}"} for i in range(2_345)]
    asked: list[dict[str, str]] = []

    def request(method: str, path: str, body: Any = None, **call: str) -> Any:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
        asked.append(query)
        start = 0
        if "after" in query:
            start = next(i for i, x in enumerate(items) if x["id"] == query["after"]) + 1
        page = items[start : start + int(query["limit"])]
        return {"data": page, "has_more": start + len(page) < len(items)}

    monkeypatch.setattr(admin, "request", request)
    got = admin.list_all("/admin/v1/keys", {"url": "u", "admin_key": "k"}, {"parent": "7"})
    assert got == items
    assert len(asked) == 3 and all(q["parent"] == "7" for q in asked)


def test_a_typed_name_resolves_in_one_filtered_read() -> None:
    """The CLI asks the listing for the name (one page), not for every page of keys; a key
    id is one read of that key; a non-ASCII name the database's `lower()` may not fold is
    looked for in every row."""
    keys = [{"id": f"key_{i:05}", "name": f"agent-{i}", "revoked_at": None} for i in range(3_000)]
    keys.append({"id": "key_ä", "name": "Ärger", "revoked_at": None})
    asked: list[str] = []

    def get(path: str) -> Any:
        asked.append(path)
        url = urllib.parse.urlsplit(path)
        if url.path.startswith("/admin/v1/keys/"):
            return next(k for k in keys if k["id"] == url.path.rsplit("/", 1)[1])
        query = dict(urllib.parse.parse_qsl(url.query))
        rows = keys
        if "name" in query:  # SQLite's lower(): ASCII letters only
            rows = [k for k in keys if k["name"].lower() == query["name"].lower()]
            rows = [k for k in rows if k["name"].isascii() or k["name"] == query["name"]]
        start = 0
        if "after" in query:
            start = next(i for i, x in enumerate(rows) if x["id"] == query["after"]) + 1
        page = rows[start : start + int(query["limit"])]
        return {"data": page, "has_more": start + len(page) < len(rows)}

    assert resolve.key(get, "AGENT-2999")["id"] == "key_02999"
    assert len(asked) == 1 and "name=AGENT-2999" in asked[0]
    asked.clear()
    assert resolve.key(get, "key_00007")["name"] == "agent-7"
    assert asked == ["/admin/v1/keys/key_00007"]
    asked.clear()
    assert resolve.key(get, "ärger")["id"] == "key_ä"  # folded here, not by the database
    assert len(asked) == 1 + 4  # the filtered read, then the 4 pages of every key
