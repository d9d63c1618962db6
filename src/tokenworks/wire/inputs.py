"""What in a request makes an upstream read more tokens than the request's bytes show.

The gateway bounds a request's input by its size in bytes (a token is at least one byte). That
holds for text, not for what the upstream expands on its side: an image URL becomes hundreds
to thousands of tokens, an audio clip or a file more, a server-side tool (web search, file
search, code interpreter) reads its results into the context, and a stored conversation
(`previous_response_id`) is read again. For these the hold must assume the model's context
window (`dispatch.billing.input_bound`); `unseen_input` finds them, in every dialect's shape
(chat `messages`, Responses `input`, Anthropic Messages content blocks and tools).
"""

from __future__ import annotations

from typing import Any

# Content part / input item types whose tokens the upstream makes from something the body
# only points at or encodes (OpenAI chat, Responses, Anthropic Messages, vLLM's video).
MEDIA_TYPES = frozenset(
    {
        "image_url",
        "input_audio",
        "file",
        "input_image",
        "input_file",
        "image",
        "document",
        "audio",
        "audio_url",
        "video_url",
        "video",
    }
)
# Tools the client runs itself: their definitions are in the body, their results come back
# in a later request's body. Any other typed tool runs at the provider (web_search,
# file_search, code_interpreter, mcp, Anthropic's web_search_20250305, ...).
CLIENT_TOOL_TYPES = frozenset({"function", "custom"})
# Top-level fields that make the provider read more than the body: OpenAI's chat web search,
# OpenRouter's plugins (its web plugin), a stored conversation the provider replays.
EXPANDING_FIELDS = frozenset(
    {"web_search_options", "plugins", "previous_response_id", "conversation"}
)
# Bounded scan: a request with more items than this is assumed to hold media (it is huge
# anyway, and the context-window bound is the safe side).
MAX_SCANNED_ITEMS = 4096


def unseen_input(payload: dict[str, Any]) -> str | None:
    """The first thing in `payload` whose tokens its bytes do not bound, named (a field, a
    tool type, a content type); None for a request of text and client tools only."""
    if not EXPANDING_FIELDS.isdisjoint(payload):  # one C-level pass over the body's keys
        for name in sorted(EXPANDING_FIELDS & payload.keys()):
            if payload[name] is not None:
                return name
    tools = payload.get("tools")
    if isinstance(tools, list):
        for tool in tools[:MAX_SCANNED_ITEMS]:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind is not None and kind not in CLIENT_TOOL_TYPES:
                return f"tools[].type {kind}"
    items = payload.get("messages")
    if items is None:
        items = payload.get("input")  # Responses items; embeddings' strings are skipped
    if type(items) is list and items and type(items[0]) is dict:
        return _media_in(items)
    return None


def _media_in(items: list[Any]) -> str | None:
    if len(items) > MAX_SCANNED_ITEMS:
        return "more items than the gateway inspects"
    parts_left = MAX_SCANNED_ITEMS
    for item in items:
        if type(item) is not dict:
            continue
        content = item.get("content")
        if type(content) is str:
            continue  # the common text message: one probe, one type test
        kind = item.get("type")
        if kind in MEDIA_TYPES:
            return f"{kind} input"
        if type(content) is not list:
            continue
        parts_left -= len(content)
        if parts_left < 0:
            return "more items than the gateway inspects"
        for part in content:
            if type(part) is not dict:
                continue
            kind = part.get("type")
            if kind in MEDIA_TYPES:
                return f"{kind} input"
            # Anthropic tool results may carry images in their own content list.
            inner = part.get("content")
            if type(inner) is list:
                for block in inner[:MAX_SCANNED_ITEMS]:
                    if isinstance(block, dict) and block.get("type") in MEDIA_TYPES:
                        return f"{block['type']} input"
    return None
