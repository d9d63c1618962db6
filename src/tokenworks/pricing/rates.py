"""Rate tables: integer per-MTok prices per token class, with cliff tiers.

A request's tokens are split into six disjoint classes (`split_usage`); a `Rates` row prices each
class; a `RateTable` picks the row for the request's size. Cliff tiers reprice the *whole*
request once its input (or output) passes a threshold, as Gemini, Anthropic >200k, Qwen, MiniMax
and GLM do, unlike graduated tiers where only the tokens past the threshold pay more.

Amounts are integers in units of 1 / money.RATE_DENOMINATOR of the table's currency, so they are
exact and cheap: six integer multiplications per request.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenworks.metering.usage import Usage

# Token classes in the order of `split_usage` and of `Rates` fields.
TOKEN_CLASSES = (
    "input",
    "cached_input",
    "cache_write_5m",
    "cache_write_1h",
    "output",
    "reasoning",
)

Split = tuple[int, int, int, int, int, int]


def split_usage(usage: Usage) -> Split:
    """Disjoint token counts by class; their input part sums to `usage.input_tokens`.

    `input_tokens` includes cached and cache-write tokens and `output_tokens` includes reasoning
    (the OpenAI convention). Estimated usage may report more cached tokens than input; we clamp
    the subsets so every token is priced exactly once.
    """
    input_tokens = usage.input_tokens
    cached = min(usage.cached_input_tokens, input_tokens)
    # `cache_write_1h_tokens` is not a Usage field yet; read it when metering adds it.
    write_1h = min(getattr(usage, "cache_write_1h_tokens", 0), usage.cache_write_tokens)
    write_all = min(usage.cache_write_tokens, input_tokens - cached)
    write_1h = min(write_1h, write_all)
    reasoning = min(usage.reasoning_tokens, usage.output_tokens)
    return (
        input_tokens - cached - write_all,
        cached,
        write_all - write_1h,
        write_1h,
        usage.output_tokens - reasoning,
        reasoning,
    )


@dataclass(frozen=True, slots=True)
class Rates:
    """One price per token class, per MTok at money.RATE_SCALE; fallbacks already resolved."""

    input: int
    cached_input: int
    cache_write_5m: int
    cache_write_1h: int
    output: int
    reasoning: int

    def __post_init__(self) -> None:
        assert min(self.as_tuple()) >= 0, self

    @classmethod
    def resolve(
        cls,
        *,
        input: int | None,
        output: int | None,
        cached_input: int | None = None,
        cache_write_5m: int | None = None,
        cache_write_1h: int | None = None,
        reasoning: int | None = None,
    ) -> Rates:
        """Fill unpriced classes the way providers bill them: a cache class unpriced is plain
        input, a 1-hour write unpriced is a 5-minute write, unpriced reasoning is output."""
        base_in = input or 0
        base_out = output or 0
        write_5m = base_in if cache_write_5m is None else cache_write_5m
        return cls(
            input=base_in,
            cached_input=base_in if cached_input is None else cached_input,
            cache_write_5m=write_5m,
            cache_write_1h=write_5m if cache_write_1h is None else cache_write_1h,
            output=base_out,
            reasoning=base_out if reasoning is None else reasoning,
        )

    def as_tuple(self) -> Split:
        return (
            self.input,
            self.cached_input,
            self.cache_write_5m,
            self.cache_write_1h,
            self.output,
            self.reasoning,
        )

    def amount(self, split: Split) -> int:
        """Exact amount of `split` tokens, in 1 / RATE_DENOMINATOR currency units."""
        return (
            split[0] * self.input
            + split[1] * self.cached_input
            + split[2] * self.cache_write_5m
            + split[3] * self.cache_write_1h
            + split[4] * self.output
            + split[5] * self.reasoning
        )

    def max_input(self) -> int:
        return max(self.input, self.cached_input, self.cache_write_5m, self.cache_write_1h)

    def max_output(self) -> int:
        return max(self.output, self.reasoning)


@dataclass(frozen=True, slots=True)
class Tier:
    """Rates for a request with more than these many input and output tokens (0: no bound)."""

    input_over_tokens: int
    output_over_tokens: int
    rates: Rates

    def applies(self, input_tokens: int, output_tokens: int) -> bool:
        return (self.input_over_tokens == 0 or input_tokens > self.input_over_tokens) and (
            self.output_over_tokens == 0 or output_tokens > self.output_over_tokens
        )


@dataclass(frozen=True, slots=True)
class RateTable:
    """Base rates plus cliff tiers; the most specific applying tier prices the whole request."""

    base: Rates
    tiers: tuple[Tier, ...] = ()

    def __post_init__(self) -> None:
        keys = [(t.input_over_tokens, t.output_over_tokens) for t in self.tiers]
        assert keys == sorted(keys) and len(set(keys)) == len(keys), keys

    def rates_for(self, input_tokens: int, output_tokens: int) -> Rates:
        chosen = self.base
        for tier in self.tiers:
            if tier.applies(input_tokens, output_tokens):
                chosen = tier.rates
        return chosen

    def amount(self, split: Split) -> int:
        input_tokens = split[0] + split[1] + split[2] + split[3]
        return self.rates_for(input_tokens, split[4] + split[5]).amount(split)

    def worst_amount(self, input_tokens: int, output_tokens: int) -> int:
        """An upper bound of `amount` over every split with at most these many tokens."""
        best = input_tokens * self.base.max_input() + output_tokens * self.base.max_output()
        for tier in self.tiers:
            reachable = (tier.input_over_tokens < input_tokens or not tier.input_over_tokens) and (
                tier.output_over_tokens < output_tokens or not tier.output_over_tokens
            )
            if reachable:
                rates = tier.rates
                amount = input_tokens * rates.max_input() + output_tokens * rates.max_output()
                best = max(best, amount)
        return best
