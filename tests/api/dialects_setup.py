"""A gateway with producers of every wire format, on simulated upstreams (for the dialect
tests): `native` speaks chat, Messages and Responses; `chatonly` chat completions only;
`claude` is a `kind: anthropic` producer (Messages only); `dead` speaks Messages and is down."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import ADMIN_KEY, Gateway, Sim, running_gateway

# 1.00 in, 2.00 out, 0.10 cache read, 1.25 cache write per million tokens: nano per token.
COST = (
    '{input_per_mtok: "1.00", output_per_mtok: "2.00", cached_input_per_mtok: "0.10",'
    ' cache_write_per_mtok: "1.25"}'
)
IN_NANO, OUT_NANO, READ_NANO, WRITE_NANO = 1000, 2000, 100, 1250


def config(database: str | Path, a: Sim, b: Sim) -> str:
    url = database if isinstance(database, str) else f"sqlite:///{database}"
    return f"""\
database: {url}
admin_key: {ADMIN_KEY}
producers:
  - {{name: native, base_url: "{a.url}/v1", timeout_s: 5, formats: [chat, messages, responses]}}
  - {{name: chatonly, base_url: "{b.url}/v1", timeout_s: 5, formats: [chat]}}
  - {{name: claude, kind: anthropic, base_url: "{a.url}/v1", timeout_s: 5}}
  - {{name: dead, base_url: "http://127.0.0.1:9/v1", timeout_s: 2, formats: [messages]}}
  - {{name: native2, base_url: "{b.url}/v1", timeout_s: 5, formats: [chat, responses]}}
models:
  - name: m-native
    deployments: [{{producer: native, model: sim-small, cost: {COST}}}]
  - name: m-chat
    deployments: [{{producer: chatonly, model: sim-small, cost: {COST}}}]
  - name: m-claude
    deployments: [{{producer: claude, model: sim-small, cost: {COST}}}]
  - name: m-reason
    deployments: [{{producer: chatonly, model: sim-reasoner, cost: {COST}}}]
  - name: m-two
    deployments:
      - {{producer: native, model: sim-small, cost: {COST}}}
      - {{producer: native2, model: sim-small, cost: {COST}}}
  - name: m-failover
    deployments:
      - {{producer: dead, model: sim-small, cost: {COST}}}
      - {{producer: chatonly, model: sim-small, cost: {COST}}}
"""


@contextlib.contextmanager
def dialect_gateway(database: str, a: Sim, b: Sim) -> Iterator[Gateway]:
    with running_gateway(config(database, a, b), database) as gw:
        yield gw


def cost_nano(usage: object) -> int:
    """What the test cost book charges for a usage record's counts."""
    fresh = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens  # type: ignore[attr-defined]
    return (
        fresh * IN_NANO
        + usage.cached_input_tokens * READ_NANO  # type: ignore[attr-defined]
        + usage.cache_write_tokens * WRITE_NANO  # type: ignore[attr-defined]
        + usage.output_tokens * OUT_NANO  # type: ignore[attr-defined]
    )
