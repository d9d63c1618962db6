"""The `provider` object is checked strictly: a wrong field or type is a 400 naming it."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest

from tokenworks.dispatch.errors import InvalidCall
from tokenworks.dispatch.preferences import MaxPrice, ProviderPrefs, parse_provider


def test_a_full_object_parses() -> None:
    prefs = parse_provider(
        {
            "order": ["B", "a", "b"],
            "only": ["a", "b"],
            "ignore": ["c"],
            "allow_fallbacks": False,
            "sort": {"by": "throughput", "partition": "none"},
            "max_price": {"prompt": 1, "completion": "2.50", "request": 0.1},
        }
    )
    assert prefs == ProviderPrefs(
        order=("b", "a"),  # lower-cased, first mention kept
        only=frozenset({"a", "b"}),
        ignore=frozenset({"c"}),
        allow_fallbacks=False,
        sort="throughput",
        max_price=MaxPrice(Fraction(1), Fraction(5, 2), Fraction(1, 10)),
    )
    assert parse_provider({}) == ProviderPrefs()


@pytest.mark.parametrize(
    ("value", "param"),
    [
        ([], "provider"),
        ({"quantizations": ["fp8"]}, "provider.quantizations"),
        ({"data_collection": "deny"}, "provider.data_collection"),
        ({"order": "a"}, "provider.order"),
        ({"only": [1]}, "provider.only"),
        ({"ignore": [""]}, "provider.ignore"),
        ({"ignore": ["x"] * 65}, "provider.ignore"),
        ({"allow_fallbacks": "no"}, "provider.allow_fallbacks"),
        ({"sort": "cheap"}, "provider.sort"),
        ({"sort": {"by": "price", "mode": 1}}, "provider.sort.mode"),
        ({"sort": {"by": "price", "partition": "x"}}, "provider.sort.partition"),
        ({"max_price": 3}, "provider.max_price"),
        ({"max_price": {"image": 1}}, "provider.max_price.image"),
        ({"max_price": {"prompt": -1}}, "provider.max_price.prompt"),
        ({"max_price": {"prompt": "1e3"}}, "provider.max_price.prompt"),
        ({"max_price": {"completion": True}}, "provider.max_price.completion"),
        ({"max_price": {"completion": float("nan")}}, "provider.max_price.completion"),
        ({"max_price": {"request": None}}, "provider.max_price.request"),
    ],
)
def test_bad_objects_name_the_field(value: Any, param: str) -> None:
    with pytest.raises(InvalidCall) as caught:
        parse_provider(value)
    assert caught.value.param == param
    assert caught.value.status == 400
