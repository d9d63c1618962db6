"""Which upstream headers a client sees, and under what name."""

from __future__ import annotations

from tokenworks.wire.headers import (
    MAX_FORWARDED_VALUE_BYTES,
    MAX_PASSED_HEADERS,
    anthropic_forwarded,
    as_dict,
    passthrough,
)


def test_headers_pass_renamed_or_not_at_all() -> None:
    raw = [
        (b"Content-Type", b"application/json"),
        (b"Retry-After-Ms", b"200"),
        (b"retry-after", b"1"),
        (b"X-Request-Id", b"req_up"),
        (b"request-id", b"req_anthropic"),
        (b"openai-processing-ms", b"7"),
        (b"X-RateLimit-Remaining-Requests", b"499"),
        (b"anthropic-ratelimit-requests-limit", b"50"),
        (b"openai-organization", b"org-gateway"),
        (b"set-cookie", b"secret"),
        (b"x-should-retry", b"false"),
        (b"x-ratelimit-limit-tokens", b"x" * 300),  # past the value bound
    ]
    assert passthrough(raw) == [
        (b"retry-after-ms", b"200"),
        (b"retry-after", b"1"),
        (b"x-upstream-request-id", b"req_up"),
        (b"x-upstream-request-id", b"req_anthropic"),
        (b"openai-processing-ms", b"7"),
        (b"x-upstream-ratelimit-remaining-requests", b"499"),
        (b"x-upstream-ratelimit-requests-limit", b"50"),
        (b"x-should-retry", b"false"),
    ]
    assert as_dict(passthrough(raw))["x-upstream-request-id"] == "req_up"  # the first


def test_an_upstream_cannot_make_us_copy_unbounded_headers() -> None:
    raw = [(b"x-ratelimit-n%d" % i, b"1") for i in range(1000)]
    assert len(passthrough(raw)) == MAX_PASSED_HEADERS


def test_only_anthropic_beta_and_version_go_on_and_a_runaway_value_does_not() -> None:
    client = {
        "anthropic-beta": "a,b",
        "anthropic-version": "2023-06-01",
        "x-api-key": "sk-client",
        "anthropic-dangerous-direct-browser-access": "true",
    }
    assert anthropic_forwarded(client) == {
        "anthropic-beta": "a,b",
        "anthropic-version": "2023-06-01",
    }
    assert anthropic_forwarded({"x-api-key": "sk-client"}) is None
    too_long = "b" * (MAX_FORWARDED_VALUE_BYTES + 1)
    assert anthropic_forwarded({"anthropic-beta": too_long}) is None
