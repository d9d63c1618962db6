"""A tiny upstream on 127.0.0.1 that answers every POST with one recorded response.

For provider answers the sim does not make (recorded real ones: tests/wire/fixtures), so they
travel through the gateway over real HTTP exactly as the provider sent them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml

from tokenworks.server import serve_in_thread

FIXTURES = Path(__file__).resolve().parent.parent / "wire" / "fixtures"
# Hop-by-hop and framing headers of the recording: the replay server sets its own.
_DROPPED = frozenset({"content-length", "transfer-encoding", "connection", "content-encoding"})


@dataclass
class Recorded:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    requests: list[bytes] = field(default_factory=list)  # the bodies the upstream was sent
    # The headers of each request, names in lower case.
    request_headers: list[dict[str, str]] = field(default_factory=list)


def cassette(name: str, index: int = 0) -> Recorded:
    """Interaction `index` of a VCR cassette: its response's status, headers and body."""
    data = yaml.safe_load((FIXTURES / name).read_text())
    response = data["interactions"][index]["response"]
    if "parsed_body" in response:
        body = msgspec.json.encode(response["parsed_body"])
    else:
        body = response["body"]["string"].encode()
    headers = [
        (name, value)
        for name, values in response["headers"].items()
        if name.lower() not in _DROPPED
        for value in values
    ]
    return Recorded(response["status"]["code"], headers, body)


class _App:
    def __init__(self, recorded: Recorded) -> None:
        self.recorded = recorded

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        body = b""
        for _ in range(10_000):  # bounded: a request body of at most 10,000 parts
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.recorded.requests.append(body)
        self.recorded.request_headers.append(
            {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        )
        headers = [(k.encode(), v.encode()) for k, v in self.recorded.headers]
        await send({"type": "http.response.start", "status": self.recorded.status,
                    "headers": headers})  # fmt: skip
        await send({"type": "http.response.body", "body": self.recorded.body})


@contextlib.contextmanager
def replaying(recorded: Recorded) -> Iterator[str]:
    """Serve `recorded` to every request; yields the base URL (without /v1)."""
    with serve_in_thread(_App(recorded)) as url:
        yield url
