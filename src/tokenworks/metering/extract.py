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


def usage_from_openai(raw: Any) -> Usage | None:
    """Usage from an OpenAI-style `usage` object; None when there is none to read."""
    if not isinstance(raw, dict):
        return None
    prompt = _int(raw.get("prompt_tokens", raw.get("input_tokens")))
    completion = _int(raw.get("completion_tokens", raw.get("output_tokens")))
    prompt_details = raw.get("prompt_tokens_details") or raw.get("input_tokens_details") or {}
    completion_details = (
        raw.get("completion_tokens_details") or raw.get("output_tokens_details") or {}
    )
    cached = _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
    cached = cached or _int(raw.get("prompt_cache_hit_tokens"))
    cache_write = _int(raw.get("cache_creation_input_tokens"))
    reasoning = (
        _int(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else 0
    )
    # Keep the parts within the whole even when an upstream reports inconsistent numbers.
    cached = min(cached, prompt)
    cache_write = min(cache_write, prompt - cached)
    reasoning = min(reasoning, completion)
    return Usage(
        input_tokens=prompt,
        cached_input_tokens=cached,
        cache_write_tokens=cache_write,
        output_tokens=completion,
        reasoning_tokens=reasoning,
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
