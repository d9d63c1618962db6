"""OpenRouter's per-request `provider` object: which producers may serve, in what order.

The gateway consumes it (`api/openai.py` takes it out of the body: no upstream sees it) and
the router applies it. Names are matched against the config's producer names, case-insensitive.
Checked strictly: a field this gateway does not implement, or a value of the wrong type, is a
400 naming the field, never silently ignored (a misspelled `ignore` would otherwise send the
request where the client said not to).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from tokenworks.dispatch.errors import InvalidCall

SORTS = ("price", "throughput", "latency")
MAX_NAMES = 64  # per list; no model has more deployments than that
MAX_NAME_BYTES = 256
_DECIMAL = re.compile(r"\d{1,12}(\.\d{1,12})?")


@dataclass(frozen=True, slots=True)
class MaxPrice:
    """Ceilings in ledger-currency units: per million input (`prompt`) and output
    (`completion`) tokens, and per request (`request`: a per-request fee, which no
    deployment here charges)."""

    prompt: Fraction | None = None
    completion: Fraction | None = None
    request: Fraction | None = None


@dataclass(frozen=True, slots=True)
class ProviderPrefs:
    order: tuple[str, ...] = ()  # lower-cased producer names, tried first in this order
    only: frozenset[str] | None = None
    ignore: frozenset[str] = frozenset()
    allow_fallbacks: bool = True
    sort: str | None = None  # "price", "throughput" or "latency"
    max_price: MaxPrice | None = None


def parse_provider(value: Any) -> ProviderPrefs:
    """The `provider` object of a request body, checked; raises InvalidCall naming the field."""
    if not isinstance(value, dict):
        raise InvalidCall("'provider' must be an object", param="provider")
    known = {"order", "only", "ignore", "allow_fallbacks", "sort", "max_price"}
    for name in value:
        if name not in known:
            raise InvalidCall(
                f"'provider.{name}' is not supported; this gateway takes"
                f" {', '.join(sorted(known))}",
                param=f"provider.{name}",
            )
    allow = value.get("allow_fallbacks", True)
    if not isinstance(allow, bool):
        raise InvalidCall(
            "'provider.allow_fallbacks' must be a boolean", param="provider.allow_fallbacks"
        )
    only = _names(value, "only")
    return ProviderPrefs(
        order=tuple(dict.fromkeys(_names(value, "order") or ())),
        only=None if only is None else frozenset(only),
        ignore=frozenset(_names(value, "ignore") or ()),
        allow_fallbacks=allow,
        sort=_sort(value.get("sort")),
        max_price=_max_price(value.get("max_price")),
    )


def _names(value: dict[str, Any], field: str) -> list[str] | None:
    names = value.get(field)
    if names is None:
        return None
    param = f"provider.{field}"
    if not isinstance(names, list) or len(names) > MAX_NAMES:
        raise InvalidCall(
            f"'{param}' must be an array of at most {MAX_NAMES} producer names", param=param
        )
    for name in names:
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_BYTES:
            raise InvalidCall(
                f"'{param}' must hold producer names (non-empty strings)", param=param
            )
    return [name.lower() for name in names]


def _sort(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):  # OpenRouter's {by, partition}; one model: partition is moot
        for name in value:
            if name not in ("by", "partition"):
                raise InvalidCall(
                    f"'provider.sort.{name}' is not supported", param=f"provider.sort.{name}"
                )
        partition = value.get("partition", "model")
        if partition not in ("model", "none"):
            raise InvalidCall(
                "'provider.sort.partition' must be 'model' or 'none'",
                param="provider.sort.partition",
            )
        value = value.get("by")
    if value not in SORTS:
        raise InvalidCall(
            f"'provider.sort' must be one of {', '.join(SORTS)}", param="provider.sort"
        )
    return str(value)


def _max_price(value: Any) -> MaxPrice | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidCall("'provider.max_price' must be an object", param="provider.max_price")
    prices: dict[str, Fraction] = {}
    for name, amount in value.items():
        param = f"provider.max_price.{name}"
        if name not in ("prompt", "completion", "request"):
            raise InvalidCall(
                f"'{param}' is not supported; this gateway takes prompt, completion, request",
                param=param,
            )
        prices[name] = _amount(amount, param)
    return MaxPrice(**prices)


def _amount(value: Any, param: str) -> Fraction:
    """A number or a decimal string (the OpenRouter SDKs send strings), >= 0 and finite."""
    message = f"'{param}' must be a number >= 0 (or a decimal string), per million tokens"
    if isinstance(value, bool):
        raise InvalidCall(message, param=param)
    if isinstance(value, int):
        if not 0 <= value <= 10**12:
            raise InvalidCall(message, param=param)
        return Fraction(value)
    if isinstance(value, float):
        if not 0 <= value <= 1e12:  # also false for NaN
            raise InvalidCall(message, param=param)
        return Fraction(str(value))  # the decimal the client wrote, not its binary neighbour
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return Fraction(value.strip())
    raise InvalidCall(message, param=param)
