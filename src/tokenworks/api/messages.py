"""The consumer API in Anthropic's shape: `POST /v1/messages` and its `count_tokens`.

Authentication is Anthropic's `x-api-key` (or a Bearer token); `anthropic-version` is
accepted whatever it says (the gateway answers in the version its translations are written
against, 2023-06-01, which every SDK version reads). Passed through to a `kind: anthropic`
producer, the request carries the client's `anthropic-version` and `anthropic-beta` with it
(`wire.headers.anthropic_forwarded`). Errors on these routes are Anthropic's
shape (`api/errors.py` `anthropic_error`). The request is passed through to a producer that
speaks Messages and translated to chat completions for the others (`dispatch/dialects.py`).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenworks.api.errors import ApiError
from tokenworks.api.openai import authenticate_any, gateway_of, read_json, relay
from tokenworks.dispatch.errors import from_upstream
from tokenworks.metering import tokens
from tokenworks.producers.openai_compat import UpstreamError
from tokenworks.wire import anthropic
from tokenworks.wire.common import Untranslatable, dumps_str
from tokenworks.wire.headers import anthropic_forwarded

_encode = msgspec.json.encode
MAX_COUNT_RESPONSE_BYTES = 64 * 1024


async def messages(request: Request) -> Response:
    return await relay(request, "messages")


async def count_tokens(request: Request) -> Response:
    """Input tokens of a Messages request: the producer's own count when it speaks Messages
    (exact), else counted offline with the model's tokenizer (an estimate). Free: nothing is
    held or charged, as at Anthropic."""
    gateway = gateway_of(request)
    key = authenticate_any(request)
    payload = await read_json(request, gateway.config.limits.max_body_bytes)
    name = payload.get("model")
    if not isinstance(name, str):
        raise ApiError(400, "missing required parameter: 'model'", param="model", code="missing")
    route = gateway.router.get(name)
    if route is None or not key.allows(name):
        raise ApiError(
            404, f"The model '{name}' does not exist or you do not have access to it.",
            param="model", code="model_not_found",
        )  # fmt: skip
    if not isinstance(payload.get("messages"), list):
        raise ApiError(400, "'messages' must be an array", param="messages", code="invalid_type")
    relay_ = gateway.relay
    deployment = route.model.deployments[0]
    if relay_.formats[deployment.producer]["messages"] == "messages":
        body = _encode(dict(payload, model=deployment.model))
        producer = relay_.producers[deployment.producer]
        try:
            forwarded = (
                anthropic_forwarded(request.headers) if producer.spec.kind == "anthropic" else None
            )
            response = await producer.post("/messages/count_tokens", body, forwarded)
            try:
                data = await response.content.read(MAX_COUNT_RESPONSE_BYTES)
            finally:
                response.release()
        except UpstreamError as exc:
            raise from_upstream(exc) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise from_upstream(UpstreamError(producer.name, "cut", str(exc))) from exc
        return Response(data, media_type="application/json")
    try:
        chat = anthropic.messages_request_to_chat(payload)
    except Untranslatable as exc:
        raise ApiError(400, exc.message, param=exc.param, code="invalid_request") from exc
    count = tokens.count_messages(chat["messages"], route.encoding)
    tools: Any = chat.get("tools")
    if tools:
        count += tokens.count_text(dumps_str(tools), route.encoding)
    return Response(_encode({"input_tokens": count}), media_type="application/json")


routes = [
    Route("/v1/messages", messages, methods=["POST"]),
    Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
]
