"""Usage regrouped along the account tree (team, organisation) and over calendar periods
(week, month).

The usage table stores the account a request was billed to, not its ancestors: a team's
members and their agents come and go, and a row must not need rewriting when they do. So the
store groups by the leaf account (and by UTC day), and this module maps each group to its
ancestor or period and adds the sums up again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date

from tokenworks.metering.store import Summary

# Groups derived from a stored one: what to ask the store for instead.
TREE_GROUPS = {"team": "team", "org": "organisation", "organisation": "organisation"}
PERIOD_GROUPS = ("week", "month")
MAX_TREE_DEPTH = 64  # an account chain is never this deep; a cycle must not loop forever


def stored_groups(groups: list[str]) -> list[str]:
    """The groups the store can answer that the requested ones derive from, in order."""
    out: list[str] = []
    for g in groups:
        base = "account" if g in TREE_GROUPS else "day" if g in PERIOD_GROUPS else g
        if base not in out:
            out.append(base)
    return out


def period_of(day: str | None, period: str) -> str | None:
    """`2026-11-30` as its ISO week (`2026-W49`) or its month (`2026-11`)."""
    if day is None:
        return None
    if period == "month":
        return day[:7]
    year, week, _ = date.fromisoformat(day).isocalendar()
    return f"{year}-W{week:02d}"


AncestorOf = Callable[[str | None, str], str | None]


def ancestor_finder(parents: dict[int, tuple[int | None, str]]) -> AncestorOf:
    """`find(account_id, kind)`: the nearest account of `kind` at or above `account_id`,
    from a map of account id to (parent id, kind); None when there is none."""

    def find(account: str | None, kind: str) -> str | None:
        if account is None or not account.isdigit():
            return None
        current: int | None = int(account)
        for _ in range(MAX_TREE_DEPTH):
            if current is None or current not in parents:
                return None
            parent, current_kind = parents[current]
            if current_kind == kind:
                return str(current)
            current = parent
        return None

    return find


def rollup(groups: list[str], rows: list[Summary], ancestor: AncestorOf) -> list[Summary]:
    """`rows` (grouped by `stored_groups(groups)`) regrouped by `groups`, sums added."""
    merged: dict[tuple[object, ...], Summary] = {}
    for row in rows:
        values: dict[str, object] = {}
        for g in groups:
            if g in TREE_GROUPS:
                values[g] = ancestor(row.group.get("account"), TREE_GROUPS[g])
            elif g in PERIOD_GROUPS:
                values[g] = period_of(row.group.get("day"), g)
            else:
                values[g] = row.group.get(g)
        key = tuple(values[g] for g in groups)
        into = merged.get(key)
        if into is None:
            merged[key] = Summary(dict(values), row.requests, dict(row.sums))
            continue
        into.requests += row.requests
        for name, value in row.sums.items():
            into.sums[name] = into.sums.get(name, 0) + value
    # None sorts first, as the store orders its own groups.
    return sorted(
        merged.values(),
        key=lambda s: tuple((v is not None, str(v)) for v in (s.group[g] for g in groups)),
    )
