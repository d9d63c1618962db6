"""No upstream fault can lose a charge or take billing down.

A seeded mix of plain and streamed chat, text and embedding requests goes through a real
gateway to simulated upstreams that serve every fault the sim knows (tokenworks upstream-sim
--help), several requests at a time. Afterwards, on each store:

- every request has a usage row;
- no answer completed without its charge: a client that received a whole answer (a 200 body,
  or a stream up to `data: [DONE]`) was told a price (`X-Tokenworks-Price` and `usage.cost`, or
  the stream's usage chunk, which every stream here asks for), greater than zero, and it is the
  price on its usage row;
- the ledger's spend is what the whole answers were told plus what the cut ones were charged,
  which is the sum of the usage rows, with nothing left held;
- the ledger check passes, and the ledger's writer is still up: a last plain request is
  charged, and the balance moves by exactly its price.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest

from tests.conftest import Gateway, Sim, both_stores, gateway_config, running_gateway
from tokenworks.money import parse_amount
from tokenworks.sim.faults import UPSTREAM_COST, UPSTREAM_ERRORS
from tokenworks.sim.profile import FAULT_HELP, FAULT_KINDS, FLOOD_CHOICES

SEED = 20261129
REQUESTS_PER_STORE = 200
CONCURRENCY = 6
# Plain requests (no fault) weigh as much as this many fault kinds in the draw.
PLAIN_WEIGHT = 4
# Upstream timeouts short enough that hanging faults cost little time, long enough that the
# sim's instant answers fit in them on a busy machine. A stall either fits or outlasts them.
UPSTREAM_TIMEOUT_S = 0.75
STALL_DELAYS_S = (0.05, 1.0)
CLIENT_TIMEOUT_S = 30.0
CREDIT_NANO = 1_000 * 10**9

MODELS = """\
models:
  - name: chat
    deployments:
      - {producer: a, model: sim-small}
      - {producer: b, model: sim-small}
  - name: embed
    deployments:
      - {producer: a, model: sim-embed}
"""


@dataclass
class Outcome:
    """What one client saw."""

    status: int
    request_id: str | None
    complete: bool  # the whole answer: a 200 body, or a stream that reached [DONE]
    told_nano: int | None  # the price the client was told, if it was told one
    note: str  # the request, for failure messages


def _price(text: str | None) -> int | None:
    return None if text is None else parse_amount(text)


def _plain(client: httpx.Client, path: str, body: dict[str, Any]) -> Outcome:
    note = f"POST {path} {body}"
    response = client.post(path, json=body)
    request_id = response.headers.get("x-request-id")
    if response.status_code != 200:
        return Outcome(response.status_code, request_id, False, None, note)
    parsed = response.json()
    told = _price(response.headers.get("x-tokenworks-price"))
    usage = parsed.get("usage")
    cost = _price(usage.get("cost")) if isinstance(usage, dict) else None
    assert cost is None or cost == told, f"usage.cost {cost} != X-Tokenworks-Price {told}: {note}"
    return Outcome(200, request_id, True, told, note)


def _stream(client: httpx.Client, path: str, body: dict[str, Any]) -> Outcome:
    note = f"POST {path} {body}"
    told: int | None = None
    last = b""
    with client.stream("POST", path, json=body) as response:
        request_id = response.headers.get("x-request-id")
        if response.status_code != 200:
            response.read()
            return Outcome(response.status_code, request_id, False, None, note)
        try:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip().encode()
                last = data
                if data == b"[DONE]" or b'"usage"' not in data:
                    continue
                chunk = msgspec.json.decode(data)
                usage = chunk.get("usage") if isinstance(chunk, dict) else None
                if isinstance(usage, dict) and "cost" in usage:
                    told = _price(usage["cost"])
        except httpx.HTTPError:
            return Outcome(200, request_id, False, told, note)
    return Outcome(200, request_id, last == b"[DONE]", told, note)


def _draw_request(rng: random.Random, i: int) -> tuple[str, dict[str, Any], bool]:
    """(path, body, stream) of request i: endpoint, streaming, sizes and fault all seeded."""
    kinds = sorted(FAULT_KINDS)
    fault = rng.choice([*kinds, *[None] * PLAIN_WEIGHT])
    endpoint = rng.choices(["chat", "completions", "embeddings"], weights=[5, 4, 1])[0]
    words = " ".join(rng.choice(["grid", "power", "token", "price", "river"]) for _ in range(8))
    body: dict[str, Any] = {"model": "embed" if endpoint == "embeddings" else "chat"}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": f"{i} {words}"}]
    elif endpoint == "completions":
        body["prompt"] = f"{i} {words}"
    else:
        body["input"] = f"{i} {words}"
    stream = endpoint != "embeddings" and rng.random() < 0.5
    if endpoint != "embeddings":
        body["max_tokens"] = rng.randint(1, 24)
        if rng.random() < 0.2:
            body["n"] = 2
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if fault is not None:
        body["sim_fault"] = fault
        if fault in ("stall", "slow_first_byte"):
            body["sim_delay_s"] = rng.choice(STALL_DELAYS_S)
    path = {"chat": "/chat/completions", "completions": "/completions"}.get(endpoint, "/embeddings")
    return path, body, stream


def _send_all(gateway: Gateway, secret: str, count: int) -> list[Outcome]:
    rng = random.Random(SEED)
    requests = [_draw_request(rng, i) for i in range(count)]
    headers = {"Authorization": f"Bearer {secret}"}
    with httpx.Client(base_url=gateway.v1, headers=headers, timeout=CLIENT_TIMEOUT_S) as client:

        def send(request: tuple[str, dict[str, Any], bool]) -> Outcome:
            path, body, stream = request
            return (_stream if stream else _plain)(client, path, body)

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return list(pool.map(send, requests))


def _balance(gateway: Gateway, account_id: int) -> dict[str, Any]:
    response = gateway.admin("GET", f"/admin/v1/accounts/{account_id}")
    assert response.status_code == 200, response.text
    return response.json()["balance"]


@pytest.fixture
def faulty_gateway(sims: tuple[Sim, Sim], database: str) -> Iterator[Gateway]:
    a, b = sims
    producers = {"a": (a.url, UPSTREAM_TIMEOUT_S), "b": (b.url, UPSTREAM_TIMEOUT_S)}
    with running_gateway(gateway_config(database, producers, MODELS), database) as gw:
        yield gw


@pytest.mark.timeout(150)
@both_stores
def test_no_fault_loses_a_charge_or_takes_billing_down(faulty_gateway: Gateway) -> None:
    gateway = faulty_gateway
    account_id, key = gateway.funded_key(CREDIT_NANO, name="faults")
    outcomes = _send_all(gateway, key["key"], REQUESTS_PER_STORE)

    problems: list[str] = []
    try:
        gateway.ledger(lambda ledger: ledger.flush())
    except Exception as exc:  # the ledger's writer died: that is the finding, keep looking
        problems.append(f"the ledger cannot flush: {exc!r}")
    rows = [r for r in gateway.records(expect=len(outcomes)) if r.key_id == key["id"]]
    by_id = {r.request_id: r for r in rows}
    if len(rows) != len(outcomes):
        problems.append(f"{len(outcomes)} requests but {len(rows)} usage rows")
    complete = [o for o in outcomes if o.complete]
    for o in complete:
        row = by_id.get(o.request_id or "")
        if o.told_nano is None or o.told_nano <= 0:
            problems.append(f"complete answer told no price (told {o.told_nano}): {o.note}")
        elif row is None:
            problems.append(f"complete answer {o.request_id} has no usage row: {o.note}")
        elif row.price_nano != o.told_nano:
            problems.append(
                f"complete answer told {o.told_nano}, its row says {row.price_nano}: {o.note}"
            )

    balance = _balance(gateway, account_id)
    spent_nano = CREDIT_NANO - balance["total_nano"]
    told_nano = sum(o.told_nano or 0 for o in complete)
    complete_ids = {o.request_id for o in complete}
    cut_charged_nano = sum(r.price_nano for r in rows if r.request_id not in complete_ids)
    if balance["held_nano"] != 0:
        problems.append(f"{balance['held_nano']} nano still held after every request ended")
    if spent_nano != told_nano + cut_charged_nano:
        problems.append(
            f"ledger spend {spent_nano} != told to complete answers {told_nano} + charged "
            f"to cut ones {cut_charged_nano}"
        )
    if spent_nano != sum(r.price_nano for r in rows):
        problems.append(
            f"ledger spend {spent_nano} != usage rows {sum(r.price_nano for r in rows)}"
        )

    check = gateway.admin("GET", "/admin/v1/ledger/check")
    if check.status_code != 200 or not check.json().get("ok"):
        problems.append(f"ledger check: {check.status_code} {check.text[:500]}")

    # The writer is still up: a last plain request is answered, charged, and the balance moves.
    with httpx.Client(
        base_url=gateway.v1,
        headers={"Authorization": f"Bearer {key['key']}"},
        timeout=CLIENT_TIMEOUT_S,
    ) as client:
        last = _plain(
            client,
            "/chat/completions",
            {"model": "chat", "messages": [{"role": "user", "content": "last"}], "max_tokens": 4},
        )
    after = _balance(gateway, account_id)
    if not last.complete or not last.told_nano:
        problems.append(f"the last plain request was not served and charged: {last}")
    elif balance["total_nano"] - after["total_nano"] != last.told_nano:
        problems.append(
            f"the last request was told {last.told_nano} but the balance moved by "
            f"{balance['total_nano'] - after['total_nano']}"
        )
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:40])
    # The mix reached every path: whole answers, cut ones and refused ones.
    assert complete and len(complete) < len(outcomes)


# ------------------------------------------------------------------ the sim's billing faults


# The provider error faults answer an error, not an answer to look into (tests/api covers them).
BILLING_FAULTS = sorted(
    set(FAULT_HELP) - {"500", "503", "429", "timeout", "cut", "malformed"} - set(UPSTREAM_ERRORS)
)


@pytest.fixture(scope="module")
def sim_client(sim_a: Sim) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim_a.url, timeout=10) as client:
        yield client


def _sim_answer(client: httpx.Client, stream: bool, **extra: Any) -> tuple[dict, list[dict], bool]:
    """(the usage-bearing object, every JSON object, whether [DONE] came) of one chat answer."""
    body = {"model": "m", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 4}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    response = client.post("/v1/chat/completions", json={**body, **extra})
    assert response.status_code == 200, response.text
    if not stream:
        parsed = response.json()
        return parsed, [parsed], True
    text = response.text.replace("\r\n", "\n")  # the `crlf` fault's framing, read as LF
    events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    objects = [msgspec.json.decode(e) for e in events if e != "[DONE]"]
    carrier = next((o for o in objects if not o.get("choices")), {})
    return carrier, objects, events[-1] == "[DONE]"


@pytest.mark.parametrize("stream", [False, True])
def test_sim_serves_each_billing_fault_by_name_and_count(
    sim_client: httpx.Client, stream: bool
) -> None:
    listed = sim_client.get("/sim/faults").json()["kinds"]
    assert set(listed) == FAULT_KINDS
    for kind in BILLING_FAULTS:
        queued = {"kind": kind, "count": 2, "delay_s": 0.01}  # stalls and slow starts: short
        assert sim_client.post("/sim/faults", json=queued).status_code == 200
        faulty = [_sim_answer(sim_client, stream) for _ in range(2)]
        honest_carrier, _, honest_done = _sim_answer(sim_client, stream)
        assert honest_done and isinstance(honest_carrier["usage"]["prompt_tokens"], int)
        for carrier, objects, done in faulty:
            usage = carrier.get("usage")
            if kind == "huge_usage":
                assert usage["prompt_tokens"] >= 10**19
            elif kind == "negative_usage":
                assert usage["prompt_tokens"] < 0 and usage["completion_tokens"] < 0
            elif kind == "float_usage":
                assert isinstance(usage["completion_tokens"], float)
            elif kind == "string_usage":
                assert isinstance(usage["completion_tokens"], str)
            elif kind == "zero_usage":
                assert usage["completion_tokens"] == 0
            elif kind == "usage_elsewhere":
                assert usage is None and carrier["x_usage"]["prompt_tokens"] > 0
            elif kind == "choice_flood":
                assert max(len(o.get("choices") or ()) for o in objects) == FLOOD_CHOICES
            elif kind == "wrong_tier":
                assert {o.get("service_tier") for o in objects} == {"priority"}
            elif kind == "upstream_cost":
                assert usage["cost"] == UPSTREAM_COST
            elif kind == "no_done":
                assert done is not stream
            elif kind == "no_usage":
                assert usage is None
            else:  # overcount, stall, slow_first_byte: still a whole, counted answer
                assert done and isinstance(usage["prompt_tokens"], int)
