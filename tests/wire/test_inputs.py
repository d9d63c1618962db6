"""What makes an upstream read more than a request's bytes show, in every dialect's shape."""

from __future__ import annotations

from typing import Any

import pytest

from tokenworks.wire.inputs import MAX_SCANNED_ITEMS, unseen_input

TEXT = [{"role": "user", "content": "hello"}]
IMAGE_URL = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


@pytest.mark.parametrize(
    ("payload", "found"),
    [
        ({"messages": TEXT}, None),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, None),
        ({"messages": TEXT, "tools": [{"type": "function", "function": {"name": "f"}}]}, None),
        ({"messages": TEXT, "tools": [{"name": "f", "input_schema": {}}]}, None),  # Anthropic
        ({"prompt": "a completion", "max_tokens": 3}, None),
        ({"input": ["embed me"]}, None),
        # chat: an image, audio, a file
        ({"messages": [{"role": "user", "content": [IMAGE_URL]}]}, "image_url input"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "input_audio input",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "file"}]}]}, "file input"),
        # server-side tools and fields
        ({"messages": TEXT, "web_search_options": {}}, "web_search_options"),
        ({"messages": TEXT, "plugins": [{"id": "web"}]}, "plugins"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[].type web_search"),
        (
            {"messages": TEXT, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "tools[].type web_search_20250305",
        ),
        ({"input": "again", "previous_response_id": "resp_1"}, "previous_response_id"),
        # Responses input items and parts; Anthropic blocks and images inside tool results
        ({"input": [{"type": "input_image", "image_url": "data:..."}]}, "input_image input"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input_file input",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "document input",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "content": [{"type": "image", "source": {}}]}
                        ],
                    }
                ]
            },
            "image input",
        ),
    ],
)
def test_unseen_input_finds_what_the_bytes_do_not_bound(
    payload: dict[str, Any], found: str | None
) -> None:
    assert unseen_input(payload) == found


def test_a_request_past_the_scan_bound_counts_as_unseen() -> None:
    many = [{"role": "user", "content": [{"type": "text", "text": "x"}]}] * (MAX_SCANNED_ITEMS + 1)
    assert unseen_input({"messages": many}) == "more items than the gateway inspects"
