"""No input and no upstream can lose a charge: absurd usage, failed settlements, stalled
clients, batch prompts and output limits, over real HTTP on both stores.

Test deployments cost 1.00/2.00 per million input/output tokens and the default tariff charges
cost, so a request's price is input x 1,000 + output x 2,000 nano-units.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import Gateway, Sim, both_stores, running_sim
from tokenworks.server import serve_in_thread

pytestmark = both_stores

CHAT = [{"role": "user", "content": "How much does a megawatt cost?"}]
ONE_MODEL = "models:\n  - name: m\n    deployments:\n      - {producer: s, model: sim-small}\n"


def nano(text: str) -> int:
    return int(Decimal(text) * 1_000_000_000)


def post(gw: Gateway, secret: str, body: dict[str, Any], path: str = "chat/completions"):
    return httpx.post(
        f"{gw.v1}/{path}", headers={"Authorization": f"Bearer {secret}"}, json=body, timeout=30
    )


def balance(gw: Gateway, account_id: int) -> Any:
    async def read(ledger: Any) -> Any:
        return ledger.balance(account_id)

    return gw.ledger(read)


def check(gw: Gateway) -> list[str]:
    async def run(ledger: Any) -> list[str]:
        await ledger.sweep_expired()
        return await ledger.check()

    return gw.ledger(run)


def metric(gw: Gateway, prefix: str) -> float:
    text = httpx.get(f"{gw.url}/metrics").text
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(prefix))


def sse_events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e.startswith("data:")]


# ------------------------------------------------------------------ an upstream that lies


async def lying_upstream(scope: dict, receive: Any, send: Any) -> None:
    """An OpenAI-shaped upstream that reports whatever `usage` the request's `lie` field says
    (the gateway passes unknown fields through): upstream-sim only tells the truth, or a
    bounded overcount."""

    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"]
            await send({"type": f"{kind}.complete"})
            if kind == "lifespan.shutdown":
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    req = json.loads(body)
    usage = req["lie"]
    # Where the usage goes: "usage" (OpenAI; "null" sends `"usage": null`), "x_groq" (Groq's
    # streams: x_groq.usage on the last chunk) or "nowhere".
    where = req.get("lie_where", "usage")
    head = {"id": "x", "created": 1, "model": req["model"]}
    if req.get("stream"):
        chunks = [
            {**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {"content": word}, "finish_reason": None}
            ]}
            for word in ("the ", "grid ", "is ", "fine")
        ]  # fmt: skip
        if where in ("usage", "null"):
            chunks.append(
                {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            )
        elif where == "x_groq":
            chunks[-1]["x_groq"] = {"id": "req_x", "usage": usage}
        data = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
        data += b"data: [DONE]\n\n"
        content_type = b"text/event-stream"
    else:
        answer = {
            **head, "object": "chat.completion", "choices": [{
                "index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "the grid is fine"},
            }],
        }  # fmt: skip
        if where in ("usage", "null"):
            answer["usage"] = usage
        elif where == "x_groq":
            answer["x_groq"] = {"id": "req_x", "usage": usage}
        data = json.dumps(answer).encode()
        content_type = b"application/json"
    headers = [(b"content-type", content_type), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})


@pytest.fixture
def liar(make_gateway) -> Iterator[Gateway]:
    with serve_in_thread(lying_upstream) as url, make_gateway({"s": url}, ONE_MODEL) as gw:
        yield gw


ABSURD = {
    "1e19": {"prompt_tokens": 10**19, "completion_tokens": 4},
    "negative": {"prompt_tokens": -5, "completion_tokens": 4},
    "fraction": {"prompt_tokens": 12.5, "completion_tokens": 4},
    "text": {"prompt_tokens": "12", "completion_tokens": 4},
    "2^70": {"prompt_tokens": 10, "completion_tokens": 2**70},
    # A request with a prompt has input tokens, and an answer with text has output tokens.
    "zero": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    "zero input": {"prompt_tokens": 0, "completion_tokens": 4, "total_tokens": 4},
    "zero output": {"prompt_tokens": 10, "completion_tokens": 0, "total_tokens": 10},
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("lie", ABSURD.values(), ids=ABSURD.keys())
def test_absurd_usage_is_an_upstream_error_and_the_estimate_is_charged(
    liar: Gateway, lie: dict, stream: bool
) -> None:
    account, key = liar.funded_key(1_000_000_000)
    body = {"model": "m", "messages": CHAT, "max_tokens": 10, "lie": lie}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    r = post(liar, key["key"], body)
    assert r.status_code == 200, r.text
    if stream:
        events = sse_events(r.text)
        assert events[-1] == "data: [DONE]"
        [told] = [json.loads(e[6:])["usage"] for e in events if '"usage"' in e]
    else:
        told = r.json()["usage"]
        assert nano(r.headers["x-tokenworks-price"]) == nano(told["cost"])
    [record] = liar.records()
    assert record.usage.estimated and 0 < record.usage.output_tokens < 10
    assert record.error and "usage" in record.error
    assert 0 < record.price_nano == nano(told["cost"])  # paid for, at the estimate, and says so
    # The counts shown are the ones charged, not the upstream's.
    assert (told["prompt_tokens"], told["completion_tokens"]) == (
        record.usage.input_tokens,
        record.usage.output_tokens,
    )
    held = balance(liar, account)
    assert held.available_nano == 1_000_000_000 - record.price_nano and held.held_nano == 0
    assert metric(liar, 'tokenworks_upstream_errors_total{producer="s",reason="implausible') == 1
    assert check(liar) == []


def test_zero_output_for_an_answer_without_text_is_believed(make_gateway, sims) -> None:
    """Zero is implausible only where the answer has text: an empty answer made no tokens."""
    a, _ = sims
    with make_gateway({"s": a.url}, ONE_MODEL) as gw:
        _account, key = gw.funded_key(1_000_000_000)
        r = post(gw, key["key"], {"model": "m", "input": "grid"}, "embeddings")
        assert r.status_code == 200, r.text
        [record] = gw.records()
        assert not record.usage.estimated and record.usage.output_tokens == 0
        assert record.error is None


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("where", ["nowhere", "null", "x_groq"])
def test_the_client_is_told_the_usage_it_was_charged_wherever_the_upstream_put_it(
    liar: Gateway, stream: bool, where: str
) -> None:
    """Usage missing (or only in Groq's `x_groq.usage`): a stream that asked for usage still
    gets it, with the price it paid, before [DONE]; a plain answer's headers tell the price."""
    account, key = liar.funded_key(1_000_000_000)
    reported = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    lie = None if where == "null" else reported
    body = {"model": "m", "messages": CHAT, "max_tokens": 10, "lie": lie, "lie_where": where}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    r = post(liar, key["key"], body)
    assert r.status_code == 200, r.text
    [record] = liar.records()
    assert record.usage.estimated is (where != "x_groq")
    if where == "x_groq":
        assert (record.usage.input_tokens, record.usage.output_tokens) == (11, 4)
    assert record.price_nano > 0
    assert balance(liar, account).available_nano == 1_000_000_000 - record.price_nano
    if not stream:  # a plain answer without usage keeps none: its headers tell the price
        assert r.json().get("usage") is None
        assert nano(r.headers["x-tokenworks-price"]) == record.price_nano
        return
    events = sse_events(r.text)
    assert events[-1] == "data: [DONE]" and '"cost"' in events[-2]  # told, then done
    [chunk] = [json.loads(e[6:]) for e in events[:-1] if '"cost"' in e]
    assert chunk["choices"] == [] and chunk["object"] == "chat.completion.chunk"
    assert chunk["model"] == "m" and chunk["id"] == "x" and isinstance(chunk["created"], int)
    assert chunk["usage"] == {
        "prompt_tokens": record.usage.input_tokens,
        "completion_tokens": record.usage.output_tokens,
        "total_tokens": record.usage.input_tokens + record.usage.output_tokens,
        "cost": chunk["usage"]["cost"],
    }
    assert nano(chunk["usage"]["cost"]) == record.price_nano


def test_a_stream_that_did_not_ask_for_usage_is_not_sent_one(liar: Gateway) -> None:
    _account, key = liar.funded_key(1_000_000_000)
    body = {"model": "m", "messages": CHAT, "lie": None, "lie_where": "nowhere", "stream": True}
    r = post(liar, key["key"], body)
    assert r.status_code == 200, r.text
    assert '"usage"' not in r.text and r.text.endswith("data: [DONE]\n\n")
    [record] = liar.records()
    assert record.usage.estimated and record.price_nano > 0


def test_usage_without_counts_is_estimated_not_free(liar: Gateway) -> None:
    _account, key = liar.funded_key(1_000_000_000)
    r = post(liar, key["key"], {"model": "m", "messages": CHAT, "lie": {"total_tokens": 0}})
    assert r.status_code == 200
    [record] = liar.records()
    assert record.usage.estimated and record.price_nano > 0


# ------------------------------------------------------------------ no answer without its charge


def expire_holds_in_flight(gw: Gateway, deadline_s: float = 10.0) -> int:
    """Wait (bounded) for a request to hold credit, then expire every open hold, as the
    sweeper does when a hold outlives its TTL."""

    async def open_holds(ledger: Any) -> int:
        return len(ledger.engine.holds)

    async def expire(ledger: Any) -> int:
        later = datetime.now(UTC) + timedelta(days=2)
        return (await ledger.sweep_expired(later))["holds_expired"]

    deadline = time.monotonic() + deadline_s
    while not gw.ledger(open_holds):
        assert time.monotonic() < deadline, "no hold appeared"
        time.sleep(0.02)
    return gw.ledger(expire)


def test_a_plain_answer_whose_settlement_fails_is_withheld(make_gateway, sims) -> None:
    a, _ = sims
    with make_gateway({"s": a.url}, ONE_MODEL) as gw:
        account, key = gw.funded_key(1_000_000_000)
        body = {"model": "m", "messages": CHAT, "max_tokens": 8}
        body |= {"sim_fault": "slow_first_byte", "sim_delay_s": 1.0}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reply = pool.submit(post, gw, key["key"], body)
            assert expire_holds_in_flight(gw) == 1
            r = reply.result(timeout=30)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "settlement_failed"
        assert "x-tokenworks-price" not in r.headers
        [record] = gw.records()
        assert record.status == 502 and "settlement failed" in (record.error or "")
        assert record.price_nano == 0 and record.cost_nano > 0  # the producer still bills us
        held = balance(gw, account)
        assert held.available_nano == 1_000_000_000 and held.held_nano == 0
        assert metric(gw, "tokenworks_settlement_failures_total") == 1
        assert check(gw) == []


def test_a_stream_whose_settlement_fails_ends_in_an_error_not_done(make_gateway) -> None:
    with running_sim("fast") as paced, make_gateway({"s": paced.url}, ONE_MODEL) as gw:
        account, key = gw.funded_key(1_000_000_000)
        body = {"model": "m", "messages": CHAT, "max_tokens": 150, "stream": True}
        body |= {"stream_options": {"include_usage": True}}
        with httpx.stream(
            "POST",
            f"{gw.v1}/chat/completions",
            headers={"Authorization": f"Bearer {key['key']}"},
            json=body,
            timeout=30,
        ) as r:
            lines = r.iter_lines()
            for line in lines:
                if '"content":"' in line:
                    break
            assert expire_holds_in_flight(gw) == 1
            rest = "\n\n".join(line for line in lines if line)
        events = sse_events(rest)
        assert "data: [DONE]" not in events
        assert not any('"cost"' in e for e in events), "a cost shown for an uncharged answer"
        assert json.loads(events[-1][6:])["error"]["code"] == "settlement_failed"
        [record] = gw.records()
        assert record.status == 502 and record.price_nano == 0
        held = balance(gw, account)
        assert held.available_nano == 1_000_000_000 and held.held_nano == 0
        assert check(gw) == []


# ------------------------------------------------------------------ a client that stops reading

STALL = "limits:\n  client_stall_timeout_s: 0.5\n"


@contextlib.contextmanager
def stalled_client(gw: Gateway, secret: str, body: dict[str, Any]) -> Iterator[socket.socket]:
    """A raw HTTP/1.1 client with a tiny receive buffer that reads the response head and
    then stops reading."""
    url = urlparse(gw.url)
    payload = json.dumps(body).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    try:
        sock.connect((url.hostname, url.port))
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
            + f"Authorization: Bearer {secret}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        head = sock.recv(1024)
        assert head.startswith(b"HTTP/1.1 200"), head
        yield sock
    finally:
        sock.close()


def read_to_end(sock: socket.socket, limit_bytes: int = 64 * 1024 * 1024) -> bytes:
    """Everything until the gateway closes the connection or ends the chunked body."""
    data = b""
    deadline = time.monotonic() + 30
    while len(data) < limit_bytes and time.monotonic() < deadline:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return data
        data += chunk
        if data.endswith(b"\r\n0\r\n\r\n"):  # a finished body; the connection stays open
            return data
    raise AssertionError("the stream neither finished nor was cut")


def test_a_client_that_stops_reading_is_cut_and_pays_for_what_was_produced(
    make_gateway, sims
) -> None:
    a, _ = sims
    with make_gateway({"s": a.url}, ONE_MODEL, STALL) as gw:
        account, key = gw.funded_key(1_000_000_000)
        body = {"model": "m", "messages": CHAT, "max_tokens": 100_000, "stream": True}
        with stalled_client(gw, key["key"], body) as sock:
            [record] = gw.records(expect=1, timeout_s=15)
            assert record.status == 499 and "stopped reading" in (record.error or "")
            assert record.usage.estimated and 0 < record.usage.output_tokens < 100_000
            assert record.price_nano > 0
            held = balance(gw, account)
            assert held.held_nano == 0
            assert held.available_nano == 1_000_000_000 - record.price_nano
            rest = read_to_end(sock)
        assert b"[DONE]" not in rest and b"\r\n0\r\n\r\n" not in rest  # cut, not finished
        assert check(gw) == []


def test_a_stream_outliving_its_hold_ttl_keeps_its_hold(make_gateway, sims, monkeypatch) -> None:
    """A stream alive past its hold's first TTL (here a client that pauses for less than the
    stall timeout) is still charged at its end: the hold lives as long as the request."""
    from tokenworks.dispatch import billing

    monkeypatch.setattr(billing, "MAX_HOLD_TTL_S", 2.0)  # every hold's TTL: 2 s
    a, _ = sims
    upstream = {"s": (a.url, 60.0)}  # the upstream may take its time
    with make_gateway(upstream, ONE_MODEL, "limits:\n  client_stall_timeout_s: 30\n") as gw:
        account, key = gw.funded_key(1_000_000_000)
        body = {"model": "m", "messages": CHAT, "max_tokens": 20_000, "stream": True}
        with stalled_client(gw, key["key"], body) as sock:
            time.sleep(4)  # the relay waits on a write past the TTL; the sweeper runs each 1 s
            data = read_to_end(sock)
        assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        [record] = gw.records()
        assert record.status == 200 and record.error is None
        assert record.price_nano == record.usage.input_tokens * 1_000 + 20_000 * 2_000
        held = balance(gw, account)
        assert held.available_nano == 1_000_000_000 - record.price_nano
        assert metric(gw, "tokenworks_settlement_failures_total") == 0
        assert check(gw) == []


# ------------------------------------------------------------------ holds bound every shape


def test_batch_prompts_are_held_for_every_prompt(make_gateway, sims) -> None:
    a, _ = sims
    with make_gateway({"s": a.url}, ONE_MODEL) as gw:
        # Room for one prompt's 100 output tokens (0.0002) a few hundred times, not 500 times.
        _, key = gw.funded_key(50_000_000)
        prompts = [f"prompt {i}" for i in range(500)]
        body = {"model": "m", "prompt": prompts, "max_tokens": 100}
        r = post(gw, key["key"], body, "completions")
        assert r.status_code == 402, r.text
        assert a.stats()["requests"].get("completions", 0) == 0
        # Token-id prompts: one list of ids is one prompt; a list of lists is one each.
        r = post(gw, key["key"], {**body, "prompt": list(range(300))}, "completions")
        assert r.status_code == 200, r.text
        r = post(gw, key["key"], {**body, "prompt": [[1, 2]] * 500}, "completions")
        assert r.status_code == 402
        r = post(
            gw,
            key["key"],
            {**body, "prompt": "one", "n": 5, "best_of": 128, "max_tokens": 1000},
            "completions",
        )
        assert r.status_code == 402


def test_without_max_tokens_the_hold_is_the_models_real_maximum(make_gateway, sims) -> None:
    a, _ = sims
    models = ONE_MODEL + "    max_output_tokens: 50000\n"
    with make_gateway({"s": a.url}, models) as gw:
        # 0.09 covers 16,384 output tokens (0.033), not the model's 50,000 (0.1).
        _account, key = gw.funded_key(90_000_000)
        r = post(gw, key["key"], {"model": "m", "messages": CHAT})
        assert r.status_code == 402, r.text
        assert "0.1" in r.json()["error"]["message"]
        r = post(gw, key["key"], {"model": "m", "messages": CHAT, "max_tokens": 20_000})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [50_001, 10**18])
def test_an_output_limit_past_the_models_is_a_400_naming_it(
    make_gateway, sims: tuple[Sim, Sim], name: str, value: int
) -> None:
    a, _ = sims
    with make_gateway({"s": a.url}, ONE_MODEL + "    max_output_tokens: 50000\n") as gw:
        _, key = gw.funded_key(1_000_000_000)
        r = post(gw, key["key"], {"model": "m", "messages": CHAT, name: value})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == name
        assert "50000" in error["message"]


def test_a_worst_case_past_what_the_ledger_holds_is_a_400(make_gateway, sims) -> None:
    a, _ = sims
    with make_gateway({"s": a.url}, ONE_MODEL) as gw:
        _, key = gw.funded_key(1_000_000_000)
        r = post(gw, key["key"], {"model": "m", "messages": CHAT, "n": 10**15})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "n"
