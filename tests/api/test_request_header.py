"""`request_header`: the relay's header lookups read a dict built once per request; it must
answer what Starlette's `request.headers.get` answers."""

from __future__ import annotations

from starlette.requests import Request

from tokenworks.api.openai import request_header

RAW = [
    (b"authorization", b"Bearer tw-first"),
    (b"x-tokenworks-tags", b"team=a"),
    (b"x-tokenworks-tags", b"team=b"),  # repeated: the first one counts
    (b"x-note", "café".encode("latin-1")),
    (b"content-length", b"12"),
]


def _request() -> Request:
    return Request({"type": "http", "method": "POST", "path": "/", "headers": list(RAW)})


def test_request_header_answers_as_starlette_does() -> None:
    request = _request()
    for name in ("authorization", "x-tokenworks-tags", "x-note", "content-length", "absent"):
        assert request_header(request, name.encode()) == request.headers.get(name), name
    assert request_header(request, b"x-tokenworks-tags") == "team=a"
    assert request_header(request, b"x-note") == "café"
    assert request_header(request, b"x-tokenworks-deadline-ms") is None


def test_request_header_is_per_request() -> None:
    first = _request()
    assert request_header(first, b"authorization") == "Bearer tw-first"
    other = Request({"type": "http", "headers": [(b"authorization", b"Bearer tw-other")]})
    assert request_header(other, b"authorization") == "Bearer tw-other"
    assert request_header(other, b"content-length") is None
