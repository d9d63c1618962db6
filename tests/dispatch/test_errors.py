"""What a client is told when no deployment served it: the upstream's own 4xx, renamed only
where it names the upstream model; the gateway's credentials as a 502; headers alongside."""

from __future__ import annotations

import msgspec
import pytest

from tokenworks.dispatch.errors import (
    UpstreamAtCapacity,
    UpstreamBroken,
    UpstreamCredentials,
    UpstreamRejected,
    from_upstream,
)
from tokenworks.producers.openai_compat import RETRYABLE_STATUSES, UpstreamError
from tokenworks.wire.openai_errors import faithful_body


def upstream(status: int, body: bytes = b"", **kw: object) -> UpstreamError:
    return UpstreamError(
        "groq",
        f"status_{status}",
        f"upstream answered {status}",
        status=status,
        retryable=status in RETRYABLE_STATUSES or status in (401, 403),
        body=body,
        **kw,  # type: ignore[arg-type]
    )


def test_only_whole_upstream_model_names_are_renamed() -> None:
    body = b'{"error":{"message":"gpt-4o is not gpt-4o-mini nor my-gpt-4o","code":"x"}}'
    out = faithful_body(body, "gpt-4o", "chat")
    assert out == b'{"error":{"message":"chat is not gpt-4o-mini nor my-gpt-4o","code":"x"}}'
    assert faithful_body(body, "gpt-4o", "gpt-4o") == body
    assert faithful_body(b"<html>bad gateway</html>", "m", "p") is None
    assert faithful_body(b"[1, 2]", "m", "p") is None


def test_a_4xx_with_a_json_body_passes_as_sent() -> None:
    body = b'{"error":{"message":"no","type":"invalid_request_error","param":"x","code":"y"}}'
    error = from_upstream(upstream(400, body), "m", "p")
    assert isinstance(error, UpstreamRejected)
    assert (error.status, error.raw, error.message) == (400, body, "no")
    # vLLM's and FastAPI's shapes: a message at the top, or an error that is a string
    vllm = from_upstream(upstream(400, b'{"object":"error","message":"too long","code":400}'))
    assert vllm.message == "too long" and vllm.raw is not None
    assert from_upstream(upstream(422, b'{"error":"bad"}')).message == "bad"


def test_a_429_passes_as_sent_when_its_body_is_json_else_it_is_ours() -> None:
    body = msgspec.json.encode({"error": {"code": "rate_limit_exceeded"}})
    headers = [(b"retry-after-ms", b"200")]
    passed = from_upstream(upstream(429, body, headers=headers, retry_after="1"))
    assert isinstance(passed, UpstreamRejected) and passed.status == 429
    assert passed.headers == {"retry-after-ms": "200"}
    ours = from_upstream(upstream(429, b"busy", retry_after="1"))
    assert isinstance(ours, UpstreamAtCapacity) and ours.code == "upstream_capacity"
    assert ours.headers == {"retry-after": "1"}


@pytest.mark.parametrize("status", [401, 403])
def test_the_gateways_own_credentials_are_a_502_not_the_clients_401(status: int) -> None:
    error = from_upstream(upstream(status, b'{"error":{"code":"invalid_api_key"}}'))
    assert isinstance(error, UpstreamCredentials)
    assert (error.status, error.code, error.raw) == (502, "upstream_credentials", None)
    assert "producer 'groq'" in error.message
    assert error.headers["x-should-retry"] == "false"


def test_a_5xx_stays_the_gateways_own_502() -> None:
    error = from_upstream(upstream(500, b'{"error":{"message":"boom"}}'))
    assert isinstance(error, UpstreamBroken) and error.raw is None and error.status == 502
