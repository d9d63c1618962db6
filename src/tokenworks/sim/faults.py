"""The sim's billing faults: answers whose usage, choices or tier an upstream should never send.

They rewrite a finished answer (a JSON body, or one SSE event of a stream) rather than build it,
so the sim's fast byte templates stay untouched; only a request that drew one of these faults
pays for a decode and an encode.

Also the provider behaviours a faithful gateway must pass on: error answers as real providers
send them (`UPSTREAM_ERRORS`: OpenAI's and Groq's bodies, with their headers), provider headers
on a success (`PROVIDER_HEADERS`), OpenRouter's own `usage.cost`, and CRLF-framed streams with
comments (`crlf_framed`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from tokenworks.sim.profile import (
    FLOOD_CHOICES,
    HUGE_COMPLETION_TOKENS,
    HUGE_PROMPT_TOKENS,
    USAGE_FAULTS,
)

# Faults served by rewriting the answer's JSON.
REWRITING_FAULTS: frozenset[str] = USAGE_FAULTS | {"choice_flood", "wrong_tier", "upstream_cost"}
# What OpenRouter puts in `usage.cost` for the `upstream_cost` fault (credits, a JSON number).
UPSTREAM_COST = 0.000123

# The headers a provider sends with an answer or an error (OpenAI's names): the request id,
# processing time and rate-limit state of the gateway's account, plus two that describe the
# gateway's account or connection and must never reach a client.
PROVIDER_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"openai-processing-ms", b"7"),
    (b"openai-organization", b"org-gateway-owner"),
    (b"x-ratelimit-limit-requests", b"500"),
    (b"x-ratelimit-remaining-requests", b"499"),
    (b"x-ratelimit-reset-requests", b"120ms"),
    (b"set-cookie", b"__cf_bm=secret; path=/"),
)

# Error answers as providers send them: status, body (`{model}`: the model asked for) and the
# headers beyond PROVIDER_HEADERS. OpenAI's shapes are from its API reference and recorded
# answers (tests/wire/fixtures/openai_error_400.yaml); Groq's `failed_generation` from its docs.
UPSTREAM_ERRORS: dict[str, tuple[int, dict[str, Any], tuple[tuple[bytes, bytes], ...]]] = {
    "unsupported_parameter": (
        400,
        {
            "error": {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this "
                "model. Use 'max_completion_tokens' instead.",
                "type": "invalid_request_error",
                "param": "max_tokens",
                "code": "unsupported_parameter",
            }
        },
        (),
    ),
    "model_not_found": (
        404,
        {
            "error": {
                "message": "The model `{model}` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
        },
        (),
    ),
    "failed_generation": (
        400,
        {
            "error": {
                "message": "Failed to call a function. Please adjust your prompt. See "
                "'failed_generation' for more details.",
                "type": "invalid_request_error",
                "code": "tool_use_failed",
                "failed_generation": '<function=get_weather>{"city": "Paris"}</function>',
            }
        },
        (),
    ),
    "bad_credentials": (
        401,
        {
            "error": {
                "message": "Incorrect API key provided: sk-gatew***********wner.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        },
        (),
    ),
    "forbidden": (
        403,
        {
            "error": {
                "message": "Country, region, or territory not supported",
                "type": "request_forbidden",
                "param": None,
                "code": "unsupported_country_region_territory",
            }
        },
        (),
    ),
    "rate_limited": (
        429,
        {
            "error": {
                "message": "Rate limit reached for {model} on requests per min (RPM): "
                "Limit 500, Used 500, Requested 1. Please try again in 200ms.",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        },
        ((b"retry-after", b"1"), (b"retry-after-ms", b"200")),
    ),
}
_COUNT_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _usage(kind: str, usage: dict[str, Any]) -> dict[str, Any]:
    out = dict(usage)
    if kind == "huge_usage":
        out["prompt_tokens"] = HUGE_PROMPT_TOKENS
        if "completion_tokens" in out:
            out["completion_tokens"] = HUGE_COMPLETION_TOKENS
        out["total_tokens"] = out["prompt_tokens"] + out.get("completion_tokens", 0)
    elif kind == "negative_usage":
        for name in _COUNT_FIELDS:
            if name in out:
                out[name] = -max(1, out[name])
    elif kind == "float_usage":
        for name in _COUNT_FIELDS:
            if name in out:
                out[name] = out[name] + 0.5
    elif kind == "string_usage":
        for name in _COUNT_FIELDS:
            if name in out:
                out[name] = str(out[name])
    elif kind == "zero_usage":
        out = {name: 0 for name in _COUNT_FIELDS if name in out}
    elif kind == "choice_flood" and "completion_tokens" in out:
        out["completion_tokens"] *= FLOOD_CHOICES
        out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out


def rewrite(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """One answer object (a body or a stream chunk) as the fault `kind` serves it."""
    out = dict(obj)
    usage = out.get("usage")
    if isinstance(usage, dict):
        if kind == "usage_elsewhere":
            del out["usage"]
            out["x_usage"] = usage
        else:
            out["usage"] = _usage(kind, usage)
    if kind == "choice_flood" and out.get("choices"):
        first = out["choices"][0]
        out["choices"] = [{**first, "index": i} for i in range(FLOOD_CHOICES)]
    if kind == "wrong_tier" and "service_tier" in out:
        out["service_tier"] = "priority"
    if kind == "upstream_cost" and isinstance(out.get("usage"), dict):
        out["usage"] = {**out["usage"], "cost": UPSTREAM_COST, "is_byok": False}
    return out


def rewrite_body(kind: str, body: bytes) -> bytes:
    return msgspec.json.encode(rewrite(kind, msgspec.json.decode(body)))


def rewrite_event(kind: str, event: bytes) -> bytes:
    """One `data: {...}\\n\\n` SSE event (or several back to back) rewritten; others as they are."""
    out: list[bytes] = []
    for part in event.split(b"\n\n"):
        if part.startswith(b"data: {"):
            part = b"data: " + msgspec.json.encode(rewrite(kind, msgspec.json.decode(part[6:])))
        if part:
            out.append(part + b"\n\n")
    return b"".join(out)


def error_reply(
    kind: str, model: str, request_id: str
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """The `UPSTREAM_ERRORS` answer `kind` for `model`: (status, body, headers)."""
    status, body, extra = UPSTREAM_ERRORS[kind]
    error = dict(body["error"])
    error["message"] = error["message"].replace("{model}", model)
    headers = [(b"x-request-id", request_id.encode()), *PROVIDER_HEADERS, *extra]
    return status, msgspec.json.encode({"error": error}), headers


# A comment OpenRouter sends while it waits for its upstream; the `crlf` fault opens with it.
SSE_COMMENT = b": OPENROUTER PROCESSING\r\n\r\n"


def crlf_framed(events: bytes) -> bytes:
    """SSE events in CRLF line ends (the JSON on data lines holds no raw newline)."""
    return events.replace(b"\n", b"\r\n")
