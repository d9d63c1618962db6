"""A kept-alive upstream connection closed as the gateway reuses it is not a failed request."""

from __future__ import annotations

import asyncio

import pytest

from tokenworks.config import Producer
from tokenworks.producers.openai_compat import OpenAIProducer, UpstreamError

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def _read_request(reader: asyncio.StreamReader) -> bool:
    """One request's head and body; False at the end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return False
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return True


async def _upstream(close_after: int | None) -> tuple[asyncio.Server, list[int]]:
    """Answers `close_after` requests per connection, then closes it on the next one
    unanswered: the race of an idle timeout, made certain (None: closes every connection
    at once, answering nothing)."""
    served: list[int] = []  # requests answered, per connection

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(0)
        n = len(served) - 1
        while await _read_request(reader):
            if close_after is None or served[n] >= close_after:
                break
            writer.write(OK)
            await writer.drain()
            served[n] += 1
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), served


async def _post_twice(close_after: int | None) -> tuple[list[int], list[object]]:
    server, served = await _upstream(close_after)
    port = server.sockets[0].getsockname()[1]
    producer = OpenAIProducer(Producer(name="up", base_url=f"http://127.0.0.1:{port}"))
    await producer.start()
    results: list[object] = []
    try:
        for _ in range(2):
            try:
                response = await producer.post("/v1/chat/completions", b'{"model": "m"}')
                results.append(await response.read())
                response.release()
            except UpstreamError as exc:
                results.append(exc)
    finally:
        await producer.close()
        server.close()
        await server.wait_closed()
    return served, results


def test_a_closed_kept_alive_connection_is_retried_once_on_a_new_one() -> None:
    served, results = asyncio.run(_post_twice(close_after=1))
    assert results == [b"{}", b"{}"]
    assert served == [1, 1]  # the second request went out again, on a second connection


def test_an_upstream_that_closes_every_connection_is_still_unreachable() -> None:
    served, results = asyncio.run(_post_twice(close_after=None))
    assert all(isinstance(r, UpstreamError) and r.reason == "connect" for r in results), results
    assert len(served) == 4  # each request tried twice, never more


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
