"""What both key-creation endpoints (`POST /admin/v1/keys`, `POST /v1/keys`) read from a
request, each field bounded (what is done with it is `keys/lifecycle.py`'s).

Every field a client sends is kept for the key's life (in memory and in the table), so each is
bounded here: a bad one is a 400 naming it, never a 500 from the store. A field nobody reads
is refused too (`refuse_unknown_fields`, used by every admin body): a misspelt `"limits"`
must not make a key without its budget.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from tokenworks.api.errors import ApiError
from tokenworks.keys.rate_limits import FIELDS as RATE_LIMIT_FIELDS
from tokenworks.keys.rate_limits import MAX_RATE_LIMIT, RateLimits
from tokenworks.ledger.domain import MAX_AMOUNT_NANO
from tokenworks.money import format_nano, parse_amount

PERIODS = ("day", "week", "month", "total")
MAX_KEY_NAME_CHARS = 256
MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
# Expiry times are int64 milliseconds in the table; ten years is far inside and long enough
# for a key meant to expire (one meant to live on sends no ttl_s).
MAX_TTL_S = 10 * 365 * 86_400


def refuse_unknown_fields(body: dict[str, Any], allowed: Collection[str], where: str = "") -> None:
    """A 400 naming the first field not in `allowed`, as the config refuses unknown keys.
    `where`: the enclosing field of a nested object (`limit.`), named in the error."""
    unknown = sorted(set(body) - set(allowed))
    if not unknown:
        return
    shown = ", ".join(repr(where + u[:64]) for u in unknown[:10])
    raise ApiError(
        400,
        f"unknown field{'s' if len(unknown) > 1 else ''}: {shown}; expected "
        f"{', '.join(where + a for a in sorted(allowed))}",
        param=where + unknown[0][:64],
        code="unknown_field",
    )


def _text(value: str, param: str, max_chars: int) -> str:
    if len(value) > max_chars:
        raise ApiError(400, f"'{param}' is longer than {max_chars} characters", param=param)
    if "\x00" in value:  # PostgreSQL text cannot hold NUL
        raise ApiError(400, f"'{param}' must not contain NUL characters", param=param)
    return value


def parse_key_name(body: dict[str, Any]) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, "'name' must be a non-empty string", param="name")
    return _text(name.strip(), "name", MAX_KEY_NAME_CHARS)


def parse_name_filter(params: Mapping[str, str]) -> str | None:
    """A listing's `name` filter (a name typed on a command line, matched in any case)."""
    name = params.get("name")
    return None if name is None else _text(name, "name", MAX_KEY_NAME_CHARS)


def parse_models(body: dict[str, Any], known: Collection[str]) -> list[str] | None:
    """The models a key may call (sorted, once each), all of them known; absent -> None."""
    models = body.get("models")
    if models is None:
        return None
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ApiError(400, "'models' must be null or an array of model names", param="models")
    unknown = sorted(set(models) - set(known))
    if unknown:
        shown = ", ".join(repr(m[:64]) for m in unknown[:10])
        raise ApiError(400, f"unknown models: {shown}", param="models", code="unknown_model")
    return sorted(set(models))


def parse_ttl(body: dict[str, Any]) -> float | None:
    ttl_s = body.get("ttl_s")
    if ttl_s is None:
        return None
    if (
        not isinstance(ttl_s, int | float)
        or isinstance(ttl_s, bool)
        or not (0 < ttl_s <= MAX_TTL_S)  # also false for NaN
    ):
        raise ApiError(
            400, f"'ttl_s' must be a number of seconds within 0..{MAX_TTL_S}", param="ttl_s"
        )
    return float(ttl_s)


def parse_metadata(body: dict[str, Any]) -> dict[str, str]:
    """Up to MAX_METADATA_ENTRIES string/number/boolean values, kept as strings."""
    metadata = body.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ApiError(400, "'metadata' must be an object", param="metadata")
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise ApiError(
            400, f"'metadata' has more than {MAX_METADATA_ENTRIES} entries", param="metadata"
        )
    out: dict[str, str] = {}
    for k, v in metadata.items():
        if not isinstance(v, str | int | float) or (isinstance(v, float) and not math.isfinite(v)):
            raise ApiError(
                400, "metadata values must be strings, numbers or booleans", param="metadata"
            )
        text = v if isinstance(v, str) else str(v)  # ints are bounded by the JSON decoder
        out[_text(k, "metadata", MAX_METADATA_KEY_CHARS)] = _text(
            text, "metadata", MAX_METADATA_VALUE_CHARS
        )
    return out


def parse_limit(body: dict[str, Any], *, default_period: str) -> tuple[int, str] | None:
    """`"limit": {"amount": "5.00", "period": "day"}` -> (nano, period); absent -> None."""
    limit = body.get("limit")
    if limit is None:
        return None
    if not isinstance(limit, dict) or not isinstance(limit.get("amount"), str):
        raise ApiError(
            400, "'limit' must be {\"amount\": \"<decimal string>\", \"period\": ...}",
            param="limit",
        )  # fmt: skip
    refuse_unknown_fields(limit, ("amount", "period"), "limit.")
    try:
        amount_nano = parse_amount(limit["amount"])
    except ValueError as exc:
        raise ApiError(400, f"limit.amount: {exc}", param="limit.amount") from exc
    if not 0 <= amount_nano <= MAX_AMOUNT_NANO:
        raise ApiError(
            400, f"limit.amount must be within 0..{format_nano(MAX_AMOUNT_NANO)}",
            param="limit.amount",
        )  # fmt: skip
    period = limit.get("period", default_period)
    if period not in PERIODS:
        raise ApiError(
            400, f"limit.period must be one of {', '.join(PERIODS)}", param="limit.period"
        )
    return amount_nano, period


def parse_rate_limits(body: dict[str, Any]) -> RateLimits | None:
    """`"rate_limits": {"rpm": N, "tpm": N, "max_concurrency": N}` (each optional, a positive
    integer or null); absent or null -> None."""
    value = body.get("rate_limits")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(
            400, "'rate_limits' must be {\"rpm\": N, \"tpm\": N, \"max_concurrency\": N}",
            param="rate_limits",
        )  # fmt: skip
    refuse_unknown_fields(value, RATE_LIMIT_FIELDS, "rate_limits.")
    return rate_limits_from(value, "rate_limits.")


def rate_limits_from(value: dict[str, Any], where: str) -> RateLimits:
    """The three limits of an object whose other fields were checked; `where` prefixes the
    field named in an error."""
    parsed: dict[str, int | None] = {}
    for name in RATE_LIMIT_FIELDS:
        n = value.get(name)
        if n is not None and (
            not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_RATE_LIMIT
        ):
            raise ApiError(
                400, f"'{where}{name}' must be null or an integer in 1..{MAX_RATE_LIMIT}",
                param=f"{where}{name}",
            )  # fmt: skip
        parsed[name] = n
    return RateLimits(**parsed)
