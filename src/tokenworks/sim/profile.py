"""Profiles of the simulated token factory: how fast, how big and how reliable it is."""

from __future__ import annotations

import time
from dataclasses import dataclass

MIB = 1024 * 1024

# Fault kinds the sim can serve on demand (`sim_fault` body field, POST /sim/faults with a
# `count`) or at random. Each is described in FAULT_HELP, which GET /sim/faults and
# `tokenworks upstream-sim --help` list.
OVERCOUNT_FACTOR = 1000
FLOOD_CHOICES = 64
HUGE_PROMPT_TOKENS = 10**19
HUGE_COMPLETION_TOKENS = 10**25
FAULT_HELP: dict[str, str] = {
    "500": "answer 500 before any byte",
    "503": "answer 503 (overloaded) with Retry-After",
    "429": "answer 429 (insufficient capacity) with Retry-After",
    "timeout": "hang before the first byte, then 504 (timeout_fault_s)",
    "slow_first_byte": "wait delay_s (default slow_first_byte_s) before the first byte",
    "cut": "send half the answer, then drop the connection",
    "malformed": "send half the answer, then invalid JSON",
    "no_usage": "report no usage at all",
    "overcount": f"report {OVERCOUNT_FACTOR} times the prompt tokens",
    # Usage an upstream should never report; the gateway must neither crash nor give it away.
    "huge_usage": "report absurd usage: 1e19 prompt and 1e25 completion tokens (integers)",
    "negative_usage": "report negative prompt, completion and total tokens",
    "float_usage": "report the token counts as non-integer numbers (n + 0.5)",
    "string_usage": 'report the token counts as strings ("12")',
    "zero_usage": "report zero tokens for an answer that has text",
    "usage_elsewhere": "report usage under 'x_usage' instead of 'usage'",
    "choice_flood": f"answer {FLOOD_CHOICES} choices whatever 'n' asked (usage counts them all)",
    "stall": "stop sending halfway for delay_s seconds (default stall_s), then finish",
    "no_done": "end a stream after its usage chunk without 'data: [DONE]' (streams only)",
    "wrong_tier": "report service_tier 'priority' whatever was asked (chat only)",
    # Provider behaviour a gateway must pass on as it came (the sim's `faults.py` has them).
    "unsupported_parameter": "answer 400 unsupported_parameter (param max_tokens), as OpenAI",
    "model_not_found": "answer 404 model_not_found naming the model, as OpenAI",
    "failed_generation": "answer 400 tool_use_failed with Groq's 'failed_generation' field",
    "bad_credentials": "answer 401 invalid_api_key (the gateway's own key is wrong)",
    "forbidden": "answer 403 unsupported_country_region_territory",
    "rate_limited": "answer 429 rate_limit_exceeded with retry-after-ms 200 and x-ratelimit-*",
    "provider_headers": "answer with OpenAI's headers (processing time, x-ratelimit-*, a cookie)",
    "upstream_cost": "report OpenRouter's own 'cost' (a number) in usage",
    "crlf": "stream in CRLF line ends, opening with a ': OPENROUTER PROCESSING' comment",
}
FAULT_KINDS: frozenset[str] = frozenset(FAULT_HELP)


def fault_help_text() -> str:
    """The fault list as `tokenworks upstream-sim --help` prints it."""
    lines = ["faults (POST /sim/faults {kind, count, delay_s}, or 'sim_fault' in a request body):"]
    lines += [f"  {kind:<16} {text}" for kind, text in FAULT_HELP.items()]
    return "\n".join(lines)


# The faults that change what `usage` says (or where), not how the answer is delivered.
USAGE_FAULTS: frozenset[str] = frozenset(
    {"huge_usage", "negative_usage", "float_usage", "string_usage", "zero_usage",
     "usage_elsewhere"}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class SimProfile:
    """One producer's character. `None` capacities mean unlimited (no pacing, no slots)."""

    name: str
    # Decode capacity shared by all streams decoding at once, and the cap of a single stream.
    capacity_tokens_per_s: float | None = None
    max_stream_tokens_per_s: float | None = None
    # Concurrency: requests holding a slot, plus a bounded FIFO of requests waiting for one.
    slots: int | None = None
    queue_max: int = 0
    queue_wait_max_s: float = 5.0
    retry_after_s: int = 1
    # The status a request beyond slots + queue is refused with: 429 ("insufficient
    # capacity") or 503 ("overloaded"), both with Retry-After.
    full_status: int = 429
    # Also send `retry-after-ms` (as OpenAI and Anthropic do), which clients read first.
    retry_after_ms: int | None = None
    # Time to first token: fixed latency plus prefill at a prompt-length-dependent cost.
    ttft_s: float = 0.0
    prefill_tokens_per_s: float | None = None
    # Output length when the request sets no max_tokens: seeded from the prompt, in [min, max].
    default_output_tokens_min: int = 16
    default_output_tokens_max: int = 64
    # With max_tokens set, produce exactly that many (finish_reason "length"), as tests expect;
    # False: produce min(natural length, max_tokens), as a real model would.
    fill_max_tokens: bool = True
    # Peak hours (local time, [start, end) hours of the day) cut capacity by a factor.
    peak_hours: tuple[int, int] | None = None
    peak_capacity_factor: float = 1.0
    # Random faults: share of model requests that get one, drawn from `fault_kinds`, seeded.
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = ("500", "503", "429", "cut")
    seed: int = 0
    timeout_fault_s: float = 3600.0
    slow_first_byte_s: float = 2.0
    stall_s: float = 2.0  # the `stall` fault's pause when the request gives no delay_s
    # Models listed by /v1/models (any model name is accepted and echoed).
    models: tuple[str, ...] = ("sim-small", "sim-large", "sim-reasoner", "sim-embed")
    # Models whose name contains "reason" spend this share of output on reasoning tokens.
    reasoning_share: float = 0.5
    embedding_dims: int = 256
    # Prefix cache: a prompt whose first N chars were seen before reports them as cached. 0: off.
    prefix_cache_chars: int = 0
    prefix_cache_entries: int = 10_000
    # Require `Authorization: Bearer <api_key>`; None accepts any header or none.
    api_key: str | None = None
    max_body_bytes: int = 8 * MIB

    def __post_init__(self) -> None:
        unknown = set(self.fault_kinds) - FAULT_KINDS
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {sorted(FAULT_KINDS)}")
        if self.default_output_tokens_min < 1 or (
            self.default_output_tokens_max < self.default_output_tokens_min
        ):
            raise ValueError("default_output_tokens_min must be >= 1 and <= the max")
        if self.slots is not None and self.slots < 1:
            raise ValueError("slots must be >= 1 or None (unlimited)")
        if self.full_status not in (429, 503):
            raise ValueError("full_status must be 429 or 503")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("fault_rate must be in [0, 1]")

    @property
    def paced(self) -> bool:
        """Whether any request of this profile ever waits (instant profiles never do)."""
        return bool(
            self.capacity_tokens_per_s
            or self.max_stream_tokens_per_s
            or self.ttft_s
            or self.prefill_tokens_per_s
        )

    def capacity_now_tokens_per_s(self) -> float | None:
        """Shared decode capacity at this moment, peak hours applied."""
        capacity = self.capacity_tokens_per_s
        if capacity is None or self.peak_hours is None:
            return capacity
        start, end = self.peak_hours
        hour = time.localtime().tm_hour
        in_peak = start <= hour < end if start <= end else (hour >= start or hour < end)
        return capacity * self.peak_capacity_factor if in_peak else capacity


PROFILES: dict[str, SimProfile] = {
    # Throughput benchmarks: no delays, no slots, no prefix cache; the cheapest code path.
    "instant": SimProfile(name="instant"),
    # A premium GPU farm: quick first token, fast streams, many slots.
    "fast": SimProfile(
        name="fast",
        capacity_tokens_per_s=20_000,
        max_stream_tokens_per_s=150,
        slots=64,
        queue_max=64,
        ttft_s=0.15,
        prefill_tokens_per_s=20_000,
        default_output_tokens_min=60,
        default_output_tokens_max=300,
        prefix_cache_chars=1024,
    ),
    # A budget provider: slower, few slots, "insufficient computing power" at peak hours.
    "cheap": SimProfile(
        name="cheap",
        capacity_tokens_per_s=1_500,
        max_stream_tokens_per_s=40,
        slots=8,
        queue_max=16,
        queue_wait_max_s=3.0,
        retry_after_s=2,
        ttft_s=0.6,
        prefill_tokens_per_s=4_000,
        default_output_tokens_min=60,
        default_output_tokens_max=300,
        peak_hours=(9, 18),
        peak_capacity_factor=0.5,
        prefix_cache_chars=1024,
    ),
    # An overloaded or self-hosted box: long first token, slow streams, 4 slots.
    "slow": SimProfile(
        name="slow",
        capacity_tokens_per_s=400,
        max_stream_tokens_per_s=15,
        slots=4,
        queue_max=4,
        queue_wait_max_s=5.0,
        retry_after_s=5,
        ttft_s=1.5,
        prefill_tokens_per_s=1_000,
        default_output_tokens_min=40,
        default_output_tokens_max=200,
    ),
    # Like fast, but one request in ten fails (seeded, so runs are reproducible).
    "flaky": SimProfile(
        name="flaky",
        capacity_tokens_per_s=20_000,
        max_stream_tokens_per_s=150,
        slots=64,
        queue_max=64,
        ttft_s=0.15,
        prefill_tokens_per_s=20_000,
        default_output_tokens_min=60,
        default_output_tokens_max=300,
        fault_rate=0.1,
        fault_kinds=("500", "503", "429", "cut", "malformed"),
        seed=7,
    ),
}
