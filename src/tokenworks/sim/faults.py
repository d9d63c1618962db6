"""The sim's billing faults: answers whose usage, choices or tier an upstream should never send.

They rewrite a finished answer (a JSON body, or one SSE event of a stream) rather than build it,
so the sim's fast byte templates stay untouched; only a request that drew one of these faults
pays for a decode and an encode.
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
REWRITING_FAULTS: frozenset[str] = USAGE_FAULTS | {"choice_flood", "wrong_tier"}
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
