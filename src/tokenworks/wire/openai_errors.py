"""The OpenAI error shape: `{"error": {"message", "type", "param", "code"}}`.

Both the API layer (every error response) and the relay (an error event inside a stream it
already started) write it, so it lives here, below both.
"""

from __future__ import annotations

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
