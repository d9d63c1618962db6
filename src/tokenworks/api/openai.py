"""The consumer API in the OpenAI shape: chat, completions, embeddings, models."""

from __future__ import annotations

import gc
from itertools import compress
from typing import Any, Protocol

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenworks.api.errors import ApiError
from tokenworks.config import Config
from tokenworks.dispatch.preferences import parse_provider
from tokenworks.dispatch.relay import Call, Relay
from tokenworks.dispatch.router import Router
from tokenworks.keys.lifecycle import MintRate
from tokenworks.keys.store import ApiKey, KeyStore
from tokenworks.ledger import Ledger
from tokenworks.metering.store import UsageStore
from tokenworks.pricing.quote import Pricer
from tokenworks.wire.headers import anthropic_forwarded

MAX_TAGS = 32
MAX_TAG_BYTES = 256
# Nesting deeper than this is refused: no API body needs it, and past about 1,000 levels the
# decoder (and anything walking the payload after it) runs out of recursion.
MAX_JSON_DEPTH = 64

_decode = msgspec.json.decode
_encode = msgspec.json.encode


class GatewayView(Protocol):
    """What the handlers use of `tokenworks.app.Gateway`, which sits a layer above them."""

    config: Config
    admin_key: str | None
    started_s: float
    store: UsageStore
    keys: KeyStore
    ledger: Ledger | None
    mint_rate: MintRate
    pricer: Pricer
    router: Router
    relay: Relay

    async def flush_usage(self) -> None: ...


def gateway_of(request: Request) -> GatewayView:
    gateway: GatewayView = request.app.state.gateway
    return gateway


def open_ledger(gateway: GatewayView) -> Ledger:
    """The gateway's ledger, or a 503 before the app has started (and opened it)."""
    if gateway.ledger is None:
        raise ApiError(503, "the ledger is not open", code="ledger_unavailable")
    return gateway.ledger


# Where `request_header` keeps a request's headers by name (in its ASGI scope, per request).
_HEADERS_BY_NAME = "tokenworks.headers"


def request_header(request: Request, name: bytes) -> str | None:
    """The request's header `name` (lower case; the first of a repeated one), or None.

    Starlette's `request.headers.get` walks every header in Python, and for a missing one
    raises and catches a KeyError: 5-9k instructions a lookup, and the relay makes four. This
    builds a dict once per request (one C call) and probes it."""
    scope = request.scope
    headers: dict[bytes, bytes] | None = scope.get(_HEADERS_BY_NAME)
    if headers is None:  # reversed: the first of a repeated name wins, as in Starlette
        headers = scope[_HEADERS_BY_NAME] = dict(reversed(scope["headers"]))
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


def bearer(request: Request) -> str:
    """The secret of `Authorization: Bearer <secret>`, or a 401."""
    scheme, _, secret = (request_header(request, b"authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(
            401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
        )
    return secret.strip()


def authenticate(request: Request) -> ApiKey:
    key = gateway_of(request).keys.authenticate(bearer(request))
    if key is None:
        raise ApiError(401, "invalid, expired or revoked API key", code="invalid_api_key")
    return key


def authenticate_any(request: Request) -> ApiKey:
    """Anthropic's `x-api-key: <key>`, else `Authorization: Bearer <key>` (Claude Code sends
    either, depending on how it was configured)."""
    secret = (request_header(request, b"x-api-key") or "").strip()
    if not secret:
        scheme, _, secret = (request_header(request, b"authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise ApiError(
                401, "missing API key: send 'x-api-key: <key>' or 'Authorization: Bearer <key>'",
                code="missing_api_key",
            )  # fmt: skip
        secret = secret.strip()
    key = gateway_of(request).keys.authenticate(secret)
    if key is None:
        raise ApiError(401, "invalid, expired or revoked API key", code="invalid_api_key")
    return key


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object, refusing oversize bodies before reading them all."""
    payload, _ = await read_json_sized(request, max_bytes)
    return payload


async def read_json_sized(request: Request, max_bytes: int) -> tuple[dict[str, Any], int]:
    """`read_json`, and the body's size in bytes."""
    declared = request_header(request, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body exceeds {max_bytes} bytes", code="body_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"request body exceeds {max_bytes} bytes", code="body_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise ApiError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        payload = _decode(body)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise _too_deep() from exc
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    # Nesting deeper than MAX_JSON_DEPTH needs more brackets than that: most bodies are
    # cleared by two byte counts, and only the rest are walked.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and nested_deeper_than(
        payload, MAX_JSON_DEPTH
    ):
        raise _too_deep()
    return payload, size


def _too_deep() -> ApiError:
    return ApiError(
        400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
    )


_is_container = frozenset({dict, list}).__contains__


def nested_deeper_than(value: object, max_depth: int) -> bool:
    """Whether arrays and objects in `value` nest more than `max_depth` levels (the top one is
    level 1). Level by level, each in C (the referents of a whole level at once, filtered by
    type without a Python loop): about twice as fast as a walk in Python."""
    level = [value]
    for _ in range(max_depth):
        refs = gc.get_referents(*level)
        level = list(compress(refs, map(_is_container, map(type, refs))))
        if not level:
            return False
    return True


def _require(payload: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = payload.get(name)
    if value is None:
        raise ApiError(400, f"missing required parameter: '{name}'", param=name, code="missing")
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ApiError(400, f"'{name}' must be {what}", param=name, code="invalid_type")
    return value


# Upper bounds on the integer parameters the gateway prices a hold from: beyond them a hold
# would be out of the ledger's range, which is the client's mistake (400), not an outage.
# The output limits are bounded by the model's own maximum, which the relay checks and names
# in its 400; here only against the ledger's range.
INT_PARAM_MAX = {
    "max_tokens": 2**62,
    "max_completion_tokens": 2**62,
    "max_output_tokens": 2**62,
    "n": 128,
    "best_of": 128,
}


def _optional_int(payload: dict[str, Any], name: str) -> None:
    value = payload.get(name)
    if value is None:
        return
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not 1 <= value <= (INT_PARAM_MAX[name])
    ):
        raise ApiError(
            400, f"'{name}' must be an integer within 1..{INT_PARAM_MAX[name]}", param=name,
            code="invalid_type",
        )  # fmt: skip


def _validate(endpoint: str, payload: dict[str, Any]) -> None:
    _require(payload, "model", (str,), "a string")
    if endpoint == "chat":
        messages = _require(payload, "messages", (list,), "an array of messages")
        if not messages:
            raise ApiError(400, "'messages' must not be empty", param="messages", code="invalid")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ApiError(
                    400,
                    f"messages[{i}] must be an object with a string 'role'",
                    param=f"messages[{i}]",
                    code="invalid_type",
                )
    elif endpoint == "messages":
        messages = _require(payload, "messages", (list,), "an array of messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                raise ApiError(
                    400, f"messages.{i}: an object with role 'user' or 'assistant'",
                    param=f"messages.{i}", code="invalid_type",
                )  # fmt: skip
        _require(payload, "max_tokens", (int,), "an integer")
    elif endpoint == "responses":
        value = payload.get("input")
        if value is not None and not isinstance(value, str | list):
            raise ApiError(
                400, "'input' must be a string or an array", param="input", code="invalid_type"
            )
    elif endpoint == "completions":
        _require(payload, "prompt", (str, list), "a string or an array")
    else:
        _require(payload, "input", (str, list), "a string or an array")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    if stream and endpoint == "embeddings":
        raise ApiError(400, "embeddings cannot be streamed", param="stream", code="invalid")
    for name in INT_PARAM_MAX:
        _optional_int(payload, name)


def _tags(request: Request, payload: dict[str, Any]) -> dict[str, str]:
    """Client tags: OpenAI's `user` and `metadata` fields and the `X-Tokenworks-Tags` header."""
    tags: dict[str, str] = {}
    user = payload.get("user")
    if isinstance(user, str) and user:
        tags["user"] = user
    metadata = payload.get("metadata")
    if isinstance(metadata, dict):
        for k, v in metadata.items():
            if isinstance(v, str | int | float) and not isinstance(v, bool):
                tags[str(k)] = str(v)
    header = request_header(request, b"x-tokenworks-tags")
    if header:
        for part in header.split(","):
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise ApiError(
                    400,
                    "X-Tokenworks-Tags must be comma-separated name=value pairs",
                    code="invalid_tags",
                )
            tags[name.strip()] = value.strip()
    if len(tags) > MAX_TAGS or any(len(k) + len(v) > MAX_TAG_BYTES for k, v in tags.items()):
        raise ApiError(
            400,
            f"at most {MAX_TAGS} tags of at most {MAX_TAG_BYTES} bytes each",
            code="invalid_tags",
        )
    return tags


MAX_DEADLINE_MS = 86_400_000


def _deadline_ms(request: Request) -> int | None:
    """`X-Tokenworks-Deadline-Ms: N`: the request may wait for a producer at most N ms from
    its arrival; one that cannot start in time is answered 429 with a Retry-After."""
    value = request_header(request, b"x-tokenworks-deadline-ms")
    if value is None:
        return None
    value = value.strip()
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_DEADLINE_MS:
        raise ApiError(
            400,
            f"X-Tokenworks-Deadline-Ms must be an integer number of milliseconds within "
            f"1..{MAX_DEADLINE_MS}",
            code="invalid_deadline",
        )
    return int(value)


async def relay(request: Request, endpoint: str) -> Response:
    gateway = gateway_of(request)
    key = authenticate_any(request) if endpoint == "messages" else authenticate(request)
    payload, size = await read_json_sized(request, gateway.config.limits.max_body_bytes)
    _validate(endpoint, payload)
    name = payload["model"]
    route = gateway.router.get(name)
    if route is None or not key.allows(name):
        raise _no_model(name)
    if "service_tier" not in payload and "service_tier" in key.metadata and endpoint != "messages":
        # The key's default tier, asked of the upstream too so it serves what we bill.
        payload["service_tier"] = key.metadata["service_tier"]
    stream = payload.get("stream") is True
    options = payload.get("stream_options")
    # OpenRouter's provider preferences are the gateway's to apply, never an upstream's.
    provider = payload.pop("provider", None)
    call = Call(
        endpoint=endpoint,
        payload=payload,
        key=key,
        route=route,
        stream=stream,
        client_wants_usage=isinstance(options, dict) and options.get("include_usage") is True,
        tags=_tags(request, payload),
        tariff=gateway.pricer.tariff_for(key.account_id),
        body_bytes=size,
        provider=None if provider is None else parse_provider(provider),
        deadline_ms=_deadline_ms(request),
        receive=request.receive,
    )
    if endpoint == "messages":
        call.anthropic_headers = anthropic_forwarded(request.headers)
    response: Response = await gateway.relay.handle(call)
    return response


def _no_model(name: str) -> ApiError:
    # One answer for unknown and out of scope, so a key cannot probe which models exist.
    return ApiError(
        404,
        f"The model '{name}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


async def chat_completions(request: Request) -> Response:
    return await relay(request, "chat")


async def completions(request: Request) -> Response:
    return await relay(request, "completions")


async def embeddings(request: Request) -> Response:
    return await relay(request, "embeddings")


def _model_entry(gateway: GatewayView, name: str, tariff: str | None) -> dict[str, Any]:
    input_per_mtok, output_per_mtok = gateway.pricer.list_price(name, tariff=tariff)
    return {
        "id": name,
        "object": "model",
        "created": int(gateway.started_s),
        "owned_by": "tokenworks",
        # What this key pays now, per million tokens, in the ledger currency.
        "pricing": {
            "currency": gateway.pricer.currency,
            "input_per_mtok": input_per_mtok,
            "output_per_mtok": output_per_mtok,
        },
    }


async def models(request: Request) -> Response:
    key = authenticate(request)
    gateway = gateway_of(request)
    tariff = gateway.pricer.tariff_for(key.account_id)
    data = [
        _model_entry(gateway, name, tariff)
        for name in sorted(gateway.router.routes)
        if key.allows(name)
    ]
    return Response(_encode({"object": "list", "data": data}), media_type="application/json")


async def model(request: Request) -> Response:
    """`GET /v1/models/{id}` (the SDK's `models.retrieve`): one entry of the list."""
    key = authenticate(request)
    gateway = gateway_of(request)
    name = request.path_params["model"]
    if name not in gateway.router.routes or not key.allows(name):
        raise _no_model(name)
    tariff = gateway.pricer.tariff_for(key.account_id)
    return Response(_encode(_model_entry(gateway, name, tariff)), media_type="application/json")


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    # Model names may contain slashes (`meta-llama/Llama-3-8B`).
    Route("/v1/models/{model:path}", model, methods=["GET"]),
]

__all__ = ["routes"]
