"""Usage as upstreams report it, and our estimate when they do not.

OpenAI puts cache hits in `prompt_tokens_details.cached_tokens`; DeepSeek reports
`prompt_cache_hit_tokens` instead; Anthropic-style proxies add `cache_creation_input_tokens`.
All of them land in one `Usage`.

A count that is negative, not a whole number, or not a number at all is the upstream's error,
not a figure to bill: `usage_from_openai` raises `ImplausibleUsage` and the relay charges its
offline estimate instead (and counts the upstream error). So is a count of zero where there
must be tokens (`zero_count_problem`): input for a request with a prompt, output for an answer
with text.

Where usage sits in an answer (`usage`, else Groq's `x_groq.usage`) is wire knowledge:
`wire.openai.reported_usage`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tokenworks.metering import tokens
from tokenworks.metering.usage import Usage


class ImplausibleUsage(ValueError):
    """An upstream's usage object with a count no upstream can mean (negative, fractional,
    not a number); the message names the field."""


def _int(value: Any, name: str) -> int:
    if type(value) is int and value >= 0:  # the common case first: one type check, one compare
        return value
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)  # 12.0: a whole count written as a float
    raise ImplausibleUsage(f"upstream usage {name}={value!r} is not a token count")


def _get(mapping: Any, *path: str) -> int:
    for key in path:
        if not isinstance(mapping, dict):
            return 0
        mapping = mapping.get(key)
    return _int(mapping, ".".join(path))


_COUNT_KEYS = ("prompt_tokens", "input_tokens", "completion_tokens", "output_tokens")


def usage_from_openai(raw: Any, limit_tokens: int | None = None) -> Usage | None:
    """Usage from an OpenAI-style `usage` object; None when there is none to read (not an
    object, or an object with neither an input nor an output count: billing it would charge 0).
    Raises `ImplausibleUsage` for a count that is not a whole number >= 0, or an input or
    output count above `limit_tokens` (what the request could possibly have used).

    genai-prices' own DeepSeek reader ignores `prompt_cache_hit_tokens`, which would price a
    cached prompt as uncached (up to ~50x on that part); we read the providers' native fields.
    """
    if not isinstance(raw, dict):
        return None
    if not any(k in raw for k in _COUNT_KEYS):
        return None
    prompt = _get(raw, "prompt_tokens") or _get(raw, "input_tokens")
    completion = _get(raw, "completion_tokens") or _get(raw, "output_tokens")
    cached = (
        _get(raw, "prompt_tokens_details", "cached_tokens")
        or _get(raw, "input_tokens_details", "cached_tokens")
        or _get(raw, "prompt_cache_hit_tokens")  # DeepSeek
        or _get(raw, "cached_tokens")  # Moonshot / Kimi
    )
    cache_write = _get(raw, "prompt_tokens_details", "cache_write_tokens") or _get(
        raw, "cache_creation_input_tokens"
    )
    cache_write_1h = _get(raw, "cache_creation", "ephemeral_1h_input_tokens")
    reasoning = _get(raw, "completion_tokens_details", "reasoning_tokens") or _get(
        raw, "output_tokens_details", "reasoning_tokens"
    )
    if limit_tokens is not None and (prompt > limit_tokens or completion > limit_tokens):
        raise ImplausibleUsage(
            f"upstream usage of {prompt} input / {completion} output tokens exceeds the"
            f" {limit_tokens} this request can use"
        )
    # Keep the parts within the whole even when an upstream reports inconsistent numbers.
    cached = min(cached, prompt)
    cache_write = min(cache_write, prompt - cached)
    return Usage(
        input_tokens=prompt,
        cached_input_tokens=cached,
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=min(cache_write_1h, cache_write),
        output_tokens=completion,
        reasoning_tokens=min(reasoning, completion),
        estimated=False,
    )


def zero_count_problem(
    usage: Usage, endpoint: str, payload: dict[str, Any], texts: list[str]
) -> str | None:
    """Why a usage's zero count cannot be right, or None: a request with a prompt has input
    tokens (a chat message is framed in tokens even when empty), and an answer with text has
    output tokens. Callers test `usage.input_tokens and usage.output_tokens` first, so a
    plausible usage costs nothing here."""
    if usage.input_tokens == 0 and _has_prompt(endpoint, payload):
        return "upstream usage reports 0 input tokens for a request with a prompt"
    if usage.output_tokens == 0 and any(texts):
        return "upstream usage reports 0 output tokens for an answer with text"
    return None


def _has_prompt(endpoint: str, payload: dict[str, Any]) -> bool:
    if endpoint == "chat" or endpoint == "messages":
        messages = payload.get("messages")
        return isinstance(messages, list) and bool(messages)
    value = payload.get("prompt" if endpoint == "completions" else "input")
    if isinstance(value, list):
        return any(value)  # a token id 0 alone would be falsy: rare, and then we believe it
    return bool(value)


def estimate_input(endpoint: str, payload: dict[str, Any], encoding: str) -> int:
    """Prompt tokens of a request body, counted offline."""
    if endpoint == "chat":
        messages = payload.get("messages")
        return tokens.count_messages(messages, encoding) if isinstance(messages, list) else 0
    if endpoint in ("messages", "responses"):
        # Their content blocks and items nest; their JSON text counts every word of them
        # (and a few tokens of syntax, which errs on the side of the producer's bill).
        parts = [payload.get(name) for name in ("system", "messages", "instructions", "input")]
        return tokens.count_text(_json_text([p for p in parts if p]), encoding)
    field = "prompt" if endpoint == "completions" else "input"
    value = payload.get(field)
    if isinstance(value, str):
        return tokens.count_text(value, encoding)
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):  # a pre-tokenised prompt
            return len(value)
        total = 0
        for item in value:
            if isinstance(item, str):
                total += tokens.count_text(item, encoding)
            elif isinstance(item, list):
                total += len(item)
        return total
    return 0


def _json_text(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def estimate_output(texts: list[str], encoding: str) -> int:
    return tokens.count_text("".join(texts), encoding) if texts else 0
