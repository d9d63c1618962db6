"""Usage as upstreams report it, and our estimate when they do not.

OpenAI puts cache hits in `prompt_tokens_details.cached_tokens`; DeepSeek reports
`prompt_cache_hit_tokens` instead; Anthropic-style proxies add `cache_creation_input_tokens`.
All of them land in one `Usage`.
"""

from __future__ import annotations

from typing import Any

from tokenworks.metering import tokens
from tokenworks.metering.usage import Usage


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _get(mapping: Any, *path: str) -> int:
    for key in path:
        if not isinstance(mapping, dict):
            return 0
        mapping = mapping.get(key)
    return _int(mapping)


def usage_from_openai(raw: Any) -> Usage | None:
    """Usage from an OpenAI-style `usage` object; None when there is none to read.

    genai-prices' own DeepSeek reader ignores `prompt_cache_hit_tokens`, which would price a
    cached prompt as uncached (up to ~50x on that part); we read the providers' native fields.
    """
    if not isinstance(raw, dict):
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


def estimate_input(endpoint: str, payload: dict[str, Any], encoding: str) -> int:
    """Prompt tokens of a request body, counted offline."""
    if endpoint == "chat":
        messages = payload.get("messages")
        return tokens.count_messages(messages, encoding) if isinstance(messages, list) else 0
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


def estimate_output(texts: list[str], encoding: str) -> int:
    return tokens.count_text("".join(texts), encoding) if texts else 0
