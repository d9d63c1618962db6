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

The other way, only `anthropic-beta` and `anthropic-version` of a client's headers go on, to an
Anthropic producer a Messages request passes through to (`anthropic_forwarded`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

UPSTREAM_REQUEST_ID = b"x-upstream-request-id"
# Lower-case upstream name -> the name a client sees it under. One dict probe per header.
RENAMED: dict[bytes, bytes] = {
    b"retry-after": b"retry-after",
    b"retry-after-ms": b"retry-after-ms",
    b"x-should-retry": b"x-should-retry",
    b"openai-processing-ms": b"openai-processing-ms",
    b"openai-version": b"openai-version",
    b"x-request-id": UPSTREAM_REQUEST_ID,
    b"request-id": UPSTREAM_REQUEST_ID,
}
RATELIMIT_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-")
# The first byte of every name above, in either case: a one-byte slice is a cached object.
_FIRST_BYTES = frozenset({b"r", b"R", b"x", b"X", b"o", b"O", b"a", b"A"})
RENAMED_RATELIMIT_PREFIX = b"x-upstream-ratelimit-"
# A misbehaving upstream must not make us copy an unbounded number of headers.
MAX_PASSED_HEADERS = 32
MAX_HEADER_VALUE_BYTES = 256


def passthrough(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's raw headers (aiohttp's `raw_headers`) a client gets, as ASGI header
    pairs under the names it gets them: one pass, one dict probe per header, a prefix test
    only for names the dict does not know."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in raw:
        if name[:1] not in _FIRST_BYTES:  # most headers (content-*, date, server) stop here
            continue
        lower = name.lower()
        renamed = RENAMED.get(lower)
        if renamed is None:
            if not lower.startswith(RATELIMIT_PREFIXES):
                continue
            renamed = RENAMED_RATELIMIT_PREFIX + lower[lower.index(b"ratelimit-") + 10 :]
        if len(value) > MAX_HEADER_VALUE_BYTES:
            continue  # (aiohttp has refused line breaks in a value already)
        out.append((renamed, value))
        if len(out) >= MAX_PASSED_HEADERS:
            break
    return out


# The client's request headers a `kind: anthropic` producer gets on a passed-through Messages
# request (an allow-list): the betas it asks for (`anthropic-beta`, comma-separated) and the
# API version its SDK speaks. Nothing else of the client's reaches an upstream.
FORWARDED_TO_ANTHROPIC = ("anthropic-beta", "anthropic-version")
MAX_FORWARDED_VALUE_BYTES = 1024  # a long list of betas fits; a runaway value does not


def anthropic_forwarded(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The allowed client headers to send on to an Anthropic producer; None when none."""
    out: dict[str, str] | None = None
    for name in FORWARDED_TO_ANTHROPIC:
        value = headers.get(name)
        if value and len(value) <= MAX_FORWARDED_VALUE_BYTES:
            if out is None:
                out = {}
            out[name] = value
    return out


def as_dict(pairs: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The pairs as a header dict of text (a repeated name keeps its first value)."""
    out: dict[str, str] = {}
    for name, value in pairs:
        out.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return out
