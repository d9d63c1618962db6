"""The simulated token factory, driven over real HTTP by the official `openai` SDK and httpx."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import threading
import time
from array import array
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from tokenworks.metering.tokens import count_text
from tokenworks.sim import FAULT_KINDS, PROFILES, SimProfile, running_sim, serve
from tokenworks.sim.wire import WORDS

USER = [{"role": "user", "content": "Tell me about the grid."}]

# A paced profile that keeps tests quick: short first token, 200 tokens/s per stream.
QUICK = SimProfile(
    name="quick",
    capacity_tokens_per_s=10_000,
    max_stream_tokens_per_s=200,
    slots=8,
    queue_max=8,
    ttft_s=0.02,
    default_output_tokens_min=5,
    default_output_tokens_max=12,
)


@pytest.fixture(scope="module")
def instant_url() -> Iterator[str]:
    with running_sim("instant") as url:
        yield url


@pytest.fixture(scope="module")
def quick_url() -> Iterator[str]:
    with running_sim(QUICK) as url:
        yield url


@pytest.fixture
def http(instant_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=instant_url, timeout=10) as client:
        client.delete("/sim/faults")
        yield client


def sdk(url: str, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, **kwargs)


def stats(url: str) -> dict[str, object]:
    return httpx.get(f"{url}/sim/stats").json()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def sse_events(lines: Iterator[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


# --- wire format ---------------------------------------------------------------------------------


def test_every_word_is_one_token_so_usage_is_exact() -> None:
    for encoding in ("o200k_base", "cl100k_base"):
        for word in WORDS:
            assert count_text(word, encoding) == 1, (encoding, word)
            assert count_text(" " + word, encoding) == 1, (encoding, word)


def test_chat_plain_reports_exact_usage_and_is_deterministic(instant_url: str) -> None:
    client = sdk(instant_url)
    first = client.chat.completions.create(model="gpt-4o-mini", messages=USER, max_tokens=17)
    again = client.chat.completions.create(model="gpt-4o-mini", messages=USER, max_tokens=17)
    other = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "something else"}], max_tokens=17
    )

    text = first.choices[0].message.content
    assert first.object == "chat.completion" and first.model == "gpt-4o-mini"
    assert first.choices[0].finish_reason == "length"
    assert first.choices[0].message.role == "assistant"
    assert text == again.choices[0].message.content and text != other.choices[0].message.content
    assert first.usage is not None
    assert first.usage.completion_tokens == 17 == count_text(text, "o200k_base")
    assert first.usage.prompt_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + 17
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert first.usage.completion_tokens_details.reasoning_tokens == 0


def test_chat_without_max_tokens_uses_the_profile_default(instant_url: str) -> None:
    profile = PROFILES["instant"]
    reply = sdk(instant_url).chat.completions.create(model="m", messages=USER)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    low, high = profile.default_output_tokens_min, profile.default_output_tokens_max
    assert low <= reply.usage.completion_tokens <= high


def test_max_completion_tokens_wins_over_max_tokens(instant_url: str) -> None:
    reply = sdk(instant_url).chat.completions.create(
        model="m", messages=USER, max_tokens=30, max_completion_tokens=4
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 4


def test_chat_stream_with_include_usage(instant_url: str) -> None:
    chunks = list(
        sdk(instant_url).chat.completions.create(
            model="gpt-4o",
            messages=USER,
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [
        c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content
    ]
    assert len(content) == 9  # one token per delta
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 9 == count_text("".join(content), "o200k_base")
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_chat_stream_raw_framing(http: httpx.Client) -> None:
    body = {"model": "m", "messages": USER, "max_tokens": 3, "stream": True}
    with_usage = http.post(
        "/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}}
    )
    without = http.post("/v1/chat/completions", json=body)

    assert with_usage.headers["content-type"].startswith("text/event-stream")
    assert with_usage.text.endswith("data: [DONE]\n\n")
    events = with_usage.text.split("\n\n")
    assert all(e.startswith("data: ") for e in events if e)
    parsed = [json.loads(e[6:]) for e in events if e and e != "data: [DONE]"]
    assert all("usage" in p for p in parsed) and parsed[-1]["choices"] == []
    assert [p["usage"] for p in parsed[:-1]] == [None] * (len(parsed) - 1)
    assert '"usage"' not in without.text  # no usage field unless asked, as OpenAI does
    assert without.text.endswith("data: [DONE]\n\n")


def test_reasoning_model_counts_reasoning_in_completion_tokens(instant_url: str) -> None:
    chunks = list(
        sdk(instant_url).chat.completions.create(
            model="sim-reasoner",
            messages=USER,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    reasoning = [
        c
        for c in chunks
        if c.choices and (c.choices[0].delta.model_extra or {}).get("reasoning_content")
    ]
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 10
    assert usage.completion_tokens_details.reasoning_tokens == len(reasoning) == 5
    assert len(content) == 5


def test_legacy_completions_plain_and_stream(instant_url: str) -> None:
    client = sdk(instant_url)
    plain = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once", max_tokens=6)
    assert plain.object == "text_completion" and plain.model == "gpt-3.5-turbo-instruct"
    assert plain.usage is not None and plain.usage.completion_tokens == 6
    assert count_text(plain.choices[0].text, "cl100k_base") == 6

    chunks = list(
        client.completions.create(
            model="m",
            prompt="Once",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) == 6
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


def test_embeddings_are_deterministic_unit_vectors(instant_url: str) -> None:
    client = sdk(instant_url)
    # The SDK asks for base64 by default and decodes it; floats are asked for explicitly.
    b64 = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta"], encoding_format="float"
    )
    assert [d.index for d in b64.data] == [0, 1]
    assert b64.usage.prompt_tokens == b64.usage.total_tokens == 2
    a_b64, a_float = b64.data[0].embedding, floats.data[0].embedding
    assert len(a_float) == PROFILES["instant"].embedding_dims
    assert a_b64 == pytest.approx(a_float, abs=1e-6)
    assert math.isclose(math.fsum(v * v for v in a_float), 1.0, rel_tol=1e-6)
    assert a_float != floats.data[1].embedding
    small = client.embeddings.create(
        model="e", input="alpha", dimensions=8, encoding_format="float"
    )
    assert len(small.data[0].embedding) == 8


def test_embeddings_base64_is_little_endian_float32(http: httpx.Client) -> None:
    body = {"model": "e", "input": "alpha", "dimensions": 4}
    raw = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    floats = http.post("/v1/embeddings", json=body).json()
    decoded = array("f", base64.b64decode(raw["data"][0]["embedding"])).tolist()
    assert decoded == pytest.approx(floats["data"][0]["embedding"], abs=1e-6)


def test_models_lists_the_profile_models(instant_url: str) -> None:
    ids = [m.id for m in sdk(instant_url).models.list()]
    assert ids == list(PROFILES["instant"].models)


def test_bad_requests_are_openai_shaped(http: httpx.Client) -> None:
    bad_json = http.post("/v1/chat/completions", content=b"{not json")
    missing = http.post("/v1/chat/completions", json={"model": "m"})
    bad_max = http.post(
        "/v1/chat/completions", json={"model": "m", "messages": USER, "max_tokens": 0}
    )
    unknown = http.post("/v1/nope", json={})
    assert bad_json.status_code == 400
    assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    assert bad_json.json()["error"]["type"] == "invalid_request_error"
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    assert bad_max.status_code == 400 and bad_max.json()["error"]["param"] == "max_tokens"
    assert unknown.status_code == 404 and "error" in unknown.json()
    assert http.get("/v1/chat/completions").status_code == 405


def test_unknown_fields_are_ignored(http: httpx.Client) -> None:
    body = {"model": "m", "messages": USER, "max_tokens": 2, "seed": 3, "tools": [], "n": 1}
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2


def test_body_limit_and_api_key() -> None:
    profile = dataclasses.replace(PROFILES["instant"], max_body_bytes=1000, api_key="sk-right")
    with running_sim(profile) as url, httpx.Client(base_url=url) as client:
        good = {"Authorization": "Bearer sk-right"}
        body = {"model": "m", "messages": USER, "max_tokens": 1}
        assert client.post("/v1/chat/completions", json=body).status_code == 401
        wrong = client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-wrong"}
        )
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert client.post("/v1/chat/completions", json=body, headers=good).status_code == 200
        big = {**body, "messages": [{"role": "user", "content": "x" * 2000}]}
        too_big = client.post("/v1/chat/completions", json=big, headers=good)
        assert too_big.status_code == 413


def test_prefix_cache_reports_cached_tokens() -> None:
    profile = dataclasses.replace(PROFILES["instant"], prefix_cache_chars=200)
    shared = "You are a careful assistant. " * 20
    with running_sim(profile) as url:
        client = sdk(url)

        def ask(question: str) -> openai.types.CompletionUsage:
            messages = [
                {"role": "system", "content": shared},
                {"role": "user", "content": question},
            ]
            reply = client.chat.completions.create(model="m", messages=messages, max_tokens=1)
            assert reply.usage is not None
            return reply.usage

        cold, warm = ask("first question"), ask("second question")
        assert cold.prompt_tokens_details.cached_tokens == 0
        assert 0 < warm.prompt_tokens_details.cached_tokens <= warm.prompt_tokens
        assert stats(url)["cached_tokens_reported"] == warm.prompt_tokens_details.cached_tokens


# --- capacity model ------------------------------------------------------------------------------


def test_saturated_slots_answer_429_with_retry_after() -> None:
    profile = dataclasses.replace(QUICK, slots=1, queue_max=0, retry_after_s=3)
    with running_sim(profile) as url:
        results: list[object] = []

        def call() -> None:
            try:
                results.append(
                    sdk(url).chat.completions.create(model="m", messages=USER, max_tokens=40)
                )
            except openai.RateLimitError as exc:
                results.append(exc)

        threads = [threading.Thread(target=call) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        errors = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert len(errors) == 1 and len(results) == 2
        assert errors[0].response.headers["retry-after"] == "3"
        error = errors[0].response.json()["error"]
        assert error["message"] == "insufficient computing power, try again later"
        assert error["code"] == "insufficient_capacity"
        counters = stats(url)
        assert counters["rejected_429"] == 1 and counters["completed"] == 1


def test_a_queued_request_waits_for_a_slot() -> None:
    profile = dataclasses.replace(QUICK, slots=1, queue_max=1, queue_wait_max_s=5)
    with running_sim(profile) as url:
        replies: list[object] = []
        threads = [
            threading.Thread(
                target=lambda: replies.append(
                    sdk(url).chat.completions.create(model="m", messages=USER, max_tokens=20)
                )
            )
            for _ in range(2)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed_s = time.monotonic() - started
        assert len(replies) == 2 and stats(url)["rejected_429"] == 0
        assert elapsed_s >= 0.15  # 2 x 20 tokens at 200 tokens/s, one after the other


def test_capacity_is_shared_between_concurrent_streams() -> None:
    profile = dataclasses.replace(
        QUICK, capacity_tokens_per_s=200, max_stream_tokens_per_s=200, ttft_s=0.0
    )
    with running_sim(profile) as url:

        def timed(n: int) -> float:
            started = time.monotonic()
            threads = [
                threading.Thread(
                    target=lambda: sdk(url).chat.completions.create(
                        model="m", messages=USER, max_tokens=40
                    )
                )
                for _ in range(n)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return time.monotonic() - started

        alone_s, shared_s = timed(1), timed(2)
        assert 0.15 <= alone_s < 0.6  # 40 tokens at 200/s (generous bound for busy CI)
        assert shared_s >= 0.33  # each gets 100/s


def test_time_to_first_token_includes_prefill() -> None:
    profile = dataclasses.replace(QUICK, ttft_s=0.1, prefill_tokens_per_s=1000)
    prompt = [{"role": "user", "content": "grid " * 200}]  # ~200 tokens: 0.2 s of prefill
    with running_sim(profile) as url, httpx.Client(base_url=url) as client:
        started = time.monotonic()
        body = {"model": "m", "messages": prompt, "max_tokens": 1, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            next(response.iter_lines())
            first_s = time.monotonic() - started
        assert 0.3 <= first_s < 1.0


def test_peak_hours_cut_capacity() -> None:
    always = dataclasses.replace(QUICK, peak_hours=(0, 24), peak_capacity_factor=0.25)
    never = dataclasses.replace(QUICK, peak_hours=None, peak_capacity_factor=0.25)
    assert always.capacity_now_tokens_per_s() == 2_500
    assert never.capacity_now_tokens_per_s() == 10_000


# --- faults --------------------------------------------------------------------------------------


def chat(client: httpx.Client, **extra: object) -> httpx.Response:
    body = {"model": "m", "messages": USER, "max_tokens": 8, **extra}
    return client.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize(("kind", "status"), [("500", 500), ("503", 503), ("429", 429)])
def test_error_faults_via_the_body_field(http: httpx.Client, kind: str, status: int) -> None:
    response = chat(http, sim_fault=kind)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert ("retry-after" in response.headers) == (status != 500)
    assert chat(http).status_code == 200  # the body field affects that request only


def test_queued_faults_hit_the_next_requests_then_stop(http: httpx.Client) -> None:
    before = http.get("/sim/stats").json()["faults"].get("503", 0)
    assert http.post("/sim/faults", json={"kind": "503", "count": 2}).status_code == 200
    assert [chat(http).status_code for _ in range(3)] == [503, 503, 200]
    assert http.get("/sim/stats").json()["faults"]["503"] == before + 2
    http.post("/sim/faults", json={"kind": "500", "count": 5})
    assert http.delete("/sim/faults").json() == {"cleared": 5}
    assert chat(http).status_code == 200
    assert http.post("/sim/faults", json={"kind": "bogus"}).status_code == 400


def test_overcount_fault_reports_more_input_than_was_sent(http: httpx.Client) -> None:
    from tokenworks.sim.profile import OVERCOUNT_FACTOR

    honest = chat(http).json()["usage"]
    inflated = chat(http, sim_fault="overcount").json()["usage"]
    assert inflated["prompt_tokens"] == honest["prompt_tokens"] * OVERCOUNT_FACTOR
    assert inflated["completion_tokens"] == honest["completion_tokens"]
    embedding = {"model": "e", "input": "grid report", "sim_fault": "overcount"}
    honest_e = http.post("/v1/embeddings", json={**embedding, "sim_fault": None}).json()["usage"]
    inflated_e = http.post("/v1/embeddings", json=embedding).json()["usage"]
    assert inflated_e["prompt_tokens"] == honest_e["prompt_tokens"] * OVERCOUNT_FACTOR


def test_timeout_fault_hangs_until_the_client_gives_up(instant_url: str) -> None:
    with httpx.Client(base_url=instant_url, timeout=0.3) as client:
        before = stats(instant_url)["cancelled"]
        with pytest.raises(httpx.ReadTimeout):
            chat(client, sim_fault="timeout")
    assert wait_for(lambda: stats(instant_url)["cancelled"] == before + 1)


def test_cut_fault_drops_the_connection(http: httpx.Client) -> None:
    lines: list[str] = []
    body = {"model": "m", "messages": USER, "max_tokens": 8, "stream": True, "sim_fault": "cut"}
    with (
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        lines.extend(response.iter_lines())
    events = sse_events(iter(lines))
    assert len(events) > 1 and "[DONE]" not in events
    with pytest.raises(httpx.RemoteProtocolError):
        chat(http, sim_fault="cut")


def test_malformed_fault(http: httpx.Client) -> None:
    streamed = chat(http, stream=True, sim_fault="malformed")
    events = sse_events(iter(streamed.text.splitlines()))
    assert events[-1] == "[DONE]"
    broken = []
    for event in events[:-1]:
        try:
            json.loads(event)
        except json.JSONDecodeError:
            broken.append(event)
    assert len(broken) == 1
    tiny = sse_events(
        iter(chat(http, stream=True, sim_fault="malformed", max_tokens=1).text.splitlines())
    )
    assert tiny[0].count('"role"') == 1 and "oops" in tiny[1]  # role chunk first, then the bad one
    assert sum('"role"' in e for e in tiny) == 1 and sum('"content":"' in e for e in tiny) == 3
    plain = chat(http, sim_fault="malformed")
    assert plain.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain.text)


def test_no_usage_fault_never_reports_usage(http: httpx.Client) -> None:
    before = http.get("/sim/stats").json()
    streamed = chat(http, stream=True, stream_options={"include_usage": True}, sim_fault="no_usage")
    plain = chat(http, sim_fault="no_usage")
    after = http.get("/sim/stats").json()
    assert '"usage"' not in streamed.text and streamed.text.endswith("data: [DONE]\n\n")
    assert "usage" not in plain.json() and plain.json()["choices"][0]["message"]["content"]
    assert after["completion_tokens_reported"] == before["completion_tokens_reported"]
    assert after["completion_tokens_sent"] == before["completion_tokens_sent"] + 16


def test_slow_first_byte_fault(http: httpx.Client) -> None:
    started = time.monotonic()
    response = chat(http, sim_fault="slow_first_byte", sim_delay_s=0.3)
    assert response.status_code == 200 and time.monotonic() - started >= 0.3


def test_every_fault_kind_is_known() -> None:
    assert {"500", "503", "429", "timeout", "cut", "malformed", "no_usage"} <= FAULT_KINDS
    with pytest.raises(ValueError, match="unknown fault kinds"):
        SimProfile(name="x", fault_kinds=("explode",))


def test_flaky_profile_fails_a_seeded_share_of_requests() -> None:
    profile = dataclasses.replace(PROFILES["instant"], fault_rate=0.5, fault_kinds=("500",))
    with running_sim(profile) as url, httpx.Client(base_url=url) as client:
        codes = [chat(client).status_code for _ in range(40)]
        assert set(codes) == {200, 500}
        assert stats(url)["faults_total"] == codes.count(500)
    with running_sim(profile) as url, httpx.Client(base_url=url) as client:
        assert [chat(client).status_code for _ in range(40)] == codes  # same seed, same faults


# --- stats ---------------------------------------------------------------------------------------


def test_stats_count_usage_and_a_client_disconnect_as_cancelled() -> None:
    profile = dataclasses.replace(QUICK, max_stream_tokens_per_s=50)
    with running_sim(profile) as url, httpx.Client(base_url=url) as client:
        body = {"model": "m", "messages": USER, "max_tokens": 200, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            seen = sse_events(line for line, _ in zip(lines, range(8), strict=False))
            assert seen  # got a few chunks, then hang up
        assert wait_for(lambda: stats(url)["cancelled"] == 1)
        counters = stats(url)
        assert 0 < counters["completion_tokens_sent"] < 200
        assert counters["completion_tokens_reported"] == 0
        assert counters["active"] == 0 and counters["decoding"] == 0

        sdk(url).chat.completions.create(model="m", messages=USER, max_tokens=5)
        counters = stats(url)
        assert counters["completed"] == 1 and counters["completion_tokens_reported"] == 5
        assert counters["requests"] == {"chat.completions": 2}
        assert client.post("/sim/reset").status_code == 200
        assert stats(url)["requests_total"] == 0 and stats(url)["completed"] == 0


def test_serve_rejects_an_unknown_profile() -> None:
    assert serve("127.0.0.1", 0, "no-such-profile") == 2
