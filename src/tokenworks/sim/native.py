"""The simulated producer's other dialects: Anthropic Messages, OpenAI Responses, tool calls.

A producer that speaks Messages or Responses natively is simulated on top of the chat engine:
the request is read as chat (`wire.anthropic`, `wire.responses`), served by the same
generator (with its faults, pacing and usage; its stats count the request under its own
route and under chat completions), and the answer written in the dialect asked, plain or
streamed. Messages adds what only it reports: a request with `cache_control` marks
writes the cached part of its prompt (simulated as three quarters of it) to the cache the
first time its system prompt and tools are seen (`cache_creation_input_tokens`), and reads
it back on later requests (`cache_read_input_tokens`). Responses stores what it answers (bounded)
for `GET`/`DELETE /v1/responses/{id}` and `previous_response_id`.

Tool calls: a chat request with `tools` whose last message is the user's is answered with one
call of the first tool (or the one `tool_choice` names), its required arguments filled in;
once the conversation carries the tool's result, the model answers in text, so an agent loop
ends.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from tokenworks.wire import anthropic, responses
from tokenworks.wire.common import PreviousResponseUnsupported, Untranslatable
from tokenworks.wire.sse import SSESplitter, data_of

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
Chat = Callable[[bytes, Receive, Send], Awaitable[None]]

_encode = msgspec.json.encode
_decode = msgspec.json.decode
MAX_STORED_RESPONSES = 1_000
_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


# --- tool calls (chat) -------------------------------------------------------------------------


def tool_to_call(req: dict[str, Any]) -> dict[str, Any] | None:
    """The tool a chat request gets called (its `function` object), or None to answer text."""
    tools = req.get("tools")
    messages = req.get("messages")
    if not isinstance(tools, list) or not tools or not isinstance(messages, list) or not messages:
        return None
    if req.get("tool_choice") == "none":
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None  # the tool's result is in: answer in text
    choice = req.get("tool_choice")
    wanted = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and (wanted is None or function.get("name") == wanted):
            return function
    return None


def _arguments(function: dict[str, Any]) -> str:
    schema = function.get("parameters")
    props = schema.get("properties") if isinstance(schema, dict) else None
    required = schema.get("required") if isinstance(schema, dict) else None
    args: dict[str, Any] = {}
    for name in required if isinstance(required, list) else []:
        kind = (props or {}).get(name, {}).get("type") if isinstance(props, dict) else None
        args[name] = 1 if kind in ("integer", "number") else True if kind == "boolean" else "sim"
    return _encode(args).decode()


def tool_call_answer(
    req: dict[str, Any], function: dict[str, Any], model: str, prompt_tokens: int, cached: int
) -> tuple[bytes, list[bytes]]:
    """A chat answer calling `function`: (the plain body, the stream's events)."""
    rid = "chatcmpl-" + secrets.token_hex(8)
    call_id = "call_" + secrets.token_hex(8)
    created = int(time.time())
    arguments = _arguments(function)
    completion = 8 + len(arguments) // 4
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    name = function.get("name")
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        ],
    }
    head = {"id": rid, "created": created, "model": model}
    body = dict(head, object="chat.completion")
    body["choices"] = [{"index": 0, "message": message, "finish_reason": "tool_calls"}]
    body["usage"] = usage

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        out = dict(head, object="chat.completion.chunk")
        out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
        return b"data: " + _encode(out) + b"\n\n"

    first_call = {"index": 0, "id": call_id, "type": "function"}
    first_call["function"] = {"name": name, "arguments": ""}
    events = [
        chunk({"role": "assistant", "content": None}),
        chunk({"tool_calls": [first_call]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}),
        chunk({}, "tool_calls"),
    ]
    options = req.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        tail = dict(head, object="chat.completion.chunk", choices=[], usage=usage)
        events.append(b"data: " + _encode(tail) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return _encode(body), events


# --- one dialect on top of the chat engine ----------------------------------------------------


class _Dialect:
    """Turns the chat engine's ASGI messages into another dialect's, plain or streamed: the
    engine's provider headers kept (`provider_header` names them in the dialect), and its
    `crlf` fault's framing too (CRLF line ends, comments as sent)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 200
        self.streaming = False
        self.started = False
        self.body: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.splitter = SSESplitter()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            raw = message.get("headers") or []
            headers = dict(raw)
            self.headers = [
                (self.provider_header(k), v)
                for k, v in raw
                if k not in (b"content-type", b"content-length", b"cache-control")
            ]
            self.streaming = self.status == 200 and headers.get(b"content-type", b"").startswith(
                b"text/event-stream"
            )
            if self.streaming:
                await self.send(
                    {"type": "http.response.start", "status": 200, "headers": _SSE + self.headers}
                )
                self.started = True
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.streaming:
            out = b"".join(map(self._framed, self.splitter.feed(body)))
            await self.send({"type": "http.response.body", "body": out, "more_body": more})
            return
        self.body.append(body)
        if more:
            return
        status, payload = self.answer(self.status, b"".join(self.body))
        length = (b"content-length", str(len(payload)).encode())
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [_JSON, length, *self.headers],
            }
        )
        await self.send({"type": "http.response.body", "body": payload})

    def _framed(self, frame: bytes) -> bytes:
        """A chat frame as this dialect's events, in the chat stream's framing: a comment
        passes as it came, and a CRLF stream (the `crlf` fault) stays CRLF."""
        if frame.startswith(b":"):
            return frame
        out = self.frame(frame)
        return out.replace(b"\n", b"\r\n") if frame.endswith(b"\r\n") else out

    def provider_header(self, name: bytes) -> bytes:
        """What the provider this dialect imitates calls the chat engine's header `name`."""
        return name

    def frame(self, frame: bytes) -> bytes:
        raise NotImplementedError

    def answer(self, status: int, body: bytes) -> tuple[int, bytes]:
        raise NotImplementedError


class PromptCache:
    """The prompt prefixes (system prompt and tools) a Messages producer has cached. Bounded."""

    def __init__(self, max_entries: int = 1_000) -> None:
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def hit(self, key: bytes) -> bool:
        """Whether `key` was cached before; it is cached from now on."""
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        self._seen[key] = None
        if len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return False


def _cache_counts(usage: Any, read: bool) -> None:
    """Three quarters of the prompt written to the cache, or read from it."""
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens") or 0
        details = usage.get("prompt_tokens_details") or {}
        details["cached_tokens" if read else "cache_write_tokens"] = prompt * 3 // 4
        details.setdefault("cached_tokens", 0)
        usage["prompt_tokens_details"] = details


class _Messages(_Dialect):
    def __init__(self, send: Send, model: str, caching: bool, read: bool) -> None:
        super().__init__(send)
        self.stream = anthropic.ChatToMessagesStream(model=model)
        self.caching = caching
        self.read = read

    def provider_header(self, name: bytes) -> bytes:
        # Anthropic's names: `request-id`, `anthropic-ratelimit-*`.
        if name == b"x-request-id":
            return b"request-id"
        if name.startswith(b"x-ratelimit-"):
            return b"anthropic-ratelimit-" + name[len(b"x-ratelimit-") :]
        return name

    def frame(self, frame: bytes) -> bytes:
        data = data_of(frame)
        if data is None:
            return b""
        if data == b"[DONE]":
            return b"".join(map(anthropic.encode_messages_event, self.stream.finish()))
        chunk = _decode(data)
        if self.caching:
            _cache_counts(chunk.get("usage"), self.read)
        return b"".join(map(anthropic.encode_messages_event, self.stream.feed(chunk)))

    def answer(self, status: int, body: bytes) -> tuple[int, bytes]:
        parsed = _decode(body) if body else {}
        if status >= 400:
            status, error = anthropic.openai_error_to_anthropic(status, parsed)
            return status, _encode(error)
        if self.caching:
            _cache_counts(parsed.get("usage"), self.read)
        message = anthropic.chat_response_to_messages(parsed)
        message["id"] = "msg_" + str(parsed.get("id", "")).removeprefix("chatcmpl-")
        return status, _encode(message)


class _Responses(_Dialect):
    def __init__(
        self, send: Send, request: dict[str, Any], history: list[Any], store: ResponseStore
    ) -> None:
        super().__init__(send)
        self.request = request
        self.stream = responses.ChatToResponsesStream(request)
        self.history = history
        self.store = store

    def _keep(self, response: dict[str, Any]) -> dict[str, Any]:
        store = self.request.get("store") is not False
        response["store"] = store
        response["previous_response_id"] = self.request.get("previous_response_id")
        if store:
            self.store.add(response, self.history)
        return response

    def frame(self, frame: bytes) -> bytes:
        data = data_of(frame)
        if data is None:
            return b""
        events = self.stream.finish() if data == b"[DONE]" else self.stream.feed(_decode(data))
        out = []
        for event in events:
            response = event.get("response")
            if isinstance(response, dict):
                response["store"] = self.request.get("store") is not False
                if event["type"] in ("response.completed", "response.incomplete"):
                    self._keep(response)
            out.append(b"event: " + event["type"].encode() + b"\ndata: " + _encode(event) + b"\n\n")
        return b"".join(out)

    def answer(self, status: int, body: bytes) -> tuple[int, bytes]:
        if status >= 400:
            return status, body
        response = responses.chat_response_to_responses(_decode(body), self.request)
        return status, _encode(self._keep(response))


class ResponseStore:
    """Responses the simulated producer stored, with the chat history that led to each."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[dict[str, Any], list[Any]]] = OrderedDict()

    def add(self, response: dict[str, Any], history: list[Any]) -> None:
        said = [
            {"role": "assistant", "content": part.get("text", "")}
            for item in response.get("output") or ()
            if item.get("type") == "message"
            for part in item.get("content") or ()
        ]
        self._items[response["id"]] = (response, history + said)
        if len(self._items) > MAX_STORED_RESPONSES:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict[str, Any], list[Any]] | None:
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None


async def _json(send: Send, status: int, payload: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _bad(message: str, param: str | None) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return _encode({"error": error})


async def serve_messages(
    chat: Chat, cache: PromptCache, body: bytes, receive: Receive, send: Send
) -> None:
    """`POST /v1/messages`."""
    try:
        req = _decode(body)
        chat_req = anthropic.messages_request_to_chat(req)
    except (msgspec.DecodeError, Untranslatable, AttributeError) as exc:
        _, error = anthropic.openai_error_to_anthropic(400, {"error": {"message": str(exc)}})
        await _json(send, 400, _encode(error))
        return
    model = str(req.get("model") or "")
    caching = b'"cache_control"' in body
    read = caching and cache.hit(_encode([model, req.get("system"), req.get("tools")]))
    await chat(_encode(chat_req), receive, _Messages(send, model, caching, read))


async def serve_count_tokens(
    count: Callable[[list[Any], str], int], body: bytes, send: Send
) -> None:
    """`POST /v1/messages/count_tokens`: the chat engine's own count of the prompt."""
    try:
        req = _decode(body)
        chat_req = anthropic.messages_request_to_chat(req)
    except (msgspec.DecodeError, Untranslatable, AttributeError) as exc:
        _, error = anthropic.openai_error_to_anthropic(400, {"error": {"message": str(exc)}})
        await _json(send, 400, _encode(error))
        return
    tokens = count(chat_req["messages"], str(req.get("model") or ""))
    await _json(send, 200, _encode({"input_tokens": tokens}))


async def serve_responses(
    chat: Chat, store: ResponseStore, body: bytes, receive: Receive, send: Send
) -> None:
    """`POST /v1/responses`, with `previous_response_id` read from the store."""
    try:
        req = _decode(body)
        if not isinstance(req, dict):
            raise Untranslatable("the body must be a JSON object", None)
        history: list[Any] = []
        previous = req.get("previous_response_id")
        if previous:
            found = store.get(str(previous))
            if found is None:
                error = _bad(
                    f"Previous response with id '{previous}' not found.", "previous_response_id"
                )
                await _json(send, 404, error)
                return
            history = list(found[1])
        chat_req = responses.responses_request_to_chat(
            {k: v for k, v in req.items() if k != "previous_response_id"}
        )
    except PreviousResponseUnsupported as exc:  # pragma: no cover - removed above
        await _json(send, 400, _bad(exc.message, exc.param))
        return
    except (msgspec.DecodeError, Untranslatable, AttributeError) as exc:
        await _json(send, 400, _bad(str(exc), getattr(exc, "param", None)))
        return
    chat_req["messages"] = history + chat_req["messages"]
    chat_req["model"] = req.get("model")
    await chat(_encode(chat_req), receive, _Responses(send, req, chat_req["messages"], store))


async def serve_stored(store: ResponseStore, method: str, response_id: str, send: Send) -> None:
    """`GET` or `DELETE /v1/responses/{id}`."""
    found = store.get(response_id)
    if found is None:
        message = f"No response found with id '{response_id}'."
        await _json(send, 404, _bad(message, None))
        return
    if method == "DELETE":
        store.delete(response_id)
        await _json(send, 200, _encode({"id": response_id, "object": "response", "deleted": True}))
        return
    await _json(send, 200, _encode(found[0]))
