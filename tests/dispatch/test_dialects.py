"""Which format each route goes upstream in, by what the producer speaks (config defaults
and overrides), and the config errors for formats."""

from __future__ import annotations

import pytest

from tokenworks.config import ConfigError, default_formats, loads
from tokenworks.dispatch.dialects import ResponseIndex, upstream_formats


def test_default_formats_by_kind_and_url() -> None:
    assert default_formats("anthropic", "https://api.anthropic.com/v1") == ("messages",)
    assert default_formats("openai", "https://api.openai.com/v1") == ("chat", "responses")
    assert default_formats("openai", "https://api.openai.com.evil.example/v1") == ("chat",)
    assert default_formats("openai", "http://127.0.0.1:8000/v1") == ("chat",)


def test_each_route_passes_through_where_it_can_and_translates_where_it_must() -> None:
    everything = upstream_formats(("chat", "messages", "responses"))
    assert everything == {
        "chat": "chat", "completions": "completions", "embeddings": "embeddings",
        "messages": "messages", "responses": "responses",
    }  # fmt: skip
    chat_only = upstream_formats(("chat",))
    assert chat_only["messages"] == "chat" and chat_only["responses"] == "chat"
    claude = upstream_formats(("messages",))
    assert claude == {
        "chat": "messages", "completions": None, "embeddings": None,
        "messages": "messages", "responses": "messages",
    }  # fmt: skip
    assert upstream_formats(("responses",))["messages"] is None


@pytest.mark.parametrize(
    ("formats", "error"), [("[]", "at least one"), ("[chat, grpc]", "grpc"), ('"chat"', "array")]
)
def test_bad_formats_are_refused_at_start(formats: str, error: str) -> None:
    text = (
        "database: sqlite:///x.db\nproducers:\n"
        f"  - {{name: a, base_url: 'http://x/v1', formats: {formats}}}\n"
    )
    with pytest.raises(ConfigError, match=error):
        loads(text, "t.yaml", check_prices=False)


def test_the_stored_response_index_is_bounded_and_per_key() -> None:
    index = ResponseIndex(max_entries=3)
    for n in range(5):
        index.add("k1", f"resp_{n}", "p", "public", "upstream")
    assert index.get("k1", "resp_0") is None and index.get("k1", "resp_1") is None
    assert index.get("k1", "resp_4") == ("p", "public", "upstream")
    assert index.get("k2", "resp_4") is None
    index.remove("k1", "resp_4")
    assert index.get("k1", "resp_4") is None
