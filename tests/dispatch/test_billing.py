"""The output bound a request is held for: the model's limit per choice, times every choice
and every prompt an upstream answers (and bills)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tokenworks.dispatch.billing import ModelBounds, input_bound, output_bound
from tokenworks.dispatch.relay import Call

BOUNDS = ModelBounds(max_output_tokens=100, context_window_tokens=1_000)


def call_of(endpoint: str, payload: dict[str, Any]) -> Call:
    route: Any = SimpleNamespace(model=SimpleNamespace(name="m"))
    key: Any = SimpleNamespace(id="k", account_id=None)
    return Call(endpoint, payload, key, route, stream=False, client_wants_usage=False, tags={})


@pytest.mark.parametrize(
    ("endpoint", "payload", "output_tokens", "choices"),
    [
        ("chat", {"max_tokens": 10}, 10, 1),
        ("chat", {}, 100, 1),  # no limit asked: the model's
        ("chat", {"max_tokens": 10, "max_completion_tokens": 20}, 20, 1),  # the larger
        ("chat", {"max_tokens": 10, "n": 3}, 30, 3),
        ("completions", {"prompt": "a", "max_tokens": 10, "n": 2, "best_of": 5}, 50, 5),
        ("completions", {"prompt": "a", "max_tokens": 10, "n": 4, "best_of": 2}, 40, 4),
        ("completions", {"prompt": ["a", "b", "c"], "max_tokens": 10, "n": 2}, 60, 6),
        ("completions", {"prompt": [1, 2, 3], "max_tokens": 10}, 10, 1),  # one tokenised
        ("completions", {"prompt": [[1, 2], [3]], "max_tokens": 10}, 20, 2),
        ("completions", {"prompt": [], "max_tokens": 10}, 10, 1),
        ("chat", {"max_tokens": 10, "n": True}, 10, 1),  # a bool is not a count
        ("chat", {"max_tokens": True, "n": 0}, 100, 1),
        ("embeddings", {"input": ["a", "b"], "max_tokens": 10}, 0, 2),  # no output
    ],
)
def test_output_bound_covers_every_prompt_and_choice(
    endpoint: str, payload: dict[str, Any], output_tokens: int, choices: int
) -> None:
    call = call_of(endpoint, payload)
    assert output_bound(call, BOUNDS) == output_tokens
    assert call.usage_limit_tokens == BOUNDS.context_window_tokens * choices


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_an_output_limit_past_the_models_is_the_clients_error(name: str) -> None:
    call = call_of("chat", {name: 101, "n": 2})
    with pytest.raises(Exception, match=f"'{name}' is 101, but model 'm' produces at most 100"):
        output_bound(call, BOUNDS)
    assert output_bound(call_of("chat", {name: 100, "n": 2}), BOUNDS) == 200


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}


@pytest.mark.parametrize(
    ("endpoint", "payload", "body_bytes", "input_tokens"),
    [
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, 300, 300),  # its bytes
        # an image: the model's context window, whatever the bytes (a URL is short)
        ("chat", {"messages": [{"role": "user", "content": [IMAGE]}]}, 300, 1_000),
        # a base64 image is long, but a prompt still holds at most the context window
        ("chat", {"messages": [{"role": "user", "content": [IMAGE]}]}, 90_000, 1_000),
        ("chat", {"messages": [], "web_search_options": {}}, 300, 1_000),
        ("completions", {"prompt": ["a", "b"], "plugins": [{"id": "web"}]}, 300, 2_000),
    ],
)
def test_input_bound_is_the_context_window_for_what_the_bytes_do_not_show(
    endpoint: str, payload: dict[str, Any], body_bytes: int, input_tokens: int
) -> None:
    call = call_of(endpoint, payload)
    call.body_bytes = body_bytes
    assert input_bound(call, BOUNDS) == input_tokens
