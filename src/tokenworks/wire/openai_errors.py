"""The OpenAI error shape: `{"error": {"message", "type", "param", "code"}}`.

Both the API layer (every error response) and the relay (an error event inside a stream it
already started) write it, so it lives here, below both.
"""

from __future__ import annotations

import re

import msgspec

# status -> the `type` OpenAI uses for it; the official SDKs pick their exception class by it
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error")


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> bytes:
    return msgspec.json.encode(
        {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
    )


def faithful_body(
    body: bytes, upstream_model: str | None, public_model: str | None
) -> bytes | None:
    """An upstream's error body as the client gets it: a JSON object passes as sent (code,
    param, type and fields of its own), only the upstream model's name replaced by the public
    one wherever it stands as a whole name; None when the body is not a JSON object."""
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    if upstream_model and public_model and upstream_model != public_model:
        old = msgspec.json.encode(upstream_model)[1:-1]
        new = msgspec.json.encode(public_model)[1:-1]
        # Not inside a longer name: `gpt-4o` must not rename part of `gpt-4o-mini`.
        name = re.compile(rb"(?<![\w.\-/:])" + re.escape(old) + rb"(?![\w.\-/:])")
        body = name.sub(lambda _: new, body)
    return body
