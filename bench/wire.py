"""Per-request cost of the wire translations (issue 11: <= 0.2 ms p50 over pass-through).

One "request" is what a translating route does in-process for one call: translate the request
body, then split and translate every upstream SSE event of the answer (or the whole response
body). The pass-through baseline splits the same upstream bytes, reads and decodes each
event's data and splices the model name (what the relay's pass-through does anyway). Upstream
bytes are recorded provider streams from tests/wire/fixtures, replayed from memory.

    .venv/bin/python bench/wire.py [--runs 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import yaml

from tokenworks.wire import anthropic, responses
from tokenworks.wire.openai import MODEL_FIELD
from tokenworks.wire.sse import SSESplitter, data_of

_decode = msgspec.json.decode
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "wire" / "fixtures"


def _cassette(name: str) -> list[dict]:
    return yaml.safe_load((FIXTURES / name).read_text())["interactions"]


def _sse(name: str) -> bytes:
    if name.endswith(".txt"):
        raw = (FIXTURES / name).read_bytes()
    else:
        raw = _cassette(name)[0]["response"]["body"]["string"].encode()
    return raw if raw.endswith(b"\n\n") else raw.rstrip(b"\n") + b"\n\n"


def _long_text_stream(chunks: int) -> bytes:
    """A text answer of `chunks` one-token deltas in the recorded chunk shape of gpt-4o."""
    recorded = [f for f in SSESplitter().feed(_sse("openai_chat_text_stream.txt"))]
    head, delta, finish, usage = recorded[0], recorded[1], recorded[-3], recorded[-2]
    body = json.loads(data_of(delta) or b"{}")
    body["choices"][0]["logprobs"] = None
    events = [head]
    for n in range(chunks):
        body["choices"][0]["delta"] = {"content": f" tok{n}"}
        events.append(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")
    return b"".join([*events, finish, usage, b"data: [DONE]\n\n"])


def _pieces(raw: bytes, piece_bytes: int = 512) -> list[bytes]:
    # Upstream reads arrive in network-sized pieces, not one event each.
    return [raw[i : i + piece_bytes] for i in range(0, len(raw), piece_bytes)]


def _pass_through(pieces: list[bytes]) -> None:
    """What the relay does to each event it passes through: split, read the data, decode it
    (for usage and the texts an estimate would count), splice the model name."""
    splitter = SSESplitter()
    for piece in pieces:
        for frame in splitter.feed(piece):
            data = data_of(frame)
            if data is not None and data != b"[DONE]":
                _decode(data)
                MODEL_FIELD.sub(b'"model":"public"', frame, count=1)


def _translated(pieces: list[bytes], stream: Any) -> None:
    """What the relay does to each event it translates: split, read the data, decode it once
    (for usage and texts), and hand the decoded event to the translator."""
    splitter = SSESplitter()
    for piece in pieces:
        for frame in splitter.feed(piece):
            data = data_of(frame)
            if data is None:
                continue
            if data == b"[DONE]":
                stream.feed_sse(frame)
            else:
                stream.feed_decoded(_decode(data))


def _p50_us(fn: Callable[[], object], runs: int) -> float:
    for _ in range(min(200, runs)):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2000)
    runs = parser.parse_args().runs

    messages_body = _cassette("anthropic_tool_use.yaml")[1]["request"]["parsed_body"]
    messages_body = dict(messages_body, system="You are a careful assistant.", stream=True)
    responses_body = _cassette("responses_stream.yaml")[1]["request"]["parsed_body"]
    chat_body = anthropic.messages_request_to_chat(messages_body)
    chat_answer = _cassette("openai_chat_tool_calls.yaml")[0]["response"]["parsed_body"]
    claude_stream = _pieces(_sse("anthropic_thinking_stream.yaml"))

    streams = {
        "tools, 25 chunks": _pieces(_sse("openai_chat_parallel_tools_stream.txt")),
        "text, 200 chunks": _pieces(_long_text_stream(200)),
    }

    def messages_route(pieces: list[bytes]) -> Callable[[], object]:
        def run() -> None:
            anthropic.messages_request_to_chat(messages_body)
            _translated(pieces, anthropic.ChatToMessagesStream("claude"))

        return run

    def responses_route(pieces: list[bytes]) -> Callable[[], object]:
        def run() -> None:
            responses.responses_request_to_chat(responses_body)
            _translated(pieces, responses.ChatToResponsesStream(responses_body))

        return run

    def chat_on_claude() -> None:
        anthropic.chat_request_to_messages(chat_body)
        _translated(claude_stream, anthropic.MessagesToChatStream())

    print(f"p50 per request, {runs} runs, microseconds (both include the SSE split and decode)")
    print(f"{'path':<48}{'translated':>12}{'pass-through':>14}{'added':>10}")
    rows = []
    for label, pieces in streams.items():
        base = _p50_us(lambda pieces=pieces: _pass_through(pieces), runs)
        rows.append(
            (
                f"/v1/messages on chat producer ({label})",
                _p50_us(messages_route(pieces), runs),
                base,
            )
        )
        rows.append(
            (
                f"/v1/responses on chat producer ({label})",
                _p50_us(responses_route(pieces), runs),
                base,
            )
        )
    base = _p50_us(lambda: _pass_through(claude_stream), runs)
    rows.append(
        ("/v1/chat/completions on Claude (thinking, 100 ev.)", _p50_us(chat_on_claude, runs), base)
    )
    plain = _p50_us(lambda: anthropic.chat_response_to_messages(chat_answer), runs)
    rows.append(("non-streaming chat answer -> Messages", plain, 0.0))
    for label, translated, base in rows:
        print(f"{label:<48}{translated:>12.1f}{base:>14.1f}{translated - base:>10.1f}")


if __name__ == "__main__":
    main()
