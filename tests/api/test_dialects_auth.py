"""Upstream authentication by producer kind: Bearer for `kind: openai`, `x-api-key` and
`anthropic-version` for `kind: anthropic`, against simulated producers that require a key."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from tests.conftest import ADMIN_KEY, running_gateway
from tokenworks.server import serve_in_thread
from tokenworks.sim import build_app as build_sim
from tokenworks.sim import get_profile


def test_each_kind_authenticates_upstream_its_own_way(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIM_KEY", "sk-upstream")
    profile = dataclasses.replace(get_profile("instant"), api_key="sk-upstream")
    app = build_sim(profile)
    seen: list[dict[str, str]] = []
    inner = app._http

    async def spy(scope, receive, send):  # type: ignore[no-untyped-def]
        seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await inner(scope, receive, send)

    app._http = spy  # type: ignore[method-assign]
    with serve_in_thread(app) as url:
        config = f"""\
database: {database}
admin_key: {ADMIN_KEY}
producers:
  - {{name: claude, kind: anthropic, base_url: "{url}/v1", api_key_env: SIM_KEY}}
  - {{name: oai, base_url: "{url}/v1", api_key_env: SIM_KEY}}
  - {{name: wrong, kind: anthropic, base_url: "{url}/v1"}}
models:
  - name: claude
    deployments: [{{producer: claude, model: sim-small, cost: {{input_per_mtok: "1", output_per_mtok: "2"}}}}]
  - name: oai
    deployments: [{{producer: oai, model: sim-small, cost: {{input_per_mtok: "1", output_per_mtok: "2"}}}}]
  - name: keyless
    deployments: [{{producer: wrong, model: sim-small, cost: {{input_per_mtok: "1", output_per_mtok: "2"}}}}]
"""
        with running_gateway(config, database) as gw:
            key = gw.create_key()["key"]
            body = {"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
            auth = {"x-api-key": key}
            for model in ("claude", "oai"):
                r = httpx.post(f"{gw.v1}/messages", headers=auth, json={**body, "model": model})
                assert r.status_code == 200, r.text
            claude, oai = seen[-2], seen[-1]
            assert claude["x-api-key"] == "sk-upstream" and "authorization" not in claude
            assert claude["anthropic-version"] == "2023-06-01"
            assert oai["authorization"] == "Bearer sk-upstream" and "x-api-key" not in oai
            # Without its key the producer refuses; the client gets an Anthropic-shaped error.
            r = httpx.post(f"{gw.v1}/messages", headers=auth, json={**body, "model": "keyless"})
            assert r.status_code != 200 and r.json()["type"] == "error"
