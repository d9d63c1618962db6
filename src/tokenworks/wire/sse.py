"""Server-sent events, split without rewriting.

`SSESplitter` cuts an upstream byte stream into whole events and hands each one back as the
exact bytes it arrived as (LF, CRLF or CR line ends, comments, `event:`/`id:`/`retry:` lines
included), so a pass-through route can forward an event unchanged and still look inside it.
Joining everything it returns, plus `rest()`, gives back the input byte for byte.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

# An event ends at an empty line. With the three line ends the spec allows, the empty line
# after a line shows as one of these byte pairs/quads; the earliest one wins.
_TERMINATORS = (b"\r\n\r\n", b"\n\n", b"\r\r", b"\n\r\n", b"\r\n\n", b"\r\r\n")


@dataclass(slots=True)
class SSEFields:
    """The fields of one event that consumers read; comments and unknown fields are skipped."""

    event: str | None
    data: str | None  # data lines joined with "\n"; None when the event had no data line
    id: str | None = None
    retry_ms: int | None = None


class SSEError(Exception):
    """A stream that cannot be split into events: one too large, or one cut off at the end."""


class SSESplitter:
    """Incremental splitter: `feed` bytes in, get back the complete events seen so far."""

    __slots__ = ("_buffer", "_max_event_bytes")

    def __init__(self, max_event_bytes: int = 8 * 1024 * 1024) -> None:
        self._buffer = b""
        # Bounded: an upstream that never ends an event must not grow memory without limit.
        self._max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[bytes] = []
        start = 0
        while True:
            end = _event_end(buffer, start)
            if end < 0:
                break
            events.append(buffer[start:end])
            start = end
        self._buffer = buffer[start:] if start < len(buffer) else b""
        if len(self._buffer) > self._max_event_bytes:
            raise ValueError(f"an SSE event exceeds {self._max_event_bytes} bytes")
        return events

    def rest(self) -> bytes:
        """Bytes after the last complete event (an unterminated tail at the end of a stream)."""
        rest, self._buffer = self._buffer, b""
        return rest


def _event_end(buffer: bytes, start: int, final: bool = False) -> int:
    """Index just past the first complete event at or after `start`, or -1. `final`: the
    stream has ended, so a trailing CR is not the first half of a CRLF still to come."""
    if buffer.find(b"\r", start) < 0:  # the common LF-only stream: one search
        at = buffer.find(b"\n\n", start)
        return -1 if at < 0 else at + 2
    best_at = -1
    best_end = -1
    for terminator in _TERMINATORS:
        at = buffer.find(terminator, start)
        if at < 0:
            continue
        end = at + len(terminator)
        # The earliest empty line wins; at the same place the longest match, so a CRLF stream
        # is never cut between its CR and its LF.
        if best_at < 0 or at < best_at or (at == best_at and end > best_end):
            best_at, best_end = at, end
    if best_end == len(buffer) and buffer[best_end - 1] == 0x0D and not final:
        return -1  # a trailing CR may be the first half of a CRLF still in flight
    return best_end


class FrameReader:
    """Reads an upstream's stream as whole events, each the exact bytes it came as (its blank
    line included), bounded in size: what a pass-through route forwards unchanged.

    The hot path of every stream, so it keeps its own buffer rather than `SSESplitter`'s
    lists: one `find` per event while the stream has shown no CR (the common LF stream), the
    splitter's full rule once it has. `read` gives the next bytes the upstream sent, b"" at
    its end."""

    __slots__ = ("_buffer", "_cr", "_eof", "_max_event_bytes", "_read", "_start")

    def __init__(self, read: Callable[[], Awaitable[bytes]], max_event_bytes: int) -> None:
        self._read = read
        self._max_event_bytes = max_event_bytes
        self._buffer = b""
        self._start = 0  # where the next event begins in the buffer
        self._cr = False  # a CR was seen: CRLF or CR line ends are possible
        self._eof = False

    def buffered(self) -> bytes | None:
        """The next whole event if one is already here; never waits."""
        buffer, start = self._buffer, self._start
        if self._cr:
            end = _event_end(buffer, start)
        else:
            at = buffer.find(b"\n\n", start)
            end = at + 2 if at >= 0 else -1
        if end < 0:
            return None
        self._start = end
        return buffer[start:end]

    async def next(self) -> bytes | None:
        """The next whole event; None at a clean end. Raises SSEError for an event past the
        bound or one the stream ended inside."""
        while True:
            buffer, start = self._buffer, self._start
            if self._cr:
                end = _event_end(buffer, start)
            else:  # `buffered`, inlined: this is once per event of every stream
                at = buffer.find(b"\n\n", start)
                end = at + 2 if at >= 0 else -1
            if end >= 0:
                self._start = end
                return buffer[start:end]
            rest = buffer[start:]
            if self._eof:
                if not rest.strip():
                    return None
                # A trailing CR waited for an LF that will not come now: it ends the event.
                end = _event_end(buffer, start, final=True)
                if end < 0:
                    raise SSEError("stream ended inside an event")
                self._start = end
                return buffer[start:end]
            if len(rest) > self._max_event_bytes:
                raise SSEError("event too large")
            chunk = await self._read()
            if not chunk:
                self._eof = True
                continue
            if not self._cr and b"\r" in chunk:
                self._cr = True
            self._buffer, self._start = rest + chunk, 0


def parse_event(frame: bytes) -> SSEFields:
    """The fields of one event as the SSE spec reads them (any line end; leading space cut)."""
    event: str | None = None
    data_lines: list[str] | None = None
    event_id: str | None = None
    retry_ms: int | None = None
    text = frame.decode("utf-8", errors="replace")
    for line in text.splitlines():
        if not line or line[0] == ":":
            continue
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if name == "data":
            if data_lines is None:
                data_lines = [value]
            else:
                data_lines.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            event_id = value
        elif name == "retry" and value.isdigit():
            retry_ms = int(value)
    data = None if data_lines is None else "\n".join(data_lines)
    return SSEFields(event=event, data=data, id=event_id, retry_ms=retry_ms)


def data_of(frame: bytes) -> bytes | None:
    """The data of a one-`data:`-line event, fast; falls back to `parse_event` otherwise.

    Upstream JSON events carry one data line; this path avoids decoding the frame to text.
    """
    # The common frame, `data: {...}\n\n` in LF framing: three C calls.
    if frame.startswith(b"data: ") and frame.endswith(b"\n\n"):
        end = len(frame) - 2
        if frame.find(b"\n", 6) == end and frame[end - 1] != 0x0D:
            return frame[6:end]
    at = frame.find(b"data:")
    if at < 0:
        return None
    if at and frame[at - 1] not in (0x0A, 0x0D):
        fields = parse_event(frame)
        return None if fields.data is None else fields.data.encode()
    begin = at + 5
    if frame[begin : begin + 1] == b" ":
        begin += 1
    end = frame.find(b"\n", begin)
    if end < 0:
        end = len(frame)
    cr = frame.find(b"\r", begin, end)
    if cr >= 0:
        end = cr
    if frame.find(b"data:", end) >= 0:  # several data lines: join them as the spec says
        fields = parse_event(frame)
        return None if fields.data is None else fields.data.encode()
    return frame[begin:end]


def encode_event(data: bytes, event: str | None = None) -> bytes:
    """One event in the LF framing our own translated streams use."""
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"
