"""Which upstream response headers a client sees, and under what name.

A client's SDK reads some of an upstream's headers: `retry-after-ms` and `retry-after` set
how long its retry waits (the OpenAI SDKs prefer the milliseconds), `x-should-retry` whether
it retries at all, and users log the provider's request id and processing time. These pass
through on answers and on errors. Three kinds are renamed rather than passed:

- the provider's request id (`x-request-id`, Anthropic's `request-id`) becomes
  `x-upstream-request-id`: `x-request-id` is the gateway's own id of the request;
- `x-ratelimit-*` (OpenAI, Groq, DeepSeek, OpenRouter) and `anthropic-ratelimit-*` become
  `x-upstream-ratelimit-*`: `x-ratelimit-*` are the gateway's own consumer-limit headers,
  and the upstream's figures describe the gateway's account, not the client's.

Everything else (cookies, `openai-organization`, `openai-project`, server and CDN headers)
stays behind: it describes the gateway's own account or connection.
"""

from __future__ import annotations

from collections.abc import Iterable

# Passed through under their own name.
PASSED = frozenset(
    {
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
        "openai-processing-ms",
        "openai-version",
        "anthropic-version",
    }
)
UPSTREAM_REQUEST_ID = "x-upstream-request-id"
REQUEST_IDS = frozenset({"x-request-id", "request-id"})
RATELIMIT_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
RENAMED_RATELIMIT_PREFIX = "x-upstream-ratelimit-"
# A misbehaving upstream must not make us copy an unbounded number of headers.
MAX_PASSED_HEADERS = 32
MAX_HEADER_VALUE_CHARS = 256


def passthrough(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (lower-case name, value) pairs of an upstream's headers a client gets: one pass
    over them, one set probe per header, and a prefix test only for `x-`/`anthropic-` ones."""
    out: list[tuple[str, str]] = []
    for name, value in headers:
        lower = name.lower()
        if lower in PASSED:
            pass
        elif lower in REQUEST_IDS:
            lower = UPSTREAM_REQUEST_ID
        elif lower.startswith(RATELIMIT_PREFIXES):
            lower = RENAMED_RATELIMIT_PREFIX + lower[lower.index("ratelimit-") + 10 :]
        else:
            continue
        if len(value) > MAX_HEADER_VALUE_CHARS or "\n" in value or "\r" in value:
            continue
        out.append((lower, value))
        if len(out) >= MAX_PASSED_HEADERS:
            break
    return out


def as_dict(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The pairs as a header dict (a repeated name keeps its first value)."""
    out: dict[str, str] = {}
    for name, value in pairs:
        out.setdefault(name, value)
    return out
