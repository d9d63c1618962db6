"""The consumer API for OpenAI's Responses: create, and `GET`/`DELETE` of a stored response.

`POST /v1/responses` is passed through to a producer that speaks Responses and translated
to chat completions for the others (`dispatch/dialects.py`). Only a producer that speaks
Responses stores them: the gateway remembers which producer holds each response a key
created (bounded, `dispatch.dialects.ResponseIndex`), so `GET` and `DELETE` reach it, and
`previous_response_id` is served by such a producer. A translated response is not stored:
`store` is false in it, a later `previous_response_id` naming it is a 400, and `GET` of
its id a 404.
"""

from __future__ import annotations

import aiohttp
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenworks.api.errors import ApiError
from tokenworks.api.openai import authenticate, gateway_of, relay
from tokenworks.dispatch.errors import from_upstream
from tokenworks.producers.openai_compat import UpstreamError
from tokenworks.wire.openai import rewrite_model

MAX_STORED_RESPONSE_BYTES = 16 * 1024 * 1024


async def create(request: Request) -> Response:
    return await relay(request, "responses")


async def stored(request: Request) -> Response:
    """`GET` or `DELETE /v1/responses/{id}`, forwarded to the producer that stored it."""
    gateway = gateway_of(request)
    key = authenticate(request)
    response_id = request.path_params["response_id"]
    owner = gateway.relay.stored.get(key.id, response_id)
    if owner is None:
        raise ApiError(
            404,
            f"No response with id '{response_id}' was stored for this key (responses served by"
            " producers that speak only chat completions are not stored).",
            param="response_id",
            code="not_found",
        )
    producer_name, public_model, _ = owner
    producer = gateway.relay.producers[producer_name]
    path = f"/responses/{response_id}"
    if request.url.query:
        path += "?" + request.url.query
    try:
        upstream = await producer.request(request.method, path)
        try:
            data = await upstream.content.read(MAX_STORED_RESPONSE_BYTES)
        finally:
            upstream.release()
    except UpstreamError as exc:
        if exc.status == 404:
            gateway.relay.stored.remove(key.id, response_id)
        raise from_upstream(exc) from exc
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise from_upstream(UpstreamError(producer.name, "cut", str(exc))) from exc
    if request.method == "DELETE":
        gateway.relay.stored.remove(key.id, response_id)
    return Response(rewrite_model(data, public_model), media_type="application/json")


routes = [
    Route("/v1/responses", create, methods=["POST"]),
    Route("/v1/responses/{response_id}", stored, methods=["GET", "DELETE"]),
]
