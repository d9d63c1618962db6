"""Holds bound what a request's bytes do not show: an image, audio, a file or a server-side
tool is held for the model's context window, so an upstream that bills many more input tokens
than the body's bytes is charged in full; only an upstream past that is clamped, and the
operator sees the loss per key and model."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import Sim, both_stores

pytestmark = both_stores

MODELS = """\
models:
  - name: vision
    context_window_tokens: 50000
    deployments:
      - {producer: a, model: sim-small}
"""
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/grid.png"}}


def ask(gw: Any, secret: str, content: Any) -> httpx.Response:
    body = {
        "model": "vision",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 5,
        # The upstream bills 1,000 times the prompt's text tokens, as an image would add.
        "sim_fault": "overcount",
    }
    auth = {"Authorization": f"Bearer {secret}"}
    return httpx.post(f"{gw.v1}/chat/completions", json=body, headers=auth, timeout=30)


def test_an_image_request_is_held_for_the_context_window_and_charged_in_full(
    make_gateway: Any, sims: tuple[Sim, Sim]
) -> None:
    a, _ = sims
    with make_gateway({"a": a.url}, MODELS) as gw:
        _, key = gw.funded_key(1_000_000_000)
        text = [{"type": "text", "text": "What does this grid chart show?"}]
        served = ask(gw, key["key"], [*text, IMAGE])
        assert served.status_code == 200, served.text
        usage = served.json()["usage"]
        price = usage["prompt_tokens"] * 1_000 + usage["completion_tokens"] * 2_000
        assert usage["prompt_tokens"] > 1_000  # far more than the body's bytes
        assert served.headers["x-tokenworks-price"] == usage["cost"]
        [record] = gw.records()
        assert record.price_nano == price and record.clamped_nano == 0
        # The same text without the image is held for its bytes: the overcount is clamped,
        # and the loss is on the record and in the metrics, by key and model.
        clamped = ask(gw, key["key"], text)
        assert clamped.status_code == 200
        loss = next(r for r in gw.records(expect=2) if r.request_id != record.request_id)
        assert loss.clamped_nano > 0
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert f'tokenworks_clamped_requests_total{{key="{key["id"]}",model="vision"}} 1.0' in (
            metrics
        )
