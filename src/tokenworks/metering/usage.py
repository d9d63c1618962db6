"""What one request consumed, and the record we keep of it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Usage:
    """Token counts of one request.

    `input_tokens` includes cached and cache-write tokens (the OpenAI convention); the pricing
    code splits them. `output_tokens` includes reasoning tokens.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    # The part of cache_write_tokens written for 1 hour (Anthropic prices it apart).
    cache_write_1h_tokens: int = 0

    def __post_init__(self) -> None:
        assert self.input_tokens >= 0 and self.output_tokens >= 0
        assert 0 <= self.cached_input_tokens + self.cache_write_tokens <= self.input_tokens or (
            self.estimated
        )
        assert 0 <= self.cache_write_1h_tokens <= self.cache_write_tokens
        assert 0 <= self.reasoning_tokens <= self.output_tokens or self.estimated


@dataclass(slots=True)
class UsageRecord:
    """One row of the usage table: one request, whatever its outcome."""

    request_id: str
    ts_ms: int
    key_id: str | None
    account_id: str | None
    public_model: str
    producer: str | None
    upstream_model: str | None
    endpoint: str
    status: int
    usage: Usage
    latency_ms: float
    ttft_ms: float | None
    streamed: bool
    error: str | None = None
    cost_nano: int = 0
    price_nano: int = 0
    service_tier: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # Price above the request's hold, not charged: a loss (the hold's worst case fell short).
    clamped_nano: int = 0
    # How long it waited for a producer (the scheduler's queue); None in rows written before
    # the column existed.
    queue_ms: float | None = 0.0
