"""A small closed-loop HTTP/1.1 load generator for the benchmark (asyncio, raw keep-alive sockets).

N workers each hold one keep-alive connection and send the same pre-encoded request in a loop
until the run's request count is issued or its time limit passes, whichever comes first; a
watchdog cancels whatever is still in flight at the limit plus a grace period, so every loop is
bounded. It speaks just enough HTTP/1.1 for the benchmark's answers (Content-Length bodies and
chunked streams) so that its own cost per request stays far below aiohttp's or httpx's: on a
shared core, the load generator's cost is part of every figure.

Each request records its full latency (request written -> last body byte) and, for streams,
its time to first byte (request written -> first body chunk).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

GRACE_S = 5.0  # requests still in flight this long after the time limit are cut and counted


@dataclass(slots=True)
class Result:
    concurrency: int
    requests: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    ttfb_s: list[float] = field(default_factory=list)
    first_error: str | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        return percentile(self.latencies_s, q) * 1000

    def ttfb_ms(self, q: float) -> float:
        return percentile(self.ttfb_s, q) * 1000


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank on sorted values; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def build_request(host: str, port: int, path: str, body: bytes, token: str | None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _BadResponse(Exception):
    pass


_STREAM_ENDS = (b"[DONE]", b"message_stop", b'"response.completed"', b'"response.incomplete"')


def _stream_ended(tail: bytes) -> bool:
    """A chat stream's `[DONE]`, a Messages `message_stop`, a Responses final event."""
    return any(end in tail for end in _STREAM_ENDS)


async def _one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, stream: bool
) -> tuple[float, float | None, bool]:
    """Send one request, read its whole answer; (latency_s, ttfb_s, keep_alive)."""
    t0 = time.perf_counter()
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = head[9:12]
    if status != b"200":
        raise _BadResponse(f"status {status.decode(errors='replace')}: {head[:200]!r}")
    lower = head.lower()
    keep_alive = b"connection: close" not in lower
    ttfb: float | None = None
    start = lower.find(b"content-length:")
    if start >= 0:
        end = lower.index(b"\r\n", start)
        body = await reader.readexactly(int(lower[start + 15 : end]))
        if stream:
            ttfb = time.perf_counter() - t0
            if not _stream_ended(body):
                raise _BadResponse("stream without its end event")
        elif b'"choices"' not in body and b'"content"' not in body and b'"output"' not in body:
            raise _BadResponse(f"no answer in {body[:200]!r}")
        return time.perf_counter() - t0, ttfb, keep_alive
    if b"transfer-encoding: chunked" not in lower:
        raise _BadResponse(f"neither length nor chunked: {head[:200]!r}")
    last = b""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers: the blank line
            break
        chunk = await reader.readexactly(size + 2)
        if ttfb is None:
            ttfb = time.perf_counter() - t0
        last = chunk
    if stream and not _stream_ended(last):
        raise _BadResponse(f"stream did not end with its end event: {last[-200:]!r}")
    if not stream and ttfb is None:
        raise _BadResponse("empty body")
    return time.perf_counter() - t0, ttfb, keep_alive


async def run(
    host: str,
    port: int,
    request: bytes,
    *,
    stream: bool,
    concurrency: int,
    max_requests: int,
    duration_s: float,
) -> Result:
    """Closed loop: `concurrency` workers until `max_requests` are issued or `duration_s` ends."""
    result = Result(concurrency=concurrency)
    issued = 0
    t_start = time.perf_counter()
    deadline = t_start + duration_s

    async def worker() -> None:
        nonlocal issued
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                try:
                    latency, ttfb, keep_alive = await _one(reader, writer, request, stream)
                except (_BadResponse, OSError, ValueError, asyncio.IncompleteReadError) as exc:
                    result.errors += 1
                    if result.first_error is None:
                        result.first_error = f"{type(exc).__name__}: {exc}"
                    keep_alive = False
                else:
                    result.requests += 1
                    result.latencies_s.append(latency)
                    if ttfb is not None and stream:
                        result.ttfb_s.append(ttfb)
                if not keep_alive:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=duration_s + GRACE_S)
    for task in pending:
        task.cancel()
    result.errors += len(pending)
    if pending and result.first_error is None:
        result.first_error = f"{len(pending)} workers still busy after the grace period"
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        exc = task.exception()
        if exc is not None:
            result.errors += 1
            if result.first_error is None:
                result.first_error = f"worker failed: {type(exc).__name__}: {exc}"
    result.elapsed_s = time.perf_counter() - t_start
    return result
