"""The sim's raw ASGI app: routing, capacity model, faults and stats.

Raw ASGI rather than Starlette: the `instant` profile is a throughput benchmark target, and the
framework's request/response objects cost more than the work itself. Paced profiles pay for a
disconnect watcher per request, so a client that goes away stops the generation.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import itertools
import logging
import random
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from tokenworks.sim import native, wire
from tokenworks.sim.faults import (
    PROVIDER_HEADERS,
    REWRITING_FAULTS,
    SSE_COMMENT,
    UPSTREAM_ERRORS,
    crlf_framed,
    error_reply,
    rewrite,
    rewrite_body,
    rewrite_event,
)
from tokenworks.sim.profile import (
    FAULT_HELP,
    FAULT_KINDS,
    OVERCOUNT_FACTOR,
    USAGE_FAULTS,
    SimProfile,
)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_decode = msgspec.json.decode
_encode = msgspec.json.encode

MIN_TICK_S = 0.01  # pacing granularity: at most 100 wake-ups per second per stream
MAX_TICK_S = 0.25  # a paced request notices rate changes at least this often
MAX_FAULT_QUEUE = 1_000
MAX_FAULT_COUNT = 1_000_000
INSUFFICIENT_CAPACITY = "insufficient computing power, try again later"
_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_ERROR_FAULTS = frozenset({"500", "503", "429"})
# Faults whose reported usage is not a count to add to the stats (nonsense, or multiplied).
_UNCOUNTED_FAULTS = USAGE_FAULTS | {"no_usage", "choice_flood"}
# Faults that wait on the client connection, so a client that leaves stops them.
_WATCHED_FAULTS = frozenset({"timeout", "slow_first_byte", "stall"})

# Set by a request that closes its connection on purpose (the `cut` fault), so the log filter
# below drops uvicorn's complaint about it for that request only.
_cut_on_purpose: contextvars.ContextVar[bool] = contextvars.ContextVar("sim_cut", default=False)


class _CutLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _cut_on_purpose.get()


def install_log_filter() -> None:
    """Idempotent: keeps uvicorn quiet about connections the sim closes on purpose."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _CutLogFilter) for f in logger.filters):
        logger.addFilter(_CutLogFilter())


class BadRequest(Exception):
    """A request the API refuses with 400; carries the OpenAI error fields."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


# ---------------------------------------------------------------------------------------------
# Token counting: the lead's offline counter when importable, else a documented estimate.


def _estimate_text(text: str, encoding: str = "") -> int:
    return max(1, len(text) // 4)


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _estimate_messages(messages: list[dict[str, object]], encoding: str = "") -> int:
    return 3 + sum(3 + _estimate_text(_content_text(m.get("content"))) for m in messages)


@dataclass(frozen=True, slots=True)
class Counter:
    """How the sim counts prompts; `exact` says whether it is the real tokenizer."""

    text: Callable[[str, str], int]
    messages: Callable[[list[dict[str, object]], str], int]
    encoding_for: Callable[[str], str]
    exact: bool


def load_counter() -> Counter:
    try:
        from tokenworks.metering import tokens

        tokens.count_text("warm up", "o200k_base")
        return Counter(tokens.count_text, tokens.count_messages, tokens.encoding_for, True)
    except Exception:  # no vocabulary or module: usage stays self-consistent, just estimated
        return Counter(_estimate_text, _estimate_messages, lambda model: "", False)


# ---------------------------------------------------------------------------------------------
# State: stats, queued faults, capacity.


class Stats:
    """Counters served by GET /sim/stats; tests compare them with what the gateway billed."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: dict[str, int] = {}
        self.completed = 0
        self.faults: dict[str, int] = {}
        self.rejected_429 = 0
        self.bad_requests = 0
        self.prompt_tokens_reported = 0
        self.cached_tokens_reported = 0
        self.completion_tokens_reported = 0
        self.reasoning_tokens_reported = 0
        self.completion_tokens_sent = 0
        self.cancelled = 0
        self.since_s = time.time()

    def hit(self, endpoint: str) -> None:
        self.requests[endpoint] = self.requests.get(endpoint, 0) + 1

    def fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def reported(self, counts: wire.Counts) -> None:
        self.prompt_tokens_reported += counts.prompt_tokens
        self.cached_tokens_reported += counts.cached_tokens
        self.completion_tokens_reported += counts.completion_tokens
        self.reasoning_tokens_reported += counts.reasoning_tokens

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": dict(self.requests),
            "requests_total": sum(self.requests.values()),
            "completed": self.completed,
            "faults": dict(self.faults),
            "faults_total": sum(self.faults.values()),
            "rejected_429": self.rejected_429,
            "bad_requests": self.bad_requests,
            "prompt_tokens_reported": self.prompt_tokens_reported,
            "cached_tokens_reported": self.cached_tokens_reported,
            "completion_tokens_reported": self.completion_tokens_reported,
            "reasoning_tokens_reported": self.reasoning_tokens_reported,
            "completion_tokens_sent": self.completion_tokens_sent,
            "cancelled": self.cancelled,
            "since_s": self.since_s,
        }


@dataclass(slots=True)
class _QueuedFault:
    kind: str
    remaining: int
    delay_s: float | None


class FaultQueue:
    """Faults queued by POST /sim/faults, served in order to the next model requests."""

    def __init__(self) -> None:
        self._items: deque[_QueuedFault] = deque()

    def push(self, kind: str, count: int, delay_s: float | None) -> None:
        if len(self._items) >= MAX_FAULT_QUEUE:
            raise BadRequest(f"fault queue is full ({MAX_FAULT_QUEUE} entries)", "kind")
        self._items.append(_QueuedFault(kind, count, delay_s))

    def take(self) -> _QueuedFault | None:
        if not self._items:
            return None
        head = self._items[0]
        head.remaining -= 1
        if head.remaining <= 0:
            self._items.popleft()
        return head

    def clear(self) -> int:
        cleared = sum(item.remaining for item in self._items)
        self._items.clear()
        return cleared

    def pending(self) -> list[dict[str, object]]:
        return [dataclasses.asdict(item) for item in self._items]


class Capacity:
    """Slots, a bounded FIFO of waiters, and the decode rate each stream gets right now."""

    def __init__(self, profile: SimProfile) -> None:
        self.profile = profile
        self.active = 0
        self.max_active = 0  # the most requests that held a slot at once since the last reset
        self.decoding = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, watch: Watch | None) -> str:
        """'ok' (a slot is held), 'full' (answer 429) or 'gone' (the client left)."""
        slots = self.profile.slots
        if slots is None or (self.active < slots and not self._waiters):
            self.active += 1
            if self.active > self.max_active:
                self.max_active = self.active
            return "ok"
        if len(self._waiters) >= self.profile.queue_max:
            return "full"
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        waits: set[asyncio.Future[Any]] = {waiter}
        if watch is not None:
            waits.add(watch.task)
        try:
            await asyncio.wait(
                waits, timeout=self.profile.queue_wait_max_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not waiter.done():
                waiter.cancel()
                self._waiters.remove(waiter)
        if waiter.cancelled():
            return "gone" if watch is not None and watch.gone else "full"
        if watch is not None and watch.gone:  # handed a slot just as the client left
            self.release()
            return "gone"
        return "ok"

    def release(self) -> None:
        """Hand the slot to the oldest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1

    def stream_rate_tokens_per_s(self) -> float | None:
        """capacity / decoding streams, capped per stream; None: unlimited."""
        capacity = self.profile.capacity_now_tokens_per_s()
        cap = self.profile.max_stream_tokens_per_s
        if capacity is None:
            return cap
        share = capacity / max(1, self.decoding)
        return share if cap is None else min(share, cap)


class Watch:
    """Watches the ASGI receive channel for http.disconnect while the response is produced."""

    __slots__ = ("task",)

    def __init__(self, receive: Receive) -> None:
        self.task: asyncio.Task[None] = asyncio.ensure_future(self._wait(receive))

    @staticmethod
    async def _wait(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    @property
    def gone(self) -> bool:
        return self.task.done()

    async def sleep(self, delay_s: float) -> bool:
        """Sleep up to `delay_s`; True when the client disconnected."""
        if delay_s > 0 and not self.task.done():
            await asyncio.wait((self.task,), timeout=delay_s)
        return self.task.done()

    def close(self) -> None:
        self.task.cancel()


# ---------------------------------------------------------------------------------------------
# One generation.


@dataclass(slots=True)
class Job:
    """Everything a chat or text completion will produce, decided before any byte is sent."""

    endpoint: str  # "chat" or "text"
    request_id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    counts: wire.Counts
    reasoning: list[bytes]
    content: list[bytes]
    finish_reason: str
    fault: str | None
    fault_delay_s: float | None
    # The tier served, echoed as OpenAI does: "priority"/"flex" when asked for, else "default".
    service_tier: str = "default"

    def stream_builder(self) -> wire.ChatStream | wire.TextStream:
        include_usage = self.include_usage and self.fault != "no_usage"
        cls = wire.ChatStream if self.endpoint == "chat" else wire.TextStream
        if cls is wire.ChatStream:
            return cls(self.request_id, self.created, self.model, include_usage, self.service_tier)
        return cls(self.request_id, self.created, self.model, include_usage)

    def deltas(self, builder: wire.ChatStream | wire.TextStream) -> list[bytes]:
        """One SSE event per output token, reasoning first (as DeepSeek-style APIs stream)."""
        out: list[bytes] = []
        if isinstance(builder, wire.ChatStream):
            out.append(builder.role())
            out.extend(builder.reasoning(w) for w in self.reasoning)
        out.extend(builder.content(w) for w in self.content)
        return out

    @property
    def reported_counts(self) -> wire.Counts:
        """The usage the sim reports: the true counts, unless the fault is `overcount`."""
        if self.fault != "overcount":
            return self.counts
        c = self.counts
        return wire.Counts(
            c.prompt_tokens * OVERCOUNT_FACTOR, c.cached_tokens, c.completion_tokens,
            c.reasoning_tokens,
        )  # fmt: skip

    def body(self) -> bytes:
        counts = None if self.fault == "no_usage" else self.reported_counts
        content = b"".join(self.content)
        if self.endpoint == "chat":
            reasoning = b"".join(self.reasoning) if self.reasoning else None
            body = wire.chat_body(
                self.request_id,
                self.created,
                self.model,
                content,
                reasoning,
                self.finish_reason,
                counts,
                self.service_tier,
            )
        else:
            body = wire.text_body(
                self.request_id, self.created, self.model, content, self.finish_reason, counts
            )
        return rewrite_body(self.fault, body) if self.fault in REWRITING_FAULTS else body


def _positive_int(value: object, param: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"Invalid '{param}': expected an integer >= 1.", param, "invalid_value")
    return value


def _served_tier(req: dict[str, Any]) -> str:
    tier = req.get("service_tier")
    return tier if tier in ("priority", "flex") else "default"


def _include_usage(req: dict[str, Any]) -> bool:
    options = req.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class SimApp:
    """The ASGI callable. One instance per simulated producer; state lives on it."""

    def __init__(self, profile: SimProfile, counter: Counter | None = None) -> None:
        self.profile = profile
        self.stats = Stats()
        self.faults = FaultQueue()
        self.capacity = Capacity(profile)
        self._counter = counter
        self._rng = random.Random(profile.seed)
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4)
        self._prefix_cache: OrderedDict[str, int | None] = OrderedDict()
        self._auth = f"Bearer {profile.api_key}".encode() if profile.api_key else None
        self._created = int(time.time())
        self._routes: dict[tuple[str, str], Callable[..., Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/messages"): self._messages,
            ("POST", "/v1/messages/count_tokens"): self._count_tokens,
            ("POST", "/v1/responses"): self._responses,
            ("GET", "/sim/stats"): self._get_stats,
            ("POST", "/sim/reset"): self._reset,
            ("GET", "/sim/faults"): self._get_faults,
            ("POST", "/sim/faults"): self._post_faults,
            ("DELETE", "/sim/faults"): self._delete_faults,
            ("GET", "/sim/profile"): self._get_profile,
            ("GET", "/healthz"): self._healthz,
        }
        self._paths = {path for _, path in self._routes}
        self._stored = native.ResponseStore()
        self._prompt_cache = native.PromptCache()

    @property
    def counter(self) -> Counter:
        if self._counter is None:
            self._counter = load_counter()
        return self._counter

    # -- ASGI entry ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _ = self.counter  # load the tokenizer now, not on the first request
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        handler = self._routes.get((method, path))
        if handler is None and path.startswith("/v1/responses/") and method in ("GET", "DELETE"):
            handler = self._stored_response
        if handler is None:
            status = 405 if path in self._paths else 404
            message = f"Invalid URL ({method} {path})" if status == 404 else "Method not allowed"
            await _send_error(send, status, message, "invalid_request_error")
            return
        if (
            self._auth is not None
            and path.startswith("/v1/")
            and not _authorised(scope, self._auth)
        ):
            await _send_error(
                send,
                401,
                "Incorrect API key provided.",
                "invalid_request_error",
                "invalid_api_key",
            )
            return
        body = b""
        if method != "GET":
            body_or_none = await _read_body(scope, receive, self.profile.max_body_bytes)
            if body_or_none is None:
                limit = self.profile.max_body_bytes
                await _send_error(
                    send,
                    413,
                    f"Request body too large; the limit is {limit} bytes.",
                    "invalid_request_error",
                    "request_too_large",
                )
                return
            body = body_or_none
        if handler == self._stored_response:
            await native.serve_stored(self._stored, method, path.rsplit("/", 1)[1], send)
            return
        try:
            await handler(body, receive, send)
        except BadRequest as exc:
            self.stats.bad_requests += 1
            await _send_error(send, 400, str(exc), "invalid_request_error", exc.code, exc.param)

    # -- model endpoints ------------------------------------------------------------------------

    async def _chat(self, body: bytes, receive: Receive, send: Send) -> None:
        self.stats.hit("chat.completions")
        req = _parse_object(body)
        model = _model(req)
        messages = req.get("messages")
        if messages is None:
            raise BadRequest(
                "Missing required parameter: 'messages'.",
                "messages",
                "missing_required_parameter",
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("Invalid 'messages': expected an array of objects.", "messages")
        max_tokens = _positive_int(req.get("max_completion_tokens"), "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _positive_int(req.get("max_tokens"), "max_tokens")
        prompt_text = "\n".join(_content_text(m.get("content")) for m in messages)
        counter = self.counter
        prompt_tokens = counter.messages(messages, counter.encoding_for(model))
        function = native.tool_to_call(req)
        if function is not None:
            await self._tool_call(req, function, model, prompt_text, prompt_tokens, send)
            return
        job = self._job("chat", "chatcmpl-", req, model, prompt_text, prompt_tokens, max_tokens)
        await self._run(job, receive, send)

    async def _tool_call(
        self,
        req: dict[str, Any],
        function: dict[str, Any],
        model: str,
        prompt_text: str,
        prompt_tokens: int,
        send: Send,
    ) -> None:
        """A chat request answered with a tool call (sim/native.py says when)."""
        cached = self._cached_tokens(prompt_text, prompt_tokens, model)
        plain, events = native.tool_call_answer(req, function, model, prompt_tokens, cached)
        self.stats.completed += 1
        if req.get("stream") is not True:
            await _send_json(send, 200, plain)
            return
        await send(_stream_start("chatcmpl-tool"))
        await send({"type": "http.response.body", "body": b"".join(events)})

    async def _messages(self, body: bytes, receive: Receive, send: Send) -> None:
        self.stats.hit("messages")
        await native.serve_messages(self._chat, self._prompt_cache, body, receive, send)

    async def _count_tokens(self, body: bytes, receive: Receive, send: Send) -> None:
        counter = self.counter

        def count(messages: list[Any], model: str) -> int:
            return int(counter.messages(messages, counter.encoding_for(model)))

        await native.serve_count_tokens(count, body, send)

    async def _responses(self, body: bytes, receive: Receive, send: Send) -> None:
        self.stats.hit("responses")
        await native.serve_responses(self._chat, self._stored, body, receive, send)

    async def _stored_response(self, body: bytes, receive: Receive, send: Send) -> None:
        raise AssertionError("served in _http")  # pragma: no cover

    async def _completions(self, body: bytes, receive: Receive, send: Send) -> None:
        self.stats.hit("completions")
        req = _parse_object(body)
        model = _model(req)
        prompt = req.get("prompt")
        if prompt is None:
            raise BadRequest(
                "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter"
            )
        prompt_text, id_tokens = _prompt_parts(prompt)
        counter = self.counter
        prompt_tokens = id_tokens + (
            counter.text(prompt_text, counter.encoding_for(model)) if prompt_text else 0
        )
        max_tokens = _positive_int(req.get("max_tokens"), "max_tokens")
        seed_text = prompt_text if not id_tokens else repr(prompt)
        job = self._job("text", "cmpl-", req, model, seed_text, max(1, prompt_tokens), max_tokens)
        await self._run(job, receive, send)

    async def _embeddings(self, body: bytes, receive: Receive, send: Send) -> None:
        self.stats.hit("embeddings")
        req = _parse_object(body)
        model = _model(req)
        raw = req.get("input")
        if raw is None:
            raise BadRequest(
                "Missing required parameter: 'input'.", "input", "missing_required_parameter"
            )
        items = _embedding_inputs(raw)
        dims = _positive_int(req.get("dimensions"), "dimensions") or self.profile.embedding_dims
        if dims > 8192:
            raise BadRequest("Invalid 'dimensions': at most 8192.", "dimensions", "invalid_value")
        base64_format = req.get("encoding_format") == "base64"
        fault, delay_s = self._pick_fault(req)
        if fault in _ERROR_FAULTS:
            await self._send_fault_error(send, fault)
            return
        if fault in ("timeout", "slow_first_byte"):
            watch = Watch(receive)
            try:
                if await self._fault_delay(fault, delay_s, watch, send):
                    return
            finally:
                watch.close()
        counter = self.counter
        encoding = counter.encoding_for(model)
        data: list[dict[str, object]] = []
        prompt_tokens = 0
        for index, item in enumerate(items):
            if isinstance(item, str):
                prompt_tokens += counter.text(item, encoding) if item else 0
                key = item.encode()
            else:
                prompt_tokens += len(item)
                key = _encode(item)
            vector = wire.embedding_vector(key, dims)
            embedding: object = wire.embedding_base64(vector) if base64_format else vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        response: dict[str, object] = {"object": "list", "data": data, "model": model}
        if fault == "overcount":
            prompt_tokens *= OVERCOUNT_FACTOR
        if fault != "no_usage":
            response["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
            if fault not in _UNCOUNTED_FAULTS:
                self.stats.prompt_tokens_reported += prompt_tokens
        if fault in REWRITING_FAULTS:
            response = rewrite(fault, response)
        payload = _encode(response)
        if fault in ("cut", "malformed"):
            await self._send_broken_body(send, payload, cut=fault == "cut")
            return
        if fault == "stall":
            watch = Watch(receive)
            try:
                if not await self._send_stalled(send, payload, delay_s, watch):
                    return
            finally:
                watch.close()
        else:
            await _send_json(send, 200, payload)
        self.stats.completed += 1

    async def _models(self, body: bytes, receive: Receive, send: Send) -> None:
        self.stats.hit("models")
        await _send_json(send, 200, wire.models_body(self.profile.models, self._created))

    # -- control endpoints ----------------------------------------------------------------------

    async def _get_stats(self, body: bytes, receive: Receive, send: Send) -> None:
        stats = self.stats.as_dict()
        stats.update(
            active=self.capacity.active,
            waiting=self.capacity.waiting,
            decoding=self.capacity.decoding,
            max_active=self.capacity.max_active,
            profile=self.profile.name,
            prompt_count_exact=self.counter.exact,
        )
        await _send_json(send, 200, _encode(stats))

    async def _reset(self, body: bytes, receive: Receive, send: Send) -> None:
        self.stats.reset()
        self.capacity.max_active = self.capacity.active
        await _send_json(send, 200, b'{"reset":true}')

    async def _get_faults(self, body: bytes, receive: Receive, send: Send) -> None:
        await _send_json(
            send, 200, _encode({"pending": self.faults.pending(), "kinds": FAULT_HELP})
        )

    async def _post_faults(self, body: bytes, receive: Receive, send: Send) -> None:
        req = _parse_object(body)
        kind = _fault_kind(req.get("kind"), "kind")
        if kind is None:
            raise BadRequest("Missing required parameter: 'kind'.", "kind")
        count = _positive_int(req.get("count"), "count") or 1
        delay_s = req.get("delay_s")
        if delay_s is not None and (
            isinstance(delay_s, bool) or not isinstance(delay_s, int | float) or delay_s < 0
        ):
            raise BadRequest("Invalid 'delay_s': expected a number >= 0.", "delay_s")
        self.faults.push(kind, min(count, MAX_FAULT_COUNT), delay_s)
        await _send_json(send, 200, _encode({"pending": self.faults.pending()}))

    async def _delete_faults(self, body: bytes, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, _encode({"cleared": self.faults.clear()}))

    async def _get_profile(self, body: bytes, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, _encode(dataclasses.asdict(self.profile)))

    async def _healthz(self, body: bytes, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, b'{"status":"ok"}')

    # -- generation -----------------------------------------------------------------------------

    def _pick_fault(self, req: dict[str, Any]) -> tuple[str | None, float | None]:
        """The request's own `sim_fault`, else the next queued one, else a random one."""
        kind = _fault_kind(req.get("sim_fault"), "sim_fault")
        delay_s: float | None = None
        if kind is not None:
            value = req.get("sim_delay_s")
            if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                delay_s = float(value)
        else:
            queued = self.faults.take()
            if queued is not None:
                kind, delay_s = queued.kind, queued.delay_s
            elif self.profile.fault_rate and self._rng.random() < self.profile.fault_rate:
                kind = self._rng.choice(self.profile.fault_kinds)
        if kind is not None:
            self.stats.fault(kind)
        return kind, delay_s

    def _job(
        self,
        endpoint: str,
        id_prefix: str,
        req: dict[str, Any],
        model: str,
        prompt_text: str,
        prompt_tokens: int,
        max_tokens: int | None,
    ) -> Job:
        seed = wire.seed_of(model, prompt_text)
        profile = self.profile
        low, high = profile.default_output_tokens_min, profile.default_output_tokens_max
        natural = low + seed % (high - low + 1)
        if max_tokens is None:
            total, finish = natural, "stop"
        elif profile.fill_max_tokens or natural >= max_tokens:
            total, finish = max_tokens, "length"
        else:
            total, finish = natural, "stop"
        reasoning = 0
        if endpoint == "chat" and "reason" in model.lower():
            reasoning = int(total * profile.reasoning_share)
        fault, delay_s = self._pick_fault(req)
        counts = wire.Counts(
            prompt_tokens, self._cached_tokens(prompt_text, prompt_tokens, model), total, reasoning
        )
        stream = req.get("stream") is True
        return Job(
            endpoint=endpoint,
            request_id=f"{id_prefix}{self._id_prefix}{next(self._ids):08x}",
            created=int(time.time()),
            model=model,
            stream=stream,
            include_usage=stream and _include_usage(req),
            counts=counts,
            reasoning=wire.words_for(seed + 1, reasoning),
            content=wire.words_for(seed, total - reasoning),
            finish_reason=finish,
            fault=fault,
            fault_delay_s=delay_s,
            service_tier=_served_tier(req),
        )

    def _cached_tokens(self, prompt_text: str, prompt_tokens: int, model: str) -> int:
        """Tokens of a prompt prefix seen before (bounded LRU keyed by the first N chars)."""
        chars = self.profile.prefix_cache_chars
        if not chars or len(prompt_text) < chars:
            return 0
        key = prompt_text[:chars]
        cache = self._prefix_cache
        if key not in cache:
            cache[key] = None
            if len(cache) > self.profile.prefix_cache_entries:
                cache.popitem(last=False)
            return 0
        cache.move_to_end(key)
        tokens = cache[key]
        if tokens is None:
            counter = self.counter
            tokens = cache[key] = counter.text(key, counter.encoding_for(model))
        return min(tokens, prompt_tokens)

    async def _run(self, job: Job, receive: Receive, send: Send) -> None:
        fault = job.fault
        if fault in _ERROR_FAULTS:
            await self._send_fault_error(send, fault)
            return
        if fault in UPSTREAM_ERRORS:
            status, payload, headers = error_reply(fault, job.model, job.request_id)
            await _send_json(send, status, payload, extra=headers)
            return
        needs_watch = self.profile.paced or fault in _WATCHED_FAULTS
        watch = Watch(receive) if needs_watch else None
        try:
            if (
                watch is not None
                and fault in ("timeout", "slow_first_byte")
                and await self._fault_delay(fault, job.fault_delay_s, watch, send)
            ):
                return
            admitted = await self.capacity.acquire(watch)
            if admitted != "ok":
                if admitted == "gone":
                    self.stats.cancelled += 1
                else:
                    self.stats.rejected_429 += 1
                    await self._send_overloaded(send, self.profile.full_status)
                return
            try:
                if job.stream:
                    await self._stream(job, watch, send)
                else:
                    await self._whole(job, watch, send)
            finally:
                self.capacity.release()
        finally:
            if watch is not None:
                watch.close()

    async def _fault_delay(
        self, fault: str, delay_s: float | None, watch: Watch, send: Send
    ) -> bool:
        """Serve `timeout` (hang, bounded, then 504) or `slow_first_byte`; True when finished."""
        if fault == "timeout":
            if not await watch.sleep(self.profile.timeout_fault_s):
                await _send_error(send, 504, "Upstream timed out.", "server_error", "timeout")
                return True
        elif not await watch.sleep(self.profile.slow_first_byte_s if delay_s is None else delay_s):
            return False
        self.stats.cancelled += 1
        return True

    def _prefill_s(self, prompt_tokens: int) -> float:
        profile = self.profile
        prefill = profile.prefill_tokens_per_s
        return profile.ttft_s + (prompt_tokens / prefill if prefill else 0.0)

    async def _pace(
        self,
        total: int,
        watch: Watch | None,
        emit: Callable[[int, int], Awaitable[None]] | None,
    ) -> bool:
        """Produce `total` tokens at the shared rate, emitting as they come; False on disconnect.

        The rate is recomputed every tick, so a stream slows down when others start decoding.
        """
        rate = self.capacity.stream_rate_tokens_per_s()
        if rate is None or watch is None:
            if emit is not None and total:
                await emit(0, total)
            return True
        loop = asyncio.get_running_loop()
        capacity = self.capacity
        capacity.decoding += 1
        try:
            done, owed, last = 0, 1.0, loop.time()
            while True:
                step = min(int(owed), total - done)
                if step > 0:
                    if emit is not None:
                        await emit(done, step)
                    done += step
                    owed -= step
                if done >= total:
                    return True
                rate = capacity.stream_rate_tokens_per_s() or 1e9
                # Streams wake per token (batched by MIN_TICK_S); whole answers wake only to see
                # the rate change.
                need = 1.0 - owed if emit is not None else total - done - owed
                if await watch.sleep(min(max(need / rate, MIN_TICK_S), MAX_TICK_S)):
                    return False
                now = loop.time()
                owed += (now - last) * rate
                last = now
        finally:
            capacity.decoding -= 1

    async def _whole(self, job: Job, watch: Watch | None, send: Send) -> None:
        if watch is not None and await watch.sleep(self._prefill_s(job.counts.prompt_tokens)):
            self.stats.cancelled += 1
            return
        if not await self._pace(job.counts.completion_tokens, watch, None):
            self.stats.cancelled += 1
            return
        payload = job.body()
        if job.fault in ("cut", "malformed"):
            await self._send_broken_body(send, payload, cut=job.fault == "cut")
            return
        if job.fault == "stall":
            assert watch is not None
            if not await self._send_stalled(send, payload, job.fault_delay_s, watch):
                return
        else:
            extra = PROVIDER_HEADERS if job.fault == "provider_headers" else ()
            await _send_json(send, 200, payload, job.request_id, extra)
        self.stats.completion_tokens_sent += job.counts.completion_tokens
        if job.fault not in _UNCOUNTED_FAULTS:
            self.stats.reported(job.reported_counts)
        self.stats.completed += 1

    async def _stream(self, job: Job, watch: Watch | None, send: Send) -> None:
        if watch is not None and await watch.sleep(self._prefill_s(job.counts.prompt_tokens)):
            self.stats.cancelled += 1
            return
        builder = job.stream_builder()
        deltas = job.deltas(builder)
        fault = job.fault
        if fault in REWRITING_FAULTS:
            deltas = [rewrite_event(fault, d) for d in deltas]
        if fault == "crlf":
            deltas = [crlf_framed(d) for d in deltas]
            deltas[0] = SSE_COMMENT + deltas[0]
        total = job.counts.completion_tokens
        lead = len(deltas) - total  # the role chunk, which is not a token
        unsent_lead = deltas[:lead]  # goes out with the first tokens, or alone before a fault
        stop_at = total if fault not in ("cut", "malformed", "stall") else total // 2
        start = _stream_start(job.request_id)
        if fault == "provider_headers":
            start["headers"] = [*start["headers"], *PROVIDER_HEADERS]
        await send(start)
        stats = self.stats

        async def emit(start: int, count: int) -> None:
            chunks = deltas[lead + start : lead + start + count]
            if unsent_lead:
                chunks = [*unsent_lead, *chunks]
                unsent_lead.clear()
            await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
            stats.completion_tokens_sent += count

        if not await self._pace(stop_at, watch, emit):
            stats.cancelled += 1
            _cut_on_purpose.set(True)  # the client is gone; nothing to complete
            return
        if unsent_lead:
            await emit(0, 0)
        if job.fault == "cut":
            _cut_on_purpose.set(True)
            return  # uvicorn closes the connection: no final chunk, no [DONE]
        if fault in ("malformed", "stall"):
            if fault == "malformed":
                await send(
                    {"type": "http.response.body", "body": builder.malformed(), "more_body": True}
                )
            elif watch is not None and await watch.sleep(self._stall_s(job.fault_delay_s)):
                stats.cancelled += 1
                _cut_on_purpose.set(True)
                return
            if not await self._pace(total - stop_at, watch, _shifted(emit, stop_at)):
                stats.cancelled += 1
                _cut_on_purpose.set(True)
                return
        tail = [builder.finish(job.finish_reason)]
        if job.include_usage and fault != "no_usage":
            tail.append(builder.usage(job.reported_counts))
        if fault in REWRITING_FAULTS:
            tail = [rewrite_event(fault, t) for t in tail]
        if fault != "no_done":
            tail.append(wire.DONE)
        if fault == "crlf":
            tail = [crlf_framed(t) for t in tail]
        await send({"type": "http.response.body", "body": b"".join(tail), "more_body": False})
        if fault not in _UNCOUNTED_FAULTS:
            stats.reported(job.reported_counts)
        stats.completed += 1

    def _stall_s(self, delay_s: float | None) -> float:
        return self.profile.stall_s if delay_s is None else delay_s

    async def _send_stalled(
        self, send: Send, payload: bytes, delay_s: float | None, watch: Watch
    ) -> bool:
        """Announce the full length, send half, pause, send the rest; False if the client left."""
        half = len(payload) // 2
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [_JSON, (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload[:half], "more_body": True})
        if await watch.sleep(self._stall_s(delay_s)):
            self.stats.cancelled += 1
            _cut_on_purpose.set(True)
            return False
        await send({"type": "http.response.body", "body": payload[half:]})
        return True

    async def _send_fault_error(self, send: Send, fault: str) -> None:
        if fault == "500":
            await _send_error(
                send,
                500,
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
            )
        else:
            await self._send_overloaded(send, int(fault))

    async def _send_overloaded(self, send: Send, status: int) -> None:
        if status == 503:
            message, type_, code = (
                "The engine is currently overloaded, please try again later.",
                "server_error",
                "service_unavailable",
            )
        else:
            message, type_, code = (
                INSUFFICIENT_CAPACITY,
                "engine_overloaded_error",
                "insufficient_capacity",
            )
        retry_after = (b"retry-after", str(self.profile.retry_after_s).encode())
        body = wire.error_body(message, type_, code)
        extra = [retry_after]
        if self.profile.retry_after_ms is not None:
            extra.append((b"retry-after-ms", str(self.profile.retry_after_ms).encode()))
        await _send_json(send, status, body, extra=extra)

    async def _send_broken_body(self, send: Send, payload: bytes, *, cut: bool) -> None:
        """`cut`: announce the full length, send half, drop the connection; else invalid JSON."""
        half = payload[: len(payload) // 2]
        if not cut:
            await _send_json(send, 200, half)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [_JSON, (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": half, "more_body": True})
        _cut_on_purpose.set(True)


def _shifted(
    emit: Callable[[int, int], Awaitable[None]], offset: int
) -> Callable[[int, int], Awaitable[None]]:
    async def shifted(start: int, count: int) -> None:
        await emit(start + offset, count)

    return shifted


# ---------------------------------------------------------------------------------------------
# Small helpers.


def _authorised(scope: Scope, expected: bytes) -> bool:
    """`Authorization: Bearer <key>`, or Anthropic's `x-api-key: <key>`."""
    key = expected.removeprefix(b"Bearer ")
    return any(
        (name == b"authorization" and value == expected) or (name == b"x-api-key" and value == key)
        for name, value in scope["headers"]
    )


async def _read_body(scope: Scope, receive: Receive, limit_bytes: int) -> bytes | None:
    """The whole body, or None when it exceeds the limit (checked before reading when known)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                if int(value) > limit_bytes:
                    return None
            except ValueError:
                return None
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit_bytes:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _parse_object(body: bytes) -> dict[str, Any]:
    try:
        req = _decode(body)
    except msgspec.DecodeError:
        raise BadRequest(
            "We could not parse the JSON body of your request. The API expects a JSON payload."
        ) from None
    if not isinstance(req, dict):
        raise BadRequest("The request body must be a JSON object.")
    return req


def _model(req: dict[str, Any]) -> str:
    model = req.get("model")
    if model is None:
        raise BadRequest(
            "Missing required parameter: 'model'.", "model", "missing_required_parameter"
        )
    if not isinstance(model, str) or not model:
        raise BadRequest("Invalid 'model': expected a non-empty string.", "model")
    return model


def _fault_kind(value: object, param: str) -> str | None:
    if value is None:
        return None
    kind = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if kind not in FAULT_KINDS:
        raise BadRequest(
            f"Invalid '{param}': expected one of {sorted(FAULT_KINDS)}.", param, "invalid_value"
        )
    return str(kind)


def _prompt_parts(prompt: object) -> tuple[str, int]:
    """(text of the prompt, tokens given as ids) for str | list[str] | token array(s)."""
    if isinstance(prompt, str):
        return prompt, 0
    if isinstance(prompt, list):
        if all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt), 0
        if all(isinstance(p, int) for p in prompt):
            return "", len(prompt)
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return "", sum(len(p) for p in prompt)
    raise BadRequest("Invalid 'prompt': expected a string, strings or token arrays.", "prompt")


def _embedding_inputs(raw: object) -> list[str | list[int]]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(item, str) for item in raw):
            return list(raw)
        if all(isinstance(t, int) for t in raw):
            return [list(raw)]
        if all(isinstance(item, list) and all(isinstance(t, int) for t in item) for item in raw):
            return list(raw)
    raise BadRequest("Invalid 'input': expected a string, strings or token arrays.", "input")


def _stream_start(request_id: str) -> Message:
    return {
        "type": "http.response.start",
        "status": 200,
        "headers": [*_SSE_HEADERS, (b"x-request-id", request_id.encode())],
    }


async def _send_json(
    send: Send,
    status: int,
    payload: bytes,
    request_id: str = "",
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    headers = [_JSON, (b"content-length", str(len(payload)).encode())]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _send_error(
    send: Send,
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
) -> None:
    await _send_json(send, status, wire.error_body(message, type_, code, param))
