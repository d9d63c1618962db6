"""OpenAI Responses <-> chat completions, for producers that speak only chat completions.

`responses_request_to_chat` turns a Responses request into a chat request;
`chat_response_to_responses` and `ChatToResponsesStream` turn the producer's answer back into
a Response object or the Responses typed event stream. What a chat producer cannot do (stored
conversations, hosted tools, prompt templates, background runs) raises `Untranslatable` before
any upstream work.
"""

from __future__ import annotations

import time
from typing import Any

from tokenworks.metering.extract import usage_from_openai
from tokenworks.metering.usage import Usage
from tokenworks.wire.common import (
    PreviousResponseUnsupported,
    Untranslatable,
    as_int,
    decode,
    encode,
    plain_text_delta,
    text_of,
)
from tokenworks.wire.sse import data_of

# Request fields copied as they are: same name, same meaning in both APIs.
_SAME_FIELDS = (
    "model",
    "temperature",
    "top_p",
    "parallel_tool_calls",
    "user",
    "service_tier",
    "top_logprobs",
    "safety_identifier",
    "prompt_cache_key",
)
# Fields that need the producer to keep state or run tools we do not have.
_STATEFUL = ("conversation", "prompt")

# --- requests ----------------------------------------------------------------------------------


def responses_request_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request body as a chat completions request body.

    `max_output_tokens` becomes `max_tokens`: the producers this path serves (vLLM, SGLang,
    DeepSeek and other OpenAI-compatible servers) read that name; OpenAI itself speaks
    Responses natively and never comes here.
    """
    if body.get("previous_response_id"):
        raise PreviousResponseUnsupported()
    for name in _STATEFUL:
        if body.get(name):
            raise Untranslatable(f"{name} needs a producer that speaks Responses natively", name)
    if body.get("background"):
        raise Untranslatable("background responses need a producer that stores them", "background")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        messages.append({"role": "user", "content": raw_input})
    elif isinstance(raw_input, list):
        for index, item in enumerate(raw_input):
            _item_to_chat(item, index, messages)
    elif raw_input is not None:
        raise Untranslatable("input must be a string or a list of items", "input")

    out: dict[str, Any] = {"messages": messages}
    for name in _SAME_FIELDS:
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    if isinstance(body.get("metadata"), dict) and body["metadata"]:
        out["metadata"] = body["metadata"]
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool_to_chat(tool, i) for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice is not None:
        out["tool_choice"] = _tool_choice_to_chat(choice)
    text = body.get("text")
    if isinstance(text, dict):
        fmt = text.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            schema: dict[str, Any] = {
                "name": fmt.get("name") or "output",
                "schema": fmt.get("schema"),
            }
            for name in ("strict", "description"):
                if fmt.get(name) is not None:
                    schema[name] = fmt[name]
            out["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
            out["response_format"] = {"type": "json_object"}
        if text.get("verbosity") is not None:
            out["verbosity"] = text["verbosity"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort"):
        out["reasoning_effort"] = reasoning["effort"]
    return out


def _item_to_chat(item: Any, index: int, messages: list[dict[str, Any]]) -> None:
    where = f"input.{index}"
    if not isinstance(item, dict):
        raise Untranslatable("each input item must be an object", where)
    kind = item.get("type")
    if kind in (None, "message") and "role" in item:
        role = item["role"]
        if role not in ("user", "assistant", "system", "developer"):
            raise Untranslatable(f"unknown role {role!r}", f"{where}.role")
        content = item.get("content")
        if role == "assistant":
            messages.append({"role": "assistant", "content": text_of(content)})
        else:
            messages.append({"role": role, "content": _content_to_chat(content, where)})
    elif kind == "function_call":
        call = {
            "id": item.get("call_id"),
            "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""},
        }
        last = messages[-1] if messages else None
        # One assistant turn may say something and call several tools; Responses lists the
        # text and each call as separate items, chat wants them in one assistant message.
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
            if not last.get("content"):
                last["content"] = None
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append(
            {
                "role": "tool",
                "tool_call_id": item.get("call_id"),
                "content": output if isinstance(output, str) else text_of(output),
            }
        )
    elif kind == "reasoning":
        return  # encrypted or summarised reasoning of another model: nothing a chat model reads
    else:
        raise Untranslatable(f"input item type {kind!r} needs a Responses producer", where)


def _content_to_chat(content: Any, where: str) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Untranslatable("content must be a string or a list", f"{where}.content")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_file" and isinstance(part.get("file_data"), str):
            file = {"file_data": part["file_data"]}
            if part.get("filename"):
                file["filename"] = part["filename"]
            parts.append({"type": "file", "file": file})
        else:
            raise Untranslatable(
                f"content part {kind!r} (or a file_id reference) needs a Responses producer",
                f"{where}.content.{j}",
            )
    return parts


def _tool_to_chat(tool: Any, index: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise Untranslatable(f"hosted tool {kind!r} needs a Responses producer", f"tools.{index}")
    function: dict[str, Any] = {"name": tool.get("name")}
    if tool.get("description"):
        function["description"] = tool["description"]
    function["parameters"] = tool.get("parameters") or {"type": "object", "properties": {}}
    if tool.get("strict") is not None:
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _tool_choice_to_chat(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise Untranslatable(f"tool_choice {choice!r} needs a Responses producer", "tool_choice")


# --- responses ---------------------------------------------------------------------------------


def chat_usage_to_responses(usage: Any) -> dict[str, Any]:
    counts = usage_from_openai(usage) or Usage()
    return {
        "input_tokens": counts.input_tokens,
        "input_tokens_details": {
            "cached_tokens": counts.cached_input_tokens,
            "cache_write_tokens": counts.cache_write_tokens,
        },
        "output_tokens": counts.output_tokens,
        "output_tokens_details": {"reasoning_tokens": counts.reasoning_tokens},
        "total_tokens": counts.input_tokens + counts.output_tokens,
    }


def _response_shell(
    request: dict[str, Any], response_id: str, created_at: int, model: Any
) -> dict[str, Any]:
    """The parts of a Response that echo the request (the SDK's model requires several)."""
    tools = [
        {
            "type": "function",
            "name": tool.get("name"),
            "description": tool.get("description"),
            "parameters": tool.get("parameters"),
            "strict": tool.get("strict", True),
        }
        for tool in request.get("tools") or ()
        if isinstance(tool, dict)
    ]
    text = (
        request.get("text")
        if isinstance(request.get("text"), dict)
        else {"format": {"type": "text"}}
    )
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": model,
        "output": [],
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": request.get("reasoning") or {"effort": None, "summary": None},
        "store": False,  # nothing is stored on this path: a later previous_response_id cannot work
        "temperature": request.get("temperature"),
        "text": text,
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": tools,
        "top_p": request.get("top_p"),
        "truncation": "disabled",
        "usage": None,
        "user": request.get("user"),
        "metadata": request.get("metadata") or {},
    }


def _finish_status(response: dict[str, Any], finish: str | None) -> None:
    if finish == "length":
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    elif finish == "content_filter":
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "content_filter"}
    else:
        response["status"] = "completed"


def _suffix(chat_id: Any) -> str:
    text = str(chat_id or "")
    return text.removeprefix("chatcmpl-") or "0"


def chat_response_to_responses(
    chat: dict[str, Any], request: dict[str, Any], created_at: int | None = None
) -> dict[str, Any]:
    """A chat completion as a Response object, echoing the Responses `request` it answers."""
    suffix = _suffix(chat.get("id"))
    created = (
        created_at if created_at is not None else as_int(chat.get("created")) or int(time.time())
    )
    response = _response_shell(request, "resp_" + suffix, created, chat.get("model"))
    choice = (chat.get("choices") or [{}])[0] or {}
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = response["output"]
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        output.append(
            {
                "type": "reasoning",
                "id": "rs_" + suffix,
                "summary": [{"type": "summary_text", "text": reasoning}],
            }
        )
    parts: list[dict[str, Any]] = []
    text = text_of(message.get("content"))
    if text:
        parts.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        parts.append({"type": "refusal", "refusal": message["refusal"]})
    if parts:
        output.append(
            {
                "type": "message",
                "id": "msg_" + suffix,
                "status": "completed",
                "role": "assistant",
                "content": parts,
            }
        )
    for n, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        output.append(
            {
                "type": "function_call",
                "id": f"fc_{suffix}_{n}",
                "call_id": call.get("id"),
                "name": function.get("name"),
                "arguments": function.get("arguments") or "",
                "status": "completed",
            }
        )
    _finish_status(response, choice.get("finish_reason"))
    response["usage"] = chat_usage_to_responses(chat.get("usage"))
    return response


# --- streams -----------------------------------------------------------------------------------

_TEXT_TAIL = b',"logprobs":[]}\n\n'


class ChatToResponsesStream:
    """Chat completion chunks in, Responses typed stream events out (each with its
    `sequence_number`), ending in `response.completed` (or `response.incomplete`) with usage.

    Items are sequential: reasoning summary, then message text, then each function call; a new
    kind of output closes the open item with its `.done` events.
    """

    __slots__ = (
        "_created_at",
        "_done",
        "_finish",
        "_item",
        "_item_kind",
        "_request",
        "_response",
        "_seq",
        "_suffix",
        "_text",
        "_text_head",
        "_text_mid",
        "_tool_items",
        "_usage",
    )

    def __init__(self, request: dict[str, Any], created_at: int | None = None) -> None:
        self._request = request
        self._created_at = int(time.time()) if created_at is None else created_at
        self._response: dict[str, Any] | None = None
        self._seq = 0
        self._item: dict[str, Any] | None = None  # the open output item
        self._item_kind = ""
        self._text: list[str] = []  # text (or summary, or arguments) of the open item
        self._tool_items: dict[int, dict[str, Any]] = {}
        self._finish: str | None = None
        self._usage: Any = None
        self._done = False
        self._suffix = "0"
        self._text_head = b""
        self._text_mid = b""

    def feed_sse(self, frame: bytes) -> bytes:
        data = data_of(frame)
        if data is None:
            return b""
        if data == b"[DONE]":
            return self._encode(self.finish())
        return self.feed_decoded(decode(data))

    def feed_decoded(self, chunk: dict[str, Any]) -> bytes:
        """`feed_sse` for a chunk its caller has decoded already (the relay reads usage)."""
        if self._item_kind == "message":
            text = plain_text_delta(chunk)
            if text is not None:  # the common case, from a template
                self._text.append(text)
                seq = self._seq
                self._seq += 1
                return b"%s%d%s%s%s" % (
                    self._text_head, seq, self._text_mid, encode(text), _TEXT_TAIL
                )  # fmt: skip
        events = self.feed(chunk)
        return self._encode(events)

    @staticmethod
    def _encode(events: list[dict[str, Any]]) -> bytes:
        return b"".join(
            b"event: " + event["type"].encode() + b"\ndata: " + encode(event) + b"\n\n"
            for event in events
        )

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def _snapshot(self) -> dict[str, Any]:
        assert self._response is not None
        return dict(self._response, output=list(self._response["output"]))

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if "error" in chunk and "choices" not in chunk:
            error = chunk.get("error")
            message = error.get("message") if isinstance(error, dict) else str(error)
            return [self._event("error", code=None, message=str(message or ""), param=None)]
        events: list[dict[str, Any]] = []
        if self._response is None:
            self._start(chunk, events)
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning and isinstance(reasoning, str):
                self._open_reasoning(events)
                assert self._item is not None
                self._text.append(reasoning)
                events.append(
                    self._event(
                        "response.reasoning_summary_text.delta",
                        item_id=self._item["id"],
                        output_index=self._index(),
                        summary_index=0,
                        delta=reasoning,
                    )
                )
            content = delta.get("content")
            if content:
                self._open_message(events)
                assert self._item is not None
                self._text.append(content)
                events.append(
                    self._event(
                        "response.output_text.delta",
                        item_id=self._item["id"],
                        output_index=self._index(),
                        content_index=0,
                        delta=content,
                        logprobs=[],
                    )
                )
            for call in delta.get("tool_calls") or ():
                self._tool_delta(call, events)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return events

    def _start(self, chunk: dict[str, Any], events: list[dict[str, Any]]) -> None:
        self._suffix = _suffix(chunk.get("id"))
        model = chunk.get("model") or self._request.get("model")
        self._response = _response_shell(
            self._request, "resp_" + self._suffix, self._created_at, model
        )
        events.append(self._event("response.created", response=self._snapshot()))
        events.append(self._event("response.in_progress", response=self._snapshot()))

    def _index(self) -> int:
        assert self._response is not None
        return len(self._response["output"]) - 1

    def _add_item(self, kind: str, item: dict[str, Any], events: list[dict[str, Any]]) -> None:
        self._close(events)
        assert self._response is not None
        self._response["output"].append(item)
        self._item = item
        self._item_kind = kind
        self._text = []
        events.append(
            self._event("response.output_item.added", output_index=self._index(), item=dict(item))
        )

    def _open_reasoning(self, events: list[dict[str, Any]]) -> None:
        if self._item_kind == "reasoning":
            return
        item = {"type": "reasoning", "id": "rs_" + self._suffix, "summary": []}
        self._add_item("reasoning", item, events)
        events.append(
            self._event(
                "response.reasoning_summary_part.added",
                item_id=item["id"],
                output_index=self._index(),
                summary_index=0,
                part={"type": "summary_text", "text": ""},
            )
        )

    def _open_message(self, events: list[dict[str, Any]]) -> None:
        if self._item_kind == "message":
            return
        item = {
            "type": "message",
            "id": "msg_" + self._suffix,
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self._add_item("message", item, events)
        self._text_head = (
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            b'"sequence_number":'
        )
        self._text_mid = b',"item_id":%s,"output_index":%d,"content_index":0,"delta":' % (
            encode(item["id"]),
            self._index(),
        )
        events.append(
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=self._index(),
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            )
        )

    def _tool_delta(self, call: dict[str, Any], events: list[dict[str, Any]]) -> None:
        position = call.get("index", 0)
        function = call.get("function") or {}
        item: dict[str, Any] | None = self._tool_items.get(position)
        if item is None:
            item = {
                "type": "function_call",
                "id": f"fc_{self._suffix}_{position}",
                "call_id": call.get("id"),
                "name": function.get("name"),
                "arguments": "",
                "status": "in_progress",
            }
            self._tool_items[position] = item
            self._add_item("function_call", item, events)
        arguments = function.get("arguments")
        if arguments:
            if item is self._item:
                self._text.append(arguments)
            else:  # a late fragment of an earlier call: keep it in that call's arguments
                item["arguments"] += arguments
            assert self._response is not None
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self._response["output"].index(item),
                    delta=arguments,
                )
            )

    def _close(self, events: list[dict[str, Any]]) -> None:
        item = self._item
        if item is None:
            return
        index = self._index()
        text = "".join(self._text)
        if self._item_kind == "reasoning":
            part = {"type": "summary_text", "text": text}
            item["summary"] = [part]
            events.append(
                self._event(
                    "response.reasoning_summary_text.done",
                    item_id=item["id"],
                    output_index=index,
                    summary_index=0,
                    text=text,
                )
            )
            events.append(
                self._event(
                    "response.reasoning_summary_part.done",
                    item_id=item["id"],
                    output_index=index,
                    summary_index=0,
                    part=part,
                )
            )
        elif self._item_kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            item["content"] = [part]
            item["status"] = "completed"
            events.append(
                self._event(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=text,
                    logprobs=[],
                )
            )
            events.append(
                self._event(
                    "response.content_part.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        else:
            item["arguments"] = text + item["arguments"]
            item["status"] = "completed"
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        events.append(self._event("response.output_item.done", output_index=index, item=dict(item)))
        self._item = None
        self._item_kind = ""
        self._text = []

    def finish(self) -> list[dict[str, Any]]:
        """The closing events, once the upstream said `[DONE]`."""
        if self._done:
            return []
        self._done = True
        events: list[dict[str, Any]] = []
        if self._response is None:
            self._start({}, events)
        self._close(events)
        assert self._response is not None
        _finish_status(self._response, self._finish)
        self._response["usage"] = chat_usage_to_responses(self._usage)
        kind = (
            "response.completed"
            if self._response["status"] == "completed"
            else "response.incomplete"
        )
        events.append(self._event(kind, response=self._snapshot()))
        return events

    def usage(self) -> Usage | None:
        return usage_from_openai(self._usage)
