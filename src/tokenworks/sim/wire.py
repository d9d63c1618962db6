"""The OpenAI wire format of the sim, built from pre-encoded byte templates.

The hot path concatenates bytes instead of encoding dicts: every stream chunk is a template with
one hole for a word. Field names and order follow the official API (and the `openai` SDK types).
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import sys
from array import array
from dataclasses import dataclass

import msgspec

_encode = msgspec.json.encode

# Each word is one token in o200k_base and cl100k_base, bare and with a leading space, so a text
# made of "w1 w2 w3" counts exactly one token per word (tests/test_sim.py checks this).
_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were their one all we can her has there been if more when "
    "will would who so no token power plant grid cost price credit team agent model time "
    "work data water light energy city river market house world night day year good new "
    "first last long great little own other old right big high small large next early young "
    "important few public bad same sun rain wind fire stone road field tree bird ship train "
    "line book page word paper music voice story game plan test code build run fast slow "
    "open close start end left part place case point group number system program question "
    "government company hand eye life child back"
)
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())
_FIRST_WORDS: tuple[bytes, ...] = tuple(w.encode() for w in WORDS)
_NEXT_WORDS: tuple[bytes, ...] = tuple(b" " + w.encode() for w in WORDS)

SYSTEM_FINGERPRINT = "fp_tokenworks_sim"
DONE = b"data: [DONE]\n\n"


def words_for(seed: int, count: int) -> list[bytes]:
    """`count` one-token words, deterministic in `seed`; the first has no leading space."""
    if count <= 0:
        return []
    rng = random.Random(seed)
    picks = rng.choices(range(len(WORDS)), k=count)
    out = [_NEXT_WORDS[i] for i in picks]
    out[0] = _FIRST_WORDS[picks[0]]
    return out


def seed_of(*parts: str) -> int:
    """A stable 64-bit seed (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    return _encode({"error": {"message": message, "type": type_, "param": param, "code": code}})


@dataclass(slots=True)
class Counts:
    """Token counts of one generation, as reported in `usage`."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int

    def chat_usage(self) -> dict[str, object]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def text_usage(self) -> dict[str, object]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class ChatStream:
    """Byte builders for one chat.completion.chunk stream (one id, model and timestamp)."""

    __slots__ = ("_content", "_head", "_reasoning", "_tail", "_usage_field")

    def __init__(
        self,
        request_id: str,
        created: int,
        model: str,
        include_usage: bool,
        service_tier: str = "default",
    ) -> None:
        self._head = (
            b'data: {"id":"' + request_id.encode() + b'","object":"chat.completion.chunk",'
            b'"created":' + str(created).encode() + b',"model":' + _encode(model) + b","
            b'"service_tier":'
            + _encode(service_tier)
            + b',"system_fingerprint":"'
            + SYSTEM_FINGERPRINT.encode()
            + b'","choices":['
        )
        self._usage_field = b',"usage":null' if include_usage else b""
        self._tail = b"]" + self._usage_field + b"}\n\n"
        self._content = self._head + b'{"index":0,"delta":{"content":"'
        self._reasoning = self._head + b'{"index":0,"delta":{"reasoning_content":"'

    def role(self) -> bytes:
        return (
            self._head + b'{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
            b'"logprobs":null,"finish_reason":null}' + self._tail
        )

    def content(self, word: bytes) -> bytes:
        return self._content + word + b'"},"logprobs":null,"finish_reason":null}' + self._tail

    def reasoning(self, word: bytes) -> bytes:
        return self._reasoning + word + b'"},"logprobs":null,"finish_reason":null}' + self._tail

    def finish(self, reason: str) -> bytes:
        return (
            self._head
            + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"'
            + reason.encode()
            + b'"}'
            + self._tail
        )

    def usage(self, counts: Counts) -> bytes:
        return self._head + b'],"usage":' + _encode(counts.chat_usage()) + b"}\n\n"

    def malformed(self) -> bytes:
        return self._head + b'{"index":0,"delta":{"content":"oops}\n\n'


class TextStream:
    """Byte builders for one legacy text_completion stream."""

    __slots__ = ("_head", "_tail", "_text")

    def __init__(self, request_id: str, created: int, model: str, include_usage: bool) -> None:
        self._head = (
            b'data: {"id":"' + request_id.encode() + b'","object":"text_completion",'
            b'"created":' + str(created).encode() + b',"model":' + _encode(model) + b","
            b'"system_fingerprint":"' + SYSTEM_FINGERPRINT.encode() + b'","choices":['
        )
        self._tail = b"]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"
        self._text = self._head + b'{"text":"'

    def content(self, word: bytes) -> bytes:
        return self._text + word + b'","index":0,"logprobs":null,"finish_reason":null}' + self._tail

    def finish(self, reason: str) -> bytes:
        return (
            self._text
            + b'","index":0,"logprobs":null,"finish_reason":"'
            + reason.encode()
            + b'"}'
            + self._tail
        )

    def usage(self, counts: Counts) -> bytes:
        return self._head + b'],"usage":' + _encode(counts.text_usage()) + b"}\n\n"

    def malformed(self) -> bytes:
        return self._text + b"oops}\n\n"


def chat_body(
    request_id: str,
    created: int,
    model: str,
    content: bytes,
    reasoning: bytes | None,
    finish_reason: str,
    counts: Counts | None,
    service_tier: str = "default",
) -> bytes:
    """A non-stream chat.completion; `counts` None omits usage (the no_usage fault)."""
    message: dict[str, object] = {
        "role": "assistant",
        "content": content.decode(),
        "refusal": None,
        "annotations": [],
    }
    if reasoning is not None:
        message["reasoning_content"] = reasoning.decode()
    body: dict[str, object] = {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
    }
    if counts is not None:
        body["usage"] = counts.chat_usage()
    body["service_tier"] = service_tier
    body["system_fingerprint"] = SYSTEM_FINGERPRINT
    return _encode(body)


def text_body(
    request_id: str,
    created: int,
    model: str,
    text: bytes,
    finish_reason: str,
    counts: Counts | None,
) -> bytes:
    body: dict[str, object] = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {"text": text.decode(), "index": 0, "logprobs": None, "finish_reason": finish_reason}
        ],
    }
    if counts is not None:
        body["usage"] = counts.text_usage()
    return _encode(body)


def embedding_vector(key: bytes, dims: int) -> list[float]:
    """A deterministic unit vector for `key`: same input, same vector, across processes."""
    raw = hashlib.shake_256(key).digest(dims * 2)
    values = [v / 32768.0 for v in array("h", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def embedding_base64(vector: list[float]) -> str:
    """The `encoding_format: base64` form: little-endian float32, as the openai SDK decodes."""
    packed = array("f", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()


def models_body(models: tuple[str, ...], created: int) -> bytes:
    return _encode(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": created, "owned_by": "tokenworks-sim"}
                for m in models
            ],
        }
    )
