"""Money as integers: nano-units of a currency, exact decimal parsing, one rounding rule.

Amounts are `int` nano-units (1e-9 of a currency unit). Prices per million tokens are parsed from
decimal strings into integers at `RATE_SCALE` so that a request's amount is an exact integer
product; the only inexact step is `round_half_up`, applied once per amount.

Rounding rule (DESIGN "rounded once"): round half up, i.e. to the nearest nano-unit with ties
going up. Amounts here are never negative, so "half up" is "half away from zero". We prefer it
to ceiling because it is unbiased to within half a nano-unit per request, so our totals track a
producer's invoice (computed on aggregates) instead of drifting up by ~0.5 nano per request; it
is monotone, so a hold computed with it still bounds the settled amount.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

NANO_PER_UNIT = 10**9
NANO_PLACES = 9
# Per-MTok rates are stored as integers in units of 10**-RATE_PLACES currency per MTok.
RATE_PLACES = 12
RATE_SCALE: int = 10**RATE_PLACES  # an int exponent types as Any without this
TOKENS_PER_MTOK = 10**6
# An integer sum of `tokens * rate` is in units of 1 / RATE_DENOMINATOR currency.
RATE_DENOMINATOR = RATE_SCALE * TOKENS_PER_MTOK

_MAX_CHARS = 40
# ASCII digits only (\d would accept other scripts), matched in full (no trailing newline).
_DECIMAL_RE = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")


def _parse(text: str, max_places: int, what: str) -> tuple[bool, int]:
    """A decimal string as (negative, integer at max_places); ValueError on anything else."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a decimal string like '1.25', not {type(text).__name__}")
    if len(text) > _MAX_CHARS:
        raise ValueError(f"{what} {text[:_MAX_CHARS]!r}... is too long")
    match = _DECIMAL_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{what} {text!r} is not a plain decimal like '1.25'")
    sign, whole, frac = match.groups()
    frac = frac or ""
    if len(frac) > max_places:
        raise ValueError(f"{what} {text!r} has more than {max_places} decimal places")
    return sign == "-", int(whole + frac.ljust(max_places, "0"))


def parse_amount(text: str) -> int:
    """'12.345' -> 12_345_000_000 nano-units; rejects floats, exponents, >9 places, garbage."""
    negative, value = _parse(text, NANO_PLACES, "amount")
    return -value if negative else value


def parse_rate(text: str) -> int:
    """A non-negative per-MTok price string -> integer units of 10**-RATE_PLACES per MTok."""
    negative, value = _parse(text, RATE_PLACES, "price")
    if negative and value:
        raise ValueError(f"price {text!r} must not be negative")
    return value


def parse_factor(text: str) -> Fraction:
    """A non-negative decimal multiplier ('1.3', '0.5') as an exact Fraction."""
    negative, value = _parse(text, RATE_PLACES, "factor")
    if negative and value:
        raise ValueError(f"factor {text!r} must not be negative")
    return Fraction(value, RATE_SCALE)


def rate_from_decimal(value: Decimal) -> int:
    """A per-MTok Decimal (as genai-prices ships them) -> integer units; exact or ValueError."""
    if not value.is_finite() or value < 0:
        raise ValueError(f"price {value} must be finite and non-negative")
    scaled = value.scaleb(RATE_PLACES)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"price {value} has more than {RATE_PLACES} decimal places")
    return int(scaled)


def to_nano(value: Decimal) -> int:
    """An exact Decimal amount -> nano-units; ValueError if it is not a whole number of nanos."""
    if not value.is_finite():
        raise ValueError(f"amount {value} is not finite")
    scaled = value.scaleb(NANO_PLACES)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"amount {value} has more than {NANO_PLACES} decimal places")
    return int(scaled)


def round_half_up(numerator: int, denominator: int) -> int:
    """numerator/denominator rounded to the nearest integer, ties up; both must be >= 0 / > 0."""
    assert numerator >= 0 and denominator > 0, (numerator, denominator)
    return (2 * numerator + denominator) // (2 * denominator)


def format_nano(amount_nano: int) -> str:
    """12_345_000_000 -> '12.345': the decimal string of an amount, no float, no trailing zeros."""
    sign = "-" if amount_nano < 0 else ""
    whole, frac = divmod(abs(amount_nano), NANO_PER_UNIT)
    frac_text = f"{frac:09d}".rstrip("0")
    return f"{sign}{whole}.{frac_text}" if frac_text else f"{sign}{whole}"


def format_fraction(value: Fraction, places: int = NANO_PLACES) -> str:
    """A non-negative exact value as a decimal string rounded half up to `places` places."""
    scale = 10**places
    scaled = round_half_up(value.numerator * scale, value.denominator)
    whole, frac = divmod(scaled, scale)
    frac_text = f"{frac:0{places}d}".rstrip("0") if places else ""
    return f"{whole}.{frac_text}" if frac_text else f"{whole}"


def allocate(parts: list[int], denominator: int) -> list[int]:
    """Round each exact part parts[i]/denominator so the rounded parts sum to the rounded total.

    The total is rounded half up, as every amount is; the parts by largest remainder (ties to
    the earlier part). Used to show a quote's lines that add up to what was charged.
    """
    assert denominator > 0 and all(p >= 0 for p in parts), (parts, denominator)
    total = round_half_up(sum(parts), denominator)
    floors = [p // denominator for p in parts]
    short = total - sum(floors)
    assert 0 <= short <= len(parts), (short, parts)
    order = sorted(range(len(parts)), key=lambda i: (-(parts[i] % denominator), i))
    for i in order[:short]:
        floors[i] += 1
    return floors
