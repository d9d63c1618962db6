"""Names where the CLI takes ids: `acme`, `payable:local` or `3` for an account, `alice-agent`
or `key_...` for a key.

Ids are assigned by the gateway and cannot be guessed, so a person types names. A name is
looked up through the admin API (the gateway stays the one source of truth): an exact id
wins, then an exact name, then a case-insensitive name; more than one match is an error that
lists them, as `kubectl` and `gh` do, never a guess.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

from tokenworks.cli.errors import AdminError

LIST_LIMIT = 10_000  # a bound on the levels a walk up the account tree takes
PAGE_ROWS = 1_000  # the largest page every listing serves
MAX_PAGES = 100_000  # a bound on the pages one lookup follows

Get = Callable[[str], Any]


class Ambiguous(AdminError):
    pass


def _same(name: str, ref: str, fold: bool) -> bool:
    return name.casefold() == ref.casefold() if fold else name == ref


def _pick(ref: str, what: str, rows: list[dict[str, Any]], label: Callable[[Any], str]) -> Any:
    """The one row whose id or name is `ref`; AdminError naming the candidates otherwise."""
    by_id = [r for r in rows if str(r["id"]) == ref]
    if by_id:
        return by_id[0]
    for fold in (False, True):
        found = [r for r in rows if _same(str(r["name"]), ref, fold)]
        if len(found) == 1:
            return found[0]
        if found:
            listed = "; ".join(label(r) for r in found[:10])
            more = f" and {len(found) - 10} more" if len(found) > 10 else ""
            raise Ambiguous(f"{what} {ref!r} is ambiguous: {listed}{more}; use the id")
    raise AdminError(f"no {what} {ref!r} (by id or name)")


def every(get: Get, path: str, query: dict[str, str]) -> list[dict[str, Any]]:
    """Every row of a paged listing (`limit`, `after` the previous page's last id,
    `has_more`): a name on the thousandth page resolves as well as one on the first."""
    rows: list[dict[str, Any]] = []
    params = {**query, "limit": str(PAGE_ROWS)}
    for _ in range(MAX_PAGES):
        page = get(f"{path}?{urllib.parse.urlencode(params)}")
        rows += page["data"]
        if not page.get("has_more") or not page["data"]:
            return rows
        params["after"] = str(page["data"][-1]["id"])
    raise AdminError(f"{path}: more than {MAX_PAGES} pages")


def usage(get: Get, query: dict[str, str]) -> dict[str, Any]:
    """A whole usage summary, its pages followed (`next_after`); the first page's answer
    with every page's rows in `data`."""
    params = dict(query)
    answer: dict[str, Any] | None = None
    for _ in range(MAX_PAGES):
        page = get(f"/admin/v1/usage?{urllib.parse.urlencode(params)}")
        if answer is None:
            answer = page
        else:
            answer["data"] += page["data"]
        if not page.get("has_more") or page.get("next_after") is None:
            answer["has_more"], answer["next_after"] = False, None
            return answer
        params["after"] = str(page["next_after"])
    raise AdminError(f"/admin/v1/usage: more than {MAX_PAGES} pages")


def named(get: Get, path: str, query: dict[str, str], ref: str) -> list[dict[str, Any]]:
    """The rows a listing's `name` filter finds for `ref`: one read, not a walk of every
    page. The filter folds case with the database's `lower()`, which on SQLite knows only
    ASCII letters: a non-ASCII name it finds nothing for is looked for in every row."""
    rows = every(get, path, {**query, "name": ref})
    if rows or ref.isascii():
        return rows
    return every(get, path, query)


def account_label(row: dict[str, Any]) -> str:
    """`3 (acme)`: the id to type and the name to recognise."""
    return f"{row['id']} ({row['name']})"


def _by_id(get: Get, path: str) -> dict[str, Any] | None:
    """What looks like an id is one cheap read; a 404 means it may be a name after all."""
    try:
        row: dict[str, Any] = get(path)
        return row
    except AdminError as exc:
        if not str(exc).startswith("404"):
            raise
    return None


def account(get: Get, ref: str) -> dict[str, Any]:
    """The account `ref` names (operator accounts included), as the list endpoint shows it."""
    row = _by_id(get, f"/admin/v1/accounts/{ref}") if ref.isdigit() else None
    if row is not None:
        return row
    rows = named(get, "/admin/v1/accounts", {"include_operator": "true"}, ref)
    found: dict[str, Any] = _pick(ref, "account", rows, lambda r: f"{account_label(r)} {r['kind']}")
    return found


def key(get: Get, ref: str) -> dict[str, Any]:
    """The key `ref` names; among keys of one name, the one still live when only one is."""
    is_id = ref.startswith("key_") and "/" not in ref
    row = _by_id(get, f"/admin/v1/keys/{urllib.parse.quote(ref)}") if is_id else None
    if row is not None:
        return row
    rows = named(get, "/admin/v1/keys", {}, ref)
    live = [r for r in rows if not r.get("revoked_at")]
    try:
        found: dict[str, Any] = _pick(ref, "key", live, key_label)
    except Ambiguous:
        raise
    except AdminError:  # a revoked key is still there to be named (revoke is idempotent)
        found = _pick(ref, "key", rows, key_label)
    return found


def key_label(row: dict[str, Any]) -> str:
    return f"{row['id']} ({row['name']})"
