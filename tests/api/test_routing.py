"""Routing over real HTTP: strategies and the `provider` object choose which sim serves."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, Sim, running_sim
from tokenworks.server import serve_in_thread

CHAT = [{"role": "user", "content": "Route me somewhere cheap."}]

# a is dear, b cheap, c in between (per million input / output tokens).
MODELS = """\
models:
  - name: m
    routing: %s
    deployments:
      - {producer: a, model: sim-small, cost: {input_per_mtok: "3.00", output_per_mtok: "9.00"}}
      - {producer: b, model: sim-small, cost: {input_per_mtok: "0.50", output_per_mtok: "1.00"}}
      - {producer: c, model: sim-small, cost: {input_per_mtok: "1.00", output_per_mtok: "2.00"}}
"""


@pytest.fixture(scope="module")
def sim_c() -> Iterator[Sim]:
    with running_sim("instant") as sim:
        yield sim


@pytest.fixture
def three(sims: tuple[Sim, Sim], sim_c: Sim) -> Iterator[dict[str, Sim]]:
    sim_c.reset()
    yield {"a": sims[0], "b": sims[1], "c": sim_c}
    sim_c.clear_faults()


def gateway_for(make_gateway: Callable[..., Any], three: dict[str, Sim], routing: str) -> Any:
    return make_gateway({name: sim.url for name, sim in three.items()}, MODELS % routing)


def chat(gw: Gateway, key: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{gw.v1}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "m", "messages": CHAT, "max_tokens": 5, **extra},
        timeout=30,
    )


def served(three: dict[str, Sim]) -> dict[str, int]:
    """Requests each sim received (answered or failed), by producer name."""
    return {name: sim.stats()["requests_total"] for name, sim in three.items()}


def test_cheapest_serves_from_the_cheaper_producer(
    make_gateway: Callable[..., Any], three: dict[str, Sim]
) -> None:
    with gateway_for(make_gateway, three, "cheapest") as gw:
        key = gw.create_key()["key"]
        r = chat(gw, key)
        assert r.status_code == 200, r.text
        assert served(three) == {"a": 0, "b": 1, "c": 0}
        [record] = gw.records()
        assert record.producer == "b"
        # And the price charged is b's (markup 0: price = cost = b's rates).
        assert record.cost_nano == record.price_nano > 0


def test_failover_walks_the_strategy_s_order(
    make_gateway: Callable[..., Any], three: dict[str, Sim]
) -> None:
    three["b"].fault("500")  # the cheapest fails before its first byte: c next, not a
    with gateway_for(make_gateway, three, "cheapest") as gw:
        r = chat(gw, gw.create_key()["key"])
        assert r.status_code == 200, r.text
        assert served(three) == {"a": 0, "b": 1, "c": 1}
        assert gw.records()[0].producer == "c"


@pytest.mark.parametrize(
    ("provider", "expect"),
    [
        (None, {"a": 0, "b": 1, "c": 0}),
        ({"order": ["A"]}, {"a": 1, "b": 0, "c": 0}),  # names match case-insensitively
        ({"only": ["c"]}, {"a": 0, "b": 0, "c": 1}),
        ({"ignore": ["b"]}, {"a": 0, "b": 0, "c": 1}),
        # a is out of price: what is left of `order` is nobody, so the fallbacks serve.
        ({"order": ["a"], "max_price": {"prompt": 2}}, {"a": 0, "b": 1, "c": 0}),
        ({"sort": "price", "only": ["a", "c"]}, {"a": 0, "b": 0, "c": 1}),
    ],
)
def test_provider_object_changes_which_producer_serves(
    make_gateway: Callable[..., Any],
    three: dict[str, Sim],
    provider: dict[str, Any] | None,
    expect: dict[str, int],
) -> None:
    with gateway_for(make_gateway, three, "cheapest") as gw:
        extra = {} if provider is None else {"provider": provider}
        r = chat(gw, gw.create_key()["key"], **extra)
        assert r.status_code == 200, r.text
        assert served(three) == expect


def test_max_price_skips_the_dearer_first_choice(
    make_gateway: Callable[..., Any], three: dict[str, Sim]
) -> None:
    with gateway_for(make_gateway, three, "ordered") as gw:
        key = gw.create_key()["key"]
        r = chat(gw, key, provider={"max_price": {"prompt": 2, "completion": "2.00"}})
        assert r.status_code == 200, r.text
        assert served(three) == {"a": 0, "b": 1, "c": 0}  # ordered, a excluded by price
        r = chat(gw, key)
        assert served(three) == {"a": 1, "b": 1, "c": 0}  # without it: a, as configured


def test_allow_fallbacks_false_stops_after_the_order_list(
    make_gateway: Callable[..., Any], three: dict[str, Sim]
) -> None:
    with gateway_for(make_gateway, three, "cheapest") as gw:
        key = gw.create_key()["key"]
        three["a"].fault("500")
        r = chat(gw, key, provider={"order": ["a"]})  # fallbacks allowed: b serves
        assert r.status_code == 200, r.text
        assert served(three) == {"a": 1, "b": 1, "c": 0}
        three["a"].fault("500")
        r = chat(gw, key, provider={"order": ["a"], "allow_fallbacks": False})
        assert r.status_code == 502, r.text
        assert served(three) == {"a": 2, "b": 1, "c": 0}  # nobody else was tried


def test_max_price_leaving_none_is_a_400_naming_it(
    make_gateway: Callable[..., Any], three: dict[str, Sim]
) -> None:
    with gateway_for(make_gateway, three, "cheapest") as gw:
        r = chat(gw, gw.create_key()["key"], provider={"max_price": {"prompt": "0.1"}})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "no_provider_left"
        assert error["param"] == "provider.max_price"
        assert "max_price" in error["message"] and "0.5 USD" in error["message"]
        assert served(three) == {"a": 0, "b": 0, "c": 0}
        # The SDK raises its BadRequestError for it, like any 400.
        client = openai.OpenAI(base_url=gw.v1, api_key=gw.create_key()["key"], max_retries=0)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="m", messages=CHAT, extra_body={"provider": {"only": ["zz"]}}
            )


def test_a_bad_provider_object_is_a_400_naming_the_field(
    make_gateway: Callable[..., Any], three: dict[str, Sim]
) -> None:
    with gateway_for(make_gateway, three, "ordered") as gw:
        key = gw.create_key()["key"]
        for provider, param in (
            ({"quantizations": ["fp8"]}, "provider.quantizations"),
            ({"order": "a"}, "provider.order"),
            ({"max_price": {"prompt": "cheap"}}, "provider.max_price.prompt"),
        ):
            r = chat(gw, key, provider=provider)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param
        assert served(three) == {"a": 0, "b": 0, "c": 0}


class Recording:
    """An ASGI wrapper around a sim that keeps every request body it was sent."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        parts: list[bytes] = []

        async def recorded() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(b"".join(parts))
            return message

        await self.inner(scope, recorded, send)


def test_the_provider_object_never_reaches_the_upstream(
    make_gateway: Callable[..., Any],
) -> None:
    from tokenworks.sim import build_app as build_sim

    recording = Recording(build_sim("instant"))
    with serve_in_thread(recording) as url, contextlib.ExitStack() as stack:
        gw = stack.enter_context(
            make_gateway(
                {"a": url},
                "models:\n  - name: m\n    deployments:\n      - {producer: a, model: sim-small}\n",
            )
        )
        key = gw.create_key()["key"]
        provider = {"order": ["a"], "sort": "latency", "allow_fallbacks": True}
        assert chat(gw, key, provider=provider).status_code == 200
        assert chat(gw, key, provider=provider, stream=True).status_code == 200
    assert len(recording.bodies) == 2
    for body in recording.bodies:
        assert b"provider" not in body
        assert b"sim-small" in body  # the upstream got the request itself


def test_served_attempts_teach_speeds_shown_in_metrics(
    make_gateway: Callable[..., Any], three: dict[str, Sim]
) -> None:
    with gateway_for(make_gateway, three, "fastest") as gw:
        key = gw.create_key()["key"]
        r = chat(gw, key, stream=True)
        assert r.status_code == 200
        r = chat(gw, key)
        assert r.status_code == 200
        speeds = gw.app.state.gateway.router.speeds.snapshot()  # type: ignore[attr-defined]
        learned = {s["producer"]: s for s in speeds if s["samples"]}
        # Unknown deployments are explored first: each request probed a new one.
        assert set(learned) == {"a", "b"}
        assert learned["a"]["ttft_s"] is not None  # the stream taught a time to first token
        assert learned["b"]["ttft_s"] is None  # a plain answer teaches a rate only
        assert learned["b"]["output_tokens_per_s"] > 0
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'tokenworks_deployment_ttft_seconds{model="sim-small",producer="a"}' in metrics


def test_fastest_learns_to_prefer_the_quicker_producer(
    make_gateway: Callable[..., Any], sims: tuple[Sim, Sim]
) -> None:
    """`slow` (a 0.15 s first token, 150 tokens/s) is configured first; once both were
    probed, everything goes to the instant sim. No timing is asserted: 0.15 s against
    microseconds decides the order, whatever the machine's noise."""
    with running_sim("fast") as slow:
        instant = sims[1]
        models = (
            "models:\n  - name: m\n    routing: fastest\n    deployments:\n"
            "      - {producer: slow, model: sim-small}\n"
            "      - {producer: quick, model: sim-small}\n"
        )
        with make_gateway({"slow": slow.url, "quick": instant.url}, models) as gw:
            key = gw.create_key()["key"]
            for _ in range(2):  # one probe each, in configured order
                assert chat(gw, key, stream=True).status_code == 200
            assert slow.stats()["requests_total"] == 1
            assert instant.stats()["requests_total"] == 1
            for _ in range(4):
                assert chat(gw, key, stream=True).status_code == 200
            assert slow.stats()["requests_total"] == 1
            assert instant.stats()["requests_total"] == 5
            # The client can still ask for it by name.
            assert chat(gw, key, provider={"order": ["slow"]}).status_code == 200
            assert slow.stats()["requests_total"] == 2
