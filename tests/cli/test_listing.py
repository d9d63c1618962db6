"""CLI listings follow the API's pages (`limit`, `after`, `has_more`) to the end."""

from __future__ import annotations

import urllib.parse
from typing import Any

import pytest

from tokenworks.cli import admin


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
