"""The gateway end to end: the official openai SDK against tokenworks against upstream-sim."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, Gateway, Sim, both_stores

CHAT = [{"role": "user", "content": "Tell me about the power grid."}]


def client(gw: Gateway, secret: str, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=secret, max_retries=0, **kwargs)


@both_stores
def test_chat_plain_returns_the_upstream_answer_under_the_public_name(
    gateway: Gateway, sims: tuple[Sim, Sim]
) -> None:
    key = gateway.create_key()
    raw = client(gateway, key["key"]).chat.completions.with_raw_response.create(
        model="chat-fast", messages=CHAT, max_tokens=12
    )
    reply = raw.parse()
    assert reply.model == "chat-fast"
    assert reply.usage.completion_tokens == 12
    assert reply.choices[0].message.content
    assert raw.headers["x-request-id"].startswith("req_")
    # Served by the first deployment; nothing went to the second.
    a, b = sims
    assert a.stats()["completed"] >= 1
    assert b.stats()["completed"] == 0
    [record] = gateway.records()
    assert record.producer == "a" and record.upstream_model == "sim-small"
    assert record.usage.output_tokens == 12
    assert record.usage.input_tokens == reply.usage.prompt_tokens
    assert record.usage.estimated is False
    assert record.status == 200 and record.key_id == key["id"]


@both_stores
def test_stream_with_usage_passes_chunks_and_the_usage_chunk(gateway: Gateway) -> None:
    key = gateway.create_key()
    stream = client(gateway, key["key"]).chat.completions.create(
        model="chat-fast",
        messages=CHAT,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.model == "chat-fast" for c in chunks)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 20  # the sim sends one token per content delta
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    [record] = gateway.records()
    assert record.streamed and record.usage.output_tokens == 20
    assert record.ttft_ms is not None and record.ttft_ms <= record.latency_ms


def test_stream_without_usage_hides_the_usage_chunk_but_meters_it(gateway: Gateway) -> None:
    key = gateway.create_key()
    with httpx.stream(
        "POST",
        f"{gateway.v1}/chat/completions",
        headers={"Authorization": f"Bearer {key['key']}"},
        json={"model": "chat-fast", "messages": CHAT, "max_tokens": 7, "stream": True},
    ) as r:
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all("usage" not in c for c in chunks), "client did not ask for usage"
    assert all(c["choices"] for c in chunks)
    assert '"model":"chat-fast"' in body and "sim-small" not in body
    [record] = gateway.records()
    assert record.usage.output_tokens == 7 and not record.usage.estimated


def test_completions_and_embeddings_and_models(gateway: Gateway) -> None:
    key = gateway.create_key()
    c = client(gateway, key["key"])
    text = c.completions.create(model="chat-fast", prompt="Once upon a time", max_tokens=5)
    assert text.model == "chat-fast" and text.usage.completion_tokens == 5
    streamed = list(
        c.completions.create(model="chat-fast", prompt="Hello", max_tokens=4, stream=True)
    )
    assert sum(1 for s in streamed if s.choices and s.choices[0].text) == 4
    emb = c.embeddings.create(model="embed", input=["a cat", "a dog"])
    assert len(emb.data) == 2 and emb.usage.prompt_tokens > 0
    assert {m.id for m in c.models.list()} == {"chat-fast", "chat-a-only", "embed"}
    records = gateway.records(expect=3)
    assert sorted(r.endpoint for r in records) == ["completions", "completions", "embeddings"]
    assert all(not r.usage.estimated for r in records)


def test_models_and_calls_are_limited_to_the_key_scope(gateway: Gateway) -> None:
    key = gateway.create_key(models=["chat-a-only"])
    c = client(gateway, key["key"])
    assert [m.id for m in c.models.list()] == ["chat-a-only"]
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="chat-fast", messages=CHAT)
    assert err.value.body["code"] == "model_not_found"
    assert c.chat.completions.create(model="chat-a-only", messages=CHAT).model == "chat-a-only"


def test_unknown_model_is_404_in_openai_shape(gateway: Gateway) -> None:
    key = gateway.create_key()
    with pytest.raises(openai.NotFoundError) as err:
        client(gateway, key["key"]).chat.completions.create(model="gpt-nope", messages=CHAT)
    assert err.value.status_code == 404
    assert err.value.body["type"] == "not_found_error"
    assert gateway.records(expect=0) == []


@both_stores
def test_bad_keys_and_revocation(gateway: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "tw-wrong").chat.completions.create(model="chat-fast", messages=CHAT)
    r = httpx.post(f"{gateway.v1}/chat/completions", json={"model": "chat-fast"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    key = gateway.create_key()
    c = client(gateway, key["key"])
    c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=1)
    r = gateway.admin("DELETE", f"/admin/v1/keys/{key['id']}")
    assert r.status_code == 200 and r.json()["revoked"] == [key["id"]]
    with pytest.raises(openai.AuthenticationError) as err:
        c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=1)
    assert err.value.body["code"] == "invalid_api_key"
    keys = gateway.admin("GET", "/admin/v1/keys").json()["data"]
    assert [k["revoked_at"] is not None for k in keys] == [True]
    assert "key" not in keys[0] and key["key"] not in json.dumps(keys)


def test_admin_requires_the_admin_key(gateway: Gateway) -> None:
    r = httpx.get(f"{gateway.url}/admin/v1/keys", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"
    key = gateway.create_key()
    r = httpx.get(f"{gateway.url}/admin/v1/keys", headers={"Authorization": f"Bearer {key['key']}"})
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"", None),
        (json.dumps({"messages": CHAT}).encode(), "model"),
        (json.dumps({"model": "chat-fast", "messages": "hi"}).encode(), "messages"),
        (json.dumps({"model": "chat-fast", "messages": []}).encode(), "messages"),
        (
            json.dumps({"model": "chat-fast", "messages": [{"content": "x"}]}).encode(),
            "messages[0]",
        ),
        (json.dumps({"model": "chat-fast", "messages": CHAT, "stream": "yes"}).encode(), "stream"),
        (
            json.dumps({"model": "chat-fast", "messages": CHAT, "max_tokens": -1}).encode(),
            "max_tokens",
        ),
        (json.dumps({"model": 7, "messages": CHAT}).encode(), "model"),
    ],
)
def test_malformed_requests_get_400(gateway: Gateway, body: bytes, param: str | None) -> None:
    key = gateway.create_key()
    r = httpx.post(
        f"{gateway.v1}/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {key['key']}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert gateway.records(expect=0) == []


def test_huge_body_is_413_without_reading_it(gateway: Gateway) -> None:
    key = gateway.create_key()
    big = json.dumps(
        {"model": "chat-fast", "messages": [{"role": "user", "content": "x" * (9 << 20)}]}
    )
    r = httpx.post(
        f"{gateway.v1}/chat/completions",
        content=big,
        headers={"Authorization": f"Bearer {key['key']}"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_unknown_route_and_method_are_openai_shaped(gateway: Gateway) -> None:
    r = httpx.get(f"{gateway.v1}/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = httpx.get(f"{gateway.v1}/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_passthrough_fields_reach_the_upstream_untouched(gateway: Gateway) -> None:
    key = gateway.create_key()
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    reply = client(gateway, key["key"]).chat.completions.create(
        model="chat-fast",
        messages=CHAT,
        max_tokens=3,
        tools=tools,
        seed=7,
        response_format={"type": "text"},
        user="alice",
        extra_headers={"X-Tokenworks-Tags": "team=infra, task=t1"},
    )
    assert reply.model == "chat-fast"
    [record] = gateway.records()
    assert record.tags == {"user": "alice", "team": "infra", "task": "t1"}


# -- failover and faults -------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["500", "503", "429", "malformed", "cut"])
def test_failover_before_the_first_byte(
    gateway: Gateway, sims: tuple[Sim, Sim], fault: str
) -> None:
    a, b = sims
    a.fault(fault)
    key = gateway.create_key()
    reply = client(gateway, key["key"]).chat.completions.create(
        model="chat-fast", messages=CHAT, max_tokens=4
    )
    assert reply.model == "chat-fast" and reply.usage.completion_tokens == 4
    assert b.stats()["completed"] == 1
    [record] = gateway.records()
    assert record.producer == "b" and record.status == 200
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'tokenworks_upstream_errors_total{producer="a"' in metrics


def test_stream_failover_when_the_first_deployment_fails(
    gateway: Gateway, sims: tuple[Sim, Sim]
) -> None:
    a, _b = sims
    a.fault("500")
    key = gateway.create_key()
    chunks = list(
        client(gateway, key["key"]).chat.completions.create(
            model="chat-fast", messages=CHAT, max_tokens=5, stream=True
        )
    )
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 5
    assert gateway.records()[0].producer == "b"


def test_timeout_fails_over(make_gateway, sims: tuple[Sim, Sim]) -> None:
    a, b = sims
    models = (
        "models:\n  - name: m\n    deployments:\n      - {producer: a, model: x}\n"
        "      - {producer: b, model: x}\n"
    )
    with make_gateway({"a": (a.url, 0.5), "b": b.url}, models) as gw:
        a.fault("timeout")
        key = gw.create_key()
        reply = client(gw, key["key"]).chat.completions.create(
            model="m", messages=CHAT, max_tokens=2
        )
        assert reply.usage.completion_tokens == 2
        assert gw.records()[0].producer == "b"
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'tokenworks_upstream_errors_total{producer="a",reason="timeout"} 1.0' in metrics


def test_unreachable_producer_fails_over_and_all_down_is_503(make_gateway, sims) -> None:
    a, _ = sims
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    models = (
        "models:\n  - name: m\n    deployments:\n      - {producer: dead, model: x}\n"
        "      - {producer: a, model: x}\n  - name: only-dead\n    deployments:\n"
        "      - {producer: dead, model: x}\n"
    )
    with make_gateway({"dead": dead, "a": a.url}, models) as gw:
        key = gw.create_key()
        c = client(gw, key["key"])
        assert c.chat.completions.create(model="m", messages=CHAT, max_tokens=1).model == "m"
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="only-dead", messages=CHAT, max_tokens=1)
        assert err.value.status_code == 503
        assert err.value.body["code"] == "upstream_unavailable"
        failed = [r for r in gw.records(expect=2) if r.status == 503]
        assert len(failed) == 1 and failed[0].usage.output_tokens == 0


def test_all_upstreams_failing_gives_502_and_429_keeps_retry_after(
    gateway: Gateway, sims: tuple[Sim, Sim]
) -> None:
    a, b = sims
    key = gateway.create_key()
    c = client(gateway, key["key"])
    a.fault("500")
    b.fault("500")
    with pytest.raises(openai.InternalServerError) as err:
        c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=1)
    assert err.value.status_code == 502
    # A capacity refusal of the last deployment is tried there again after its Retry-After
    # pause (max_attempts 3: a, b, b); refused every time, the client gets the 429.
    a.fault("429")
    b.fault("429", count=2)
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=1)
    assert err.value.response.headers.get("retry-after")
    assert b.stats()["faults"]["429"] == 2
    assert sorted(r.status for r in gateway.records(expect=2)) == [429, 502]


@pytest.mark.parametrize("fault", ["cut", "malformed"])
def test_mid_stream_crash_ends_with_an_error_event_and_is_metered(
    gateway: Gateway, sims: tuple[Sim, Sim], fault: str
) -> None:
    _a, b = sims
    key = gateway.create_key()
    with httpx.stream(
        "POST",
        f"{gateway.v1}/chat/completions",
        headers={"Authorization": f"Bearer {key['key']}"},
        json={
            "model": "chat-fast",
            "messages": CHAT,
            "max_tokens": 40,
            "stream": True,
            "sim_fault": fault,
        },
        timeout=10,
    ) as r:
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e.strip()]
    assert "[DONE]" not in body
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] in ("upstream_cut", "upstream_malformed")
    sent = 0
    for e in events[:-1]:
        try:
            chunk = json.loads(e.removeprefix("data: "))
        except ValueError:
            continue
        sent += bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))
    assert b.stats()["completed"] == 0, "no failover once bytes reached the client"
    [record] = gateway.records()
    assert record.status == 502 and record.producer == "a"
    assert record.usage.estimated and record.usage.output_tokens >= sent > 0
    assert record.usage.input_tokens > 0


def test_missing_usage_is_counted_offline(gateway: Gateway) -> None:
    key = gateway.create_key()
    c = client(gateway, key["key"])
    reply = c.chat.completions.create(
        model="chat-fast", messages=CHAT, max_tokens=9, extra_body={"sim_fault": "no_usage"}
    )
    assert reply.usage is None
    stream = c.chat.completions.create(
        model="chat-fast",
        messages=CHAT,
        max_tokens=9,
        stream=True,
        extra_body={"sim_fault": "no_usage"},
    )
    list(stream)
    records = gateway.records(expect=2)
    assert len(records) == 2
    for record in records:
        assert record.usage.estimated
        # One sim word is one token, so the offline count matches what was produced.
        assert 8 <= record.usage.output_tokens <= 10
        assert record.usage.input_tokens > 0


def test_client_disconnect_cancels_upstream_and_charges_what_was_produced(
    make_gateway, sim_a: Sim
) -> None:
    from tests.conftest import running_sim

    with running_sim("fast") as slow:
        models = "models:\n  - name: m\n    deployments:\n      - {producer: s, model: x}\n"
        with make_gateway({"s": slow.url}, models) as gw:
            key = gw.create_key()
            with httpx.stream(
                "POST",
                f"{gw.v1}/chat/completions",
                headers={"Authorization": f"Bearer {key['key']}"},
                json={"model": "m", "messages": CHAT, "max_tokens": 2000, "stream": True},
                timeout=10,
            ) as r:
                seen = 0
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        seen += bool(delta.get("content"))
                    if seen >= 5:
                        break
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and slow.stats()["cancelled"] < 1:
                time.sleep(0.05)
            assert slow.stats()["cancelled"] == 1
            records = []
            while time.monotonic() < deadline and not records:
                records = gw.records()
                time.sleep(0.05)
            [record] = records
            assert record.status == 499
            assert 5 <= record.usage.output_tokens < 2000


@both_stores
def test_usage_totals_equal_what_the_upstreams_reported(
    gateway: Gateway, sims: tuple[Sim, Sim]
) -> None:
    a, _b = sims
    key = gateway.create_key(name="alice")
    c = client(gateway, key["key"])
    for i in range(6):
        c.chat.completions.create(model="chat-fast", messages=CHAT, max_tokens=3 + i)
        list(
            c.chat.completions.create(
                model="chat-a-only", messages=CHAT, max_tokens=2 + i, stream=True
            )
        )
    assert len(gateway.records(expect=12)) == 12
    by_producer = {row["producer"]: row for row in gateway.usage(group_by="producer")}
    stats = a.stats()
    assert by_producer["a"]["requests"] == 12
    assert by_producer["a"]["output_tokens"] == stats["completion_tokens_reported"]
    assert by_producer["a"]["input_tokens"] == stats["prompt_tokens_reported"]
    by_model = {row["model"]: row for row in gateway.usage(group_by="model")}
    assert by_model["chat-fast"]["output_tokens"] == sum(3 + i for i in range(6))
    assert by_model["chat-a-only"]["output_tokens"] == sum(2 + i for i in range(6))
    by_key = gateway.usage(group_by="key,day")
    assert by_key[0]["key"] == key["id"] and by_key[0]["requests"] == 12
    assert gateway.usage(group_by="model", since="2999-01-01") == []
    r = gateway.admin("GET", "/admin/v1/usage", params={"group_by": "color"})
    assert r.status_code == 400


def test_metrics_and_healthz(gateway: Gateway) -> None:
    key = gateway.create_key()
    client(gateway, key["key"]).chat.completions.create(
        model="chat-fast", messages=CHAT, max_tokens=2
    )
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    text = httpx.get(f"{gateway.url}/metrics").text
    assert 'tokenworks_requests_total{endpoint="chat",model="chat-fast",status="200"} 1.0' in text
    assert 'tokenworks_tokens_total{direction="output",model="chat-fast",producer="a"} 2.0' in text
    assert "tokenworks_request_latency_seconds_bucket" in text


def test_admin_key_from_the_environment_wins(monkeypatch, make_gateway, sim_a: Sim) -> None:
    monkeypatch.setenv("TOKENWORKS_ADMIN_KEY", "from-env")
    models = "models:\n  - name: m\n    deployments:\n      - {producer: a, model: x}\n"
    with make_gateway({"a": sim_a.url}, models) as gw:
        r = httpx.get(f"{gw.url}/admin/v1/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 401
        r = httpx.get(f"{gw.url}/admin/v1/keys", headers={"Authorization": "Bearer from-env"})
        assert r.status_code == 200


def test_an_error_as_the_first_stream_event_fails_over(make_gateway, sim_a: Sim) -> None:
    """Some upstreams answer 200 and stream the error: nothing reached the client yet."""
    from tokenworks.server import serve_in_thread

    async def erring(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        error = b'data: {"error": {"message": "out of KV cache", "type": "server_error"}}\n\n'
        await send({"type": "http.response.body", "body": error})

    with serve_in_thread(erring) as bad:
        models = (
            "models:\n  - name: m\n    deployments:\n      - {producer: bad, model: x}\n"
            "      - {producer: a, model: x}\n"
        )
        with make_gateway({"bad": bad, "a": sim_a.url}, models) as gw:
            key = gw.create_key()
            chunks = list(
                client(gw, key["key"]).chat.completions.create(
                    model="m", messages=CHAT, max_tokens=3, stream=True
                )
            )
            assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 3
            assert gw.records()[0].producer == "a"
