"""What every wire translation shares: the error for what cannot be said in the other dialect,
JSON through msgspec, and small readers that tolerate upstream sloppiness."""

from __future__ import annotations

from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()

encode = _encoder.encode
decode = _decoder.decode


class Untranslatable(ValueError):
    """A request uses something the target dialect cannot express.

    A route answers it with a 400 in the client's own error shape, naming `param`, before any
    upstream work; it is never a 5xx.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class PreviousResponseUnsupported(Untranslatable):
    """`previous_response_id` needs the stored conversation, which a chat completions producer
    does not keep; only a producer that speaks Responses natively can serve it."""

    def __init__(self) -> None:
        super().__init__(
            "previous_response_id needs a producer that stores responses; this model's producers "
            "speak chat completions only. Send the whole conversation in `input` instead.",
            "previous_response_id",
        )


def as_int(value: Any) -> int:
    """A token count from an upstream, 0 for anything that is not a non-negative int."""
    return value if type(value) is int and value > 0 else 0


def dumps_str(value: Any) -> str:
    return _encoder.encode(value).decode()


def parse_arguments(arguments: Any) -> dict[str, Any]:
    """Tool-call arguments (a JSON string on the OpenAI side) as the object Anthropic wants.

    Models sometimes emit invalid or non-object JSON; the answer was produced and is paid for, so
    it is kept under `_raw_arguments` rather than dropped or turned into an error.
    """
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        parsed = _decoder.decode(arguments)
    except (msgspec.DecodeError, TypeError):
        return {"_raw_arguments": arguments}
    return parsed if isinstance(parsed, dict) else {"_raw_arguments": arguments}


def text_of(content: Any) -> str:
    """The text of a content value that is a string or a list of text-bearing parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict):
            text = part.get("text")
            if isinstance(text, str):
                parts.append(text)
    return "".join(parts)


def plain_text_delta(chunk: dict[str, Any]) -> str | None:
    """The text of a chat chunk that carries nothing but a text delta, else None.

    Most chunks of a stream are exactly this; the stream translators answer them from a
    pre-encoded template instead of building and encoding an event (the translation budget is
    0.2 ms per request, streams included).
    """
    choices = chunk.get("choices")
    if not choices or len(choices) != 1 or chunk.get("usage"):
        return None
    choice = choices[0]
    if choice.get("finish_reason") or choice.get("index", 0) != 0:
        return None
    delta = choice.get("delta")
    if not delta:
        return None
    content = delta.get("content")
    if not content or type(content) is not str:
        return None
    if (
        delta.get("tool_calls")
        or delta.get("reasoning_content")
        or delta.get("reasoning")
        or delta.get("refusal")
    ):
        return None
    return content
