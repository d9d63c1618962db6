"""The one idempotency-key parser: body field or header, 1-200 printable characters."""

from __future__ import annotations

from typing import Any

import pytest

from tokenworks.api.errors import ApiError
from tokenworks.api.idempotency import MAX_IDEMPOTENCY_KEY_CHARS, idempotency_key


def parse(body: dict[str, Any], header: str | None = None, *, required: bool = False) -> Any:
    headers = {} if header is None else {"idempotency-key": header}
    return idempotency_key(headers, body, required=required)


def refusal(body: dict[str, Any], header: str | None = None, **kw: bool) -> ApiError:
    with pytest.raises(ApiError) as raised:
        parse(body, header, **kw)
    assert raised.value.status == 400 and raised.value.param == "idempotency_key"
    return raised.value


def test_from_the_body_or_the_header_when_they_agree() -> None:
    assert parse({"idempotency_key": "k-1"}) == "k-1"
    assert parse({}, "k-2") == "k-2"
    assert parse({"idempotency_key": "k-3"}, "k-3") == "k-3"
    assert parse({}, "") is None  # an empty header is no header
    assert parse({}) is None
    assert "differ" in refusal({"idempotency_key": "a"}, "b").message


def test_a_required_key_that_is_missing_is_named() -> None:
    assert refusal({}, required=True).code == "missing_idempotency_key"
    assert parse({}, "k", required=True) == "k"


@pytest.mark.parametrize("value", [7, True, [], ""])
def test_the_body_field_is_a_non_empty_string(value: Any) -> None:
    refusal({"idempotency_key": value})


@pytest.mark.parametrize(
    "key", ["x" * (MAX_IDEMPOTENCY_KEY_CHARS + 1), "tab\there", "nul\x00", "new\nline", "\x7f"]
)
def test_too_long_or_unprintable_keys_are_refused_on_every_endpoint(key: str) -> None:
    # Both creation endpoints and ledger writes read keys here: one rule for all of them.
    for required in (False, True):
        assert "printable" in refusal({"idempotency_key": key}, required=required).message
        assert "printable" in refusal({}, key, required=required).message


def test_the_longest_printable_key_is_taken() -> None:
    key = "é" + "x" * (MAX_IDEMPOTENCY_KEY_CHARS - 1)
    assert parse({"idempotency_key": key}) == key
