"""Usage rolled up the account tree and over weeks and months, from the stored groups."""

from __future__ import annotations

from tokenworks.metering.regroup import ancestor_finder, period_of, rollup, stored_groups
from tokenworks.metering.store import Summary


def test_stored_groups_ask_the_store_for_what_the_rollup_needs() -> None:
    assert stored_groups(["team", "model", "org"]) == ["account", "model"]
    assert stored_groups(["week", "day", "month"]) == ["day"]


def test_periods() -> None:
    assert period_of("2026-11-30", "month") == "2026-11"
    assert period_of("2026-11-30", "week") == "2026-W49"
    assert period_of("2027-01-01", "week") == "2026-W53"  # ISO weeks cross the new year
    assert period_of(None, "week") is None


def test_ancestors_and_sums() -> None:
    tree = {1: (None, "organisation"), 2: (1, "team"), 3: (2, "user"), 4: (1, "user")}
    find = ancestor_finder(tree)
    assert find("3", "team") == "2" and find("3", "organisation") == "1"
    assert find("4", "team") is None and find(None, "team") is None and find("99", "team") is None
    looped = ancestor_finder({5: (6, "user"), 6: (5, "user")})
    assert looped("5", "team") is None  # a cycle ends at the depth bound

    def row(account: str, day: str, n: int) -> Summary:
        return Summary({"account": account, "day": day}, n, {"price_nano": 10 * n})

    rows = [row("3", "2026-11-29", 1), row("2", "2026-11-30", 2), row("4", "2026-11-30", 4)]
    by_team_week = rollup(["team", "week"], rows, find)
    assert [(s.group, s.requests, s.sums) for s in by_team_week] == [
        ({"team": None, "week": "2026-W49"}, 4, {"price_nano": 40}),
        ({"team": "2", "week": "2026-W48"}, 1, {"price_nano": 10}),
        ({"team": "2", "week": "2026-W49"}, 2, {"price_nano": 20}),
    ]
    [org] = rollup(["org"], rows, find)
    assert org.group == {"org": "1"} and org.requests == 7 and org.sums == {"price_nano": 70}
