"""The leak sweep: every way a request can leave the hot path gives back what it took.

A request takes three things on its way in: a hold on its account's credit (`billing.hold`),
a consumer rate-limit permit (`call.permit`: a concurrency slot of its key), and a producer
slot (`dispatcher.acquire`). Each exit path (served, failed over, refused, shed after a failed
attempt, untranslatable, cut mid-stream in every dialect, the client hanging up while queued
or mid-stream, an answer the gateway cannot read) is driven over real HTTP against
upstream-sim on 127.0.0.1, and afterwards, all at once: nothing is held, the key's
concurrency is back to its limit, every producer has nothing in flight, every request has
exactly one usage row, and `ledger check` is clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_KEY, TEST_COST, Gateway, Sim, running_gateway
from tokenworks.dispatch.ratelimit import CLOCK
from tokenworks.ledger import LedgerBusy
from tokenworks.server import serve_in_thread
from tokenworks.sim import build_app as build_sim
from tokenworks.sim.profile import SimProfile

CREDIT_NANO = 100 * 10**9
KEY_CONCURRENCY = 3
WAIT_S = 10.0  # the longest any polling loop here waits for a state to show
CHAT = [{"role": "user", "content": "count the sheep"}]


@contextlib.contextmanager
def sim_with(profile: SimProfile) -> Iterator[Sim]:
    with serve_in_thread(build_sim(profile)) as url:
        yield Sim(url)


def _junk_upstream(body: bytes, stream: bytes) -> Any:
    """An upstream that answers every POST with `body` (plain) or `stream` (SSE): what a
    misbehaving provider sends, byte for byte."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        request = b""
        while True:
            message = await receive()
            request += message.get("body", b"")
            if not message.get("more_body"):
                break
        streamed = b'"stream":true' in request.replace(b" ", b"")
        content_type = b"text/event-stream" if streamed else b"application/json"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type)],
            }
        )
        await send({"type": "http.response.body", "body": stream if streamed else body})

    return app


# Valid JSON a chat client could even read, but not a chat completion: `choices` holds a number.
JUNK_ANSWER = (
    b'{"id":"x","object":"chat.completion","model":"sim-small","choices":[1],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}'
)
JUNK_STREAM = (
    b'data: {"id":"x","object":"chat.completion.chunk","model":"sim-small",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"hi"}}]}\n\n'
    b'data: {"id":"x","object":"chat.completion.chunk","model":"sim-small","choices":[1]}\n\n'
    b'data: {"id":"x","object":"chat.completion.chunk","model":"sim-small","choices":[],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}\n\n'
    b"data: [DONE]\n\n"
)

# A Messages answer without usage whose content is a number (its texts cannot be read).
JUNK_MESSAGE = b'{"id":"msg_x","type":"message","role":"assistant","model":"sim-small","content":5}'
# OpenAI's Responses stream failing at once: an `error` event first (no `error` object in it).
RESPONSES_ERROR_STREAM = (
    b'event: error\ndata: {"type":"error","code":"server_error","message":"The server had an '
    b'error processing your request.","param":null,"sequence_number":0}\n\n'
)


def config(database: str, native: str, chatonly: str, junk: str, erring: str) -> str:
    cost = TEST_COST
    return f"""\
database: {database}
admin_key: {ADMIN_KEY}
limits: {{max_attempts: 3}}
producers:
  - {{name: native, base_url: "{native}/v1", timeout_s: 10, formats: [chat, messages, responses]}}
  - {{name: chatonly, base_url: "{chatonly}/v1", timeout_s: 10, formats: [chat], max_concurrency: 1}}
  - {{name: junk, base_url: "{junk}/v1", timeout_s: 10, formats: [chat]}}
  - {{name: erring, base_url: "{erring}/v1", timeout_s: 10, formats: [messages, responses]}}
models:
  - name: m-native
    deployments: [{{producer: native, model: sim-small, cost: {cost}}}]
  - name: m-chat
    deployments: [{{producer: chatonly, model: sim-small, cost: {cost}}}]
  - name: m-junk
    deployments: [{{producer: junk, model: sim-small, cost: {cost}}}]
  - name: m-failover
    deployments:
      - {{producer: erring, model: sim-small, cost: {cost}}}
      - {{producer: native, model: sim-small, cost: {cost}}}
"""


@pytest.fixture
def gw(database: str) -> Iterator[tuple[Gateway, Sim, Sim]]:
    with (
        sim_with(SimProfile(name="native")) as native,
        sim_with(SimProfile(name="chatonly", retry_after_s=1)) as chatonly,
        serve_in_thread(_junk_upstream(JUNK_ANSWER, JUNK_STREAM)) as junk,
        serve_in_thread(_junk_upstream(JUNK_MESSAGE, RESPONSES_ERROR_STREAM)) as erring,
        running_gateway(
            config(database, native.url, chatonly.url, junk, erring), database
        ) as gateway,
    ):
        yield gateway, native, chatonly


# -- what a client does ----------------------------------------------------------------------


def post(
    gw: Gateway, secret: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        f"{gw.v1}/{path}",
        headers={"Authorization": f"Bearer {secret}", **(headers or {})},
        json=body,
        timeout=30,
    )


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": CHAT, "max_tokens": 16, **extra}


def message(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": CHAT, "max_tokens": 16, **extra}


def response(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "input": "count the sheep", "max_output_tokens": 16, **extra}


def raw_request(gw: Gateway, secret: str, path: str, body: dict[str, Any]) -> socket.socket:
    """A raw client that sent a request and may hang up whenever the test says."""
    host, port = gw.url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {secret}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head + data)
    return sock


# -- what the gateway must have given back ---------------------------------------------------


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def on_loop(gw: Gateway, read: Callable[[], Any]) -> Any:
    """`read()` on the gateway's event loop (its state is the loop's)."""
    gateway = gw.app.state.gateway  # type: ignore[attr-defined]

    async def run() -> Any:
        return read()

    return asyncio.run_coroutine_threadsafe(run(), gateway.loop).result(30)


def held_nano(gw: Gateway, account: int) -> int:
    async def read(ledger: Any) -> int:
        return int(ledger.balance(account).held_nano)

    return int(gw.ledger(read))


def key_inflight(gw: Gateway) -> dict[str, int]:
    limiter = gw.app.state.gateway.relay.limits.limiter  # type: ignore[attr-defined]
    snapshot = on_loop(gw, lambda: limiter.snapshot(CLOCK()))
    return {scope: int(s["inflight"]) for scope, s in snapshot.items()}


def producers_inflight(gw: Gateway) -> dict[str, int]:
    r = gw.admin("GET", "/admin/v1/dispatch")
    assert r.status_code == 200, r.text
    state = r.json()
    assert state["waiting"] == 0 and state["queued"] == 0, state
    return {name: pool["capacity"]["inflight"] for name, pool in state["pools"].items()}


def assert_nothing_leaked(gw: Gateway, account: int, requests: int) -> None:
    """Every invariant at once, once the gateway is quiet."""
    wait_for(lambda: held_nano(gw, account) == 0, "every hold to be settled or voided")
    wait_for(lambda: set(key_inflight(gw).values()) <= {0}, "every rate-limit permit back")
    wait_for(lambda: set(producers_inflight(gw).values()) <= {0}, "every producer slot back")
    records = gw.records(expect=requests)
    ids = [r.request_id for r in records]
    assert len(ids) == len(set(ids)) == requests, sorted(r.status for r in records)

    async def check(ledger: Any) -> list[str]:
        await ledger.flush()
        return list(await ledger.check())

    assert gw.ledger(check) == []


def spent_nano(gw: Gateway, account: int) -> int:
    async def read(ledger: Any) -> int:
        return int(ledger.balance(account).available_nano)

    return CREDIT_NANO - int(gw.ledger(read))


def charged_nano(gw: Gateway) -> int:
    return sum(r.price_nano for r in gw.records(expect=0))


# -- the exit paths --------------------------------------------------------------------------

Path = Callable[[Gateway, Sim, Sim, str], None]


def served_plain_and_streamed(gw: Gateway, native: Sim, chatonly: Sim, secret: str) -> None:
    for path, body in [
        ("chat/completions", chat("m-native")),
        ("messages", message("m-native")),
        ("messages", message("m-chat")),
        ("responses", response("m-native")),
        ("responses", response("m-chat")),
    ]:
        assert post(gw, secret, path, body).status_code == 200
        assert post(gw, secret, path, {**body, "stream": True}).status_code == 200


def upstream_fails_before_the_first_byte(gw: Gateway, native: Sim, chatonly: Sim, s: str) -> None:
    native.fault("500")
    assert post(gw, s, "chat/completions", chat("m-native")).status_code == 502
    native.fault("unsupported_parameter")
    assert post(gw, s, "messages", message("m-native", stream=True)).status_code == 400


def streams_cut_mid_way(gw: Gateway, native: Sim, chatonly: Sim, secret: str) -> None:
    for path, body, sim in [
        ("chat/completions", chat("m-native"), native),
        ("messages", message("m-native"), native),  # passed through
        ("messages", message("m-chat"), chatonly),  # translated
        ("responses", response("m-native"), native),
        ("responses", response("m-chat"), chatonly),
    ]:
        sim.fault("cut")
        reply = post(gw, secret, path, {**body, "stream": True})
        assert reply.status_code == 200 and b"[DONE]" not in reply.content


def untranslatable(gw: Gateway, native: Sim, chatonly: Sim, secret: str) -> None:
    stored = response("m-chat", previous_response_id="resp_elsewhere")
    reply = post(gw, secret, "responses", stored)
    assert reply.status_code == 400, reply.text


def shed_after_a_failed_attempt(gw: Gateway, native: Sim, chatonly: Sim, secret: str) -> None:
    chatonly.fault("429")  # the only candidate pauses for 1 s: the retry cannot make 300 ms
    deadline = {"X-Tokenworks-Deadline-Ms": "300"}
    reply = post(gw, secret, "chat/completions", chat("m-chat"), deadline)
    assert reply.status_code == 429, reply.text
    assert reply.json()["error"]["code"] in ("deadline_unmeetable", "deadline_expired")
    wait_for(
        lambda: (
            gw.admin("GET", "/admin/v1/dispatch").json()["pools"]["chatonly"]["capacity"][
                "paused_for_s"
            ]
            == 0
        ),
        "the producer's pause to end",
    )


def hang_up_while_queued(gw: Gateway, native: Sim, chatonly: Sim, secret: str) -> None:
    blocker = threading.Thread(
        target=post,
        args=(
            gw,
            secret,
            "chat/completions",
            chat("m-chat", sim_fault="slow_first_byte", sim_delay_s=2.0),
        ),
    )
    blocker.start()
    wait_for(lambda: producers_inflight(gw)["chatonly"] == 1, "the blocker to start")
    with raw_request(gw, secret, "messages", message("m-chat", stream=True)):
        wait_for(lambda: gw.admin("GET", "/admin/v1/dispatch").json()["queued"] == 1, "queue")
    blocker.join(30)


def hang_up_mid_stream(gw: Gateway, native: Sim, chatonly: Sim, secret: str) -> None:
    for path, body in [
        ("chat/completions", chat("m-native")),
        ("messages", message("m-native")),
        ("messages", message("m-chat")),
        ("responses", response("m-native")),
    ]:
        slow = {**body, "stream": True, "sim_fault": "stall", "sim_delay_s": 2.0}
        with raw_request(gw, secret, path, slow) as sock:
            assert sock.recv(1).startswith(b"H")  # the head: the stream has started


def junk_answers(gw: Gateway, native: Sim, chatonly: Sim, secret: str) -> None:
    for path, body in [
        ("messages", message("m-junk")),
        ("responses", response("m-junk")),
        ("messages", message("m-junk", stream=True)),
        ("responses", response("m-junk", stream=True)),
    ]:
        assert post(gw, secret, path, body).status_code in (200, 502)


PATHS: dict[str, tuple[Path, int]] = {
    "served": (served_plain_and_streamed, 10),
    "failed": (upstream_fails_before_the_first_byte, 2),
    "cut": (streams_cut_mid_way, 5),
    "untranslatable": (untranslatable, 0),  # a 400 before anything is taken
    "shed_after_failure": (shed_after_a_failed_attempt, 1),
    "hang_up_queued": (hang_up_while_queued, 2),
    "hang_up_streaming": (hang_up_mid_stream, 4),
    "junk": (junk_answers, 4),
}


@pytest.mark.parametrize("name", list(PATHS))
def test_each_exit_path_gives_everything_back(gw, name: str) -> None:
    gateway, native, chatonly = gw
    account, key = gateway.funded_key(CREDIT_NANO, rate_limits={"max_concurrency": KEY_CONCURRENCY})
    drive, requests = PATHS[name]
    drive(gateway, native, chatonly, key["key"])
    assert_nothing_leaked(gateway, account, requests)


def test_an_answer_that_cannot_be_translated_is_the_upstreams_error_never_charged(gw) -> None:
    """A chat answer whose `choices` holds a number: a /v1/messages or /v1/responses client
    (translated) used to be charged and then told 500 "not charged"; its stream charged as
    served (status 200) and broke the connection with an exception."""
    gateway, _, _ = gw
    account, key = gateway.funded_key(CREDIT_NANO)
    for path, body in [("messages", message("m-junk")), ("responses", response("m-junk"))]:
        reply = post(gateway, key["key"], path, body)
        assert reply.status_code == 502, reply.text
    assert spent_nano(gateway, account) == 0
    reply = post(gateway, key["key"], "messages", message("m-junk", stream=True))
    assert reply.status_code == 200
    assert reply.text.rstrip().endswith("}") and "event: error" in reply.text
    assert "message_stop" not in reply.text  # a cut answer, not a finished one
    records = sorted(gateway.records(expect=3), key=lambda r: r.ts_ms)
    assert [r.status for r in records] == [502, 502, 502]
    assert [r.price_nano for r in records[:2]] == [0, 0]
    # The stream is charged what it produced (estimated), as any stream cut mid-way.
    assert records[2].usage.estimated and spent_nano(gateway, account) == records[2].price_nano
    assert_nothing_leaked(gateway, account, 3)


def test_a_responses_stream_that_opens_with_an_error_fails_over_before_the_first_byte(gw):
    """Nothing reached the client yet: the next deployment serves it, and the failed attempt
    is neither shown nor charged (it used to go out as a 200 stream, charged its estimate)."""
    gateway, _, _ = gw
    account, key = gateway.funded_key(CREDIT_NANO)
    reply = post(gateway, key["key"], "responses", response("m-failover", stream=True))
    assert reply.status_code == 200
    assert "event: error" not in reply.text
    assert reply.text.rstrip().splitlines()[-2] in (
        "event: response.completed",
        "event: response.incomplete",  # its max_output_tokens reached: an end all the same
    )
    (record,) = gateway.records(expect=1)
    assert (record.status, record.producer) == (200, "native")
    assert spent_nano(gateway, account) == record.price_nano
    assert_nothing_leaked(gateway, account, 1)


def test_a_hold_the_ledger_cannot_take_now_is_metered_and_gives_its_permit_back(gw) -> None:
    """A 503 from the ledger (busy: its writer behind) used to leave no usage row at all."""
    gateway, _, _ = gw
    account, key = gateway.funded_key(CREDIT_NANO, rate_limits={"max_concurrency": 1})
    ledger = gateway.app.state.gateway.ledger  # type: ignore[attr-defined]

    async def busy(*args: Any, **kwargs: Any) -> Any:
        raise LedgerBusy("the ledger's writer is behind; try again shortly")

    on_loop(gateway, lambda: setattr(ledger, "hold", busy))  # the writer behind, at will
    try:
        reply = post(gateway, key["key"], "chat/completions", chat("m-native"))
    finally:
        on_loop(gateway, lambda: delattr(ledger, "hold"))
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "ledger_busy"
    (record,) = gateway.records(expect=1)
    assert (record.status, record.price_nano, record.key_id) == (503, 0, key["id"])
    assert "ledger" in (record.error or "")
    # The key's one concurrent request is free again.
    assert post(gateway, key["key"], "chat/completions", chat("m-native")).status_code == 200
    assert_nothing_leaked(gateway, account, 2)


def test_leak_sweep_every_exit_path_on_one_gateway_then_every_invariant(gw) -> None:
    """The same paths one after another on one gateway and one key: what one path leaks
    would also starve the next (a key with no concurrency left answers 429)."""
    gateway, native, chatonly = gw
    account, key = gateway.funded_key(CREDIT_NANO, rate_limits={"max_concurrency": KEY_CONCURRENCY})
    requests = 0
    for drive, count in PATHS.values():
        drive(gateway, native, chatonly, key["key"])
        requests += count
    assert_nothing_leaked(gateway, account, requests)
    assert spent_nano(gateway, account) == charged_nano(gateway)  # charged what was recorded


def test_a_passed_through_answer_of_the_wrong_shape_fails_over(gw) -> None:
    """A Messages answer whose texts cannot be read (needed for its estimate: it has no
    usage) is the upstream's broken answer: the next deployment serves (it was a 500)."""
    gateway, _, _ = gw
    account, key = gateway.funded_key(CREDIT_NANO)
    reply = post(gateway, key["key"], "messages", message("m-failover"))
    assert reply.status_code == 200, reply.text
    (record,) = gateway.records(expect=1)
    assert (record.status, record.producer) == (200, "native")
    assert spent_nano(gateway, account) == record.price_nano
    assert_nothing_leaked(gateway, account, 1)
