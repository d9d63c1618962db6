"""`GET /openapi.json`: the OpenAPI 3.1 document of the consumer API (/v1) and the admin API
(/admin/v1), the contract tests/test_fuzz_api.py fuzzes every endpoint from.

The handlers validate bodies by hand (api/openai.py, api/admin.py, api/admin_ledger.py), so
the schemas are written here next to nothing they could be generated from; the enumerations
(account kinds, periods, limits) are taken from the code so the two cannot drift. Consumer
bodies allow extra fields (the gateway passes them to the upstream untouched); ledger bodies
do not (an unknown field is a 400 there). Every error has the OpenAI shape.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenworks.api.admin_ledger import MAX_LIST_LIMIT
from tokenworks.api.idempotency import MAX_IDEMPOTENCY_KEY_CHARS
from tokenworks.api.key_requests import PERIODS
from tokenworks.keys.rate_limits import MAX_RATE_LIMIT
from tokenworks.ledger.domain import CUSTOMER_KINDS, AccountKind, Period

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
NAME_FILTER: Schema = {"type": "string", "maxLength": 256}
NULLABLE_STRING: Schema = {"type": ["string", "null"]}
POSITIVE_INT: Schema = {"type": "integer", "minimum": 1}
# Amounts are decimal strings of nano-units ("12.50"): JSON numbers are refused for money.
AMOUNT: Schema = {
    "type": "string",
    "pattern": r"^[0-9]{1,10}(\.[0-9]{1,9})?$",
    "description": "a decimal string in the ledger currency, at most 9 places",
    "examples": ["12.50"],
}
ACCOUNT_ID: Schema = {"type": "integer", "minimum": 1, "maximum": 2**62 - 1}
# Times: "2026-11-29", "2026-11-29T10:00:00Z" or unix seconds.
TIME: Schema = {"type": "string", "description": "ISO 8601 date/time or unix seconds"}
IDEMPOTENCY_KEY: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_IDEMPOTENCY_KEY_CHARS,
    "pattern": r"^[\x20-\x7e]+$",
    "description": "the same key retries the same operation; a new operation needs a new key",
}
ERROR_REF: Schema = {"$ref": "#/components/schemas/Error"}


def _obj(
    properties: Schema, required: tuple[str, ...] = (), *, extra: bool = True, **more: Any
) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **more}
    if required:
        schema["required"] = list(required)
    if not extra:
        schema["additionalProperties"] = False
    return schema


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _op(
    summary: str,
    ok_status: int,
    ok: Schema,
    *,
    security: str,
    body: Schema | None = None,
    params: list[Schema] | None = None,
    ok_content: Schema | None = None,
    errors: tuple[int, ...] = (),
) -> Schema:
    responses: Schema = {
        str(ok_status): {"description": "success", "content": ok_content or _json(ok)},
    }
    for status in (401, *errors):
        responses[str(status)] = {"description": "error", "content": _json(ERROR_REF)}
    responses["default"] = {"description": "error", "content": _json(ERROR_REF)}
    op: Schema = {"summary": summary, "security": [{security: []}], "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(body)}
    if params:
        op["parameters"] = params
    return op


def _query(name: str, schema: Schema, description: str = "") -> Schema:
    param: Schema = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        param["description"] = description
    return param


def _path(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema}


IDEMPOTENCY_HEADER: Schema = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": IDEMPOTENCY_KEY,
    "description": "instead of the body's idempotency_key (they must agree when both are sent)",
}

# -------------------------------------------------------------------------- consumer API

_TOKEN_IDS: Schema = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_TEXTS: Schema = {
    "oneOf": [
        STRING,
        {"type": "array", "items": STRING},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS},
    ]
}
_PRODUCER_NAMES: Schema = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 256},
    "maxItems": 64,
}
_SORT: Schema = {"enum": ["price", "throughput", "latency"]}
_PRICE_PER_MTOK: Schema = {
    "oneOf": [
        {"type": "number", "minimum": 0, "maximum": 1e12},
        {"type": "string", "pattern": r"^\s*[0-9]{1,12}(\.[0-9]{1,12})?\s*$"},
    ]
}
_COMMON_REQUEST: Schema = {
    "model": {"type": "string", "description": "a public model name (GET /v1/models)"},
    "stream": {"type": "boolean"},
    "stream_options": _obj({"include_usage": {"type": "boolean"}}),
    "max_tokens": POSITIVE_INT,
    "n": POSITIVE_INT,
    "service_tier": {"type": "string", "description": "priced per tier; an unknown one is 400"},
    "user": {"type": "string", "description": "kept as the `user` tag of the usage record"},
    "metadata": {
        "type": "object",
        "additionalProperties": {"type": ["string", "number"]},
        "description": "kept as tags of the usage record (at most 32, 256 bytes each)",
    },
    "provider": _obj(
        {
            **{name: _PRODUCER_NAMES for name in ("order", "only", "ignore")},
            "allow_fallbacks": {"type": "boolean"},
            "sort": {
                "oneOf": [
                    _SORT,
                    _obj({"by": _SORT, "partition": {"enum": ["model", "none"]}}, extra=False),
                ]
            },
            "max_price": _obj(
                {name: _PRICE_PER_MTOK for name in ("prompt", "completion", "request")},
                extra=False,
            ),
        },
        extra=False,
        description=(
            "OpenRouter's provider routing, applied by the gateway and never sent upstream;"
            " names are producer names (case-insensitive); max_price is in the ledger"
            " currency per million tokens. A constraint leaving no producer is a 400"
            " no_provider_left naming it"
        ),
    ),
}
CHAT_REQUEST = _obj(
    {
        **_COMMON_REQUEST,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": _obj(
                {
                    "role": {"type": "string"},
                    "content": {"type": ["string", "array", "null"]},
                },
                ("role",),
            ),
        },
        "max_completion_tokens": POSITIVE_INT,
    },
    ("model", "messages"),
)
COMPLETION_REQUEST = _obj(
    {**_COMMON_REQUEST, "prompt": _TEXTS, "best_of": POSITIVE_INT}, ("model", "prompt")
)
EMBEDDING_REQUEST = _obj(
    {
        "model": _COMMON_REQUEST["model"],
        "input": _TEXTS,
        "dimensions": POSITIVE_INT,
        "encoding_format": {"enum": ["float", "base64"]},
        "user": _COMMON_REQUEST["user"],
        "metadata": _COMMON_REQUEST["metadata"],
    },
    ("model", "input"),
)
USAGE: Schema = _obj(
    {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "cost": {"type": "string", "description": "what this request was charged"},
    }
)
COMPLETION_RESPONSE = _obj(
    {
        "id": STRING,
        "object": STRING,
        "model": STRING,
        "choices": {"type": "array", "items": {"type": "object"}},
        "usage": USAGE,
    },
    ("choices",),
)
EMBEDDING_RESPONSE = _obj(
    {"object": STRING, "data": {"type": "array"}, "model": STRING, "usage": USAGE}, ("data",)
)
_MESSAGE_BLOCKS: Schema = {"type": ["string", "array"], "items": {"type": "object"}}
MESSAGES_REQUEST = _obj(
    {
        "model": _COMMON_REQUEST["model"],
        "max_tokens": POSITIVE_INT,
        "messages": {
            "type": "array",
            "items": _obj(
                {"role": {"enum": ["user", "assistant"]}, "content": _MESSAGE_BLOCKS},
                ("role", "content"),
            ),
        },
        "system": _MESSAGE_BLOCKS,
        "stream": {"type": "boolean"},
        "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {"type": "object"},
        "metadata": _obj({"user_id": STRING}),
    },
    ("model", "max_tokens", "messages"),
)
COUNT_TOKENS_REQUEST = _obj(
    {k: v for k, v in MESSAGES_REQUEST["properties"].items() if k != "max_tokens"},
    ("model", "messages"),
)
MESSAGE_RESPONSE = _obj(
    {
        "id": STRING,
        "type": {"const": "message"},
        "role": {"const": "assistant"},
        "model": STRING,
        "content": {"type": "array", "items": {"type": "object"}},
        "stop_reason": NULLABLE_STRING,
        "usage": _obj(
            {
                "input_tokens": {"type": "integer"},
                "output_tokens": {"type": "integer"},
                "cache_creation_input_tokens": {"type": "integer"},
                "cache_read_input_tokens": {"type": "integer"},
                "cost": {"type": "string", "description": "what this request was charged"},
            }
        ),
    },
    ("content",),
)
RESPONSES_REQUEST = _obj(
    {
        "model": _COMMON_REQUEST["model"],
        "input": {"type": ["string", "array"], "items": {"type": "object"}},
        "instructions": STRING,
        "stream": {"type": "boolean"},
        "max_output_tokens": POSITIVE_INT,
        "tools": {"type": "array", "items": {"type": "object"}},
        "text": {"type": "object"},
        "reasoning": {"type": "object"},
        "previous_response_id": {
            "type": "string",
            "description": "only on models whose producers speak Responses (and store them)",
        },
        "store": {"type": "boolean"},
        "user": _COMMON_REQUEST["user"],
        "metadata": _COMMON_REQUEST["metadata"],
    },
    ("model",),
)
RESPONSE_OBJECT = _obj(
    {
        "id": STRING,
        "object": {"const": "response"},
        "model": STRING,
        "status": STRING,
        "output": {"type": "array", "items": {"type": "object"}},
        "usage": _obj(
            {
                "input_tokens": {"type": "integer"},
                "output_tokens": {"type": "integer"},
                "total_tokens": {"type": "integer"},
                "cost": {"type": "string", "description": "what this request was charged"},
            }
        ),
    },
    ("id", "output"),
)
_TYPED_STREAM: Schema = {
    "text/event-stream": {
        "schema": {
            "type": "string",
            "description": "the dialect's typed events (`event: <type>` then `data: {...}`), "
            "usage in the last (`message_delta` / `response.completed`)",
        }
    }
}
_STREAM: Schema = {
    "text/event-stream": {
        "schema": {
            "type": "string",
            "description": "`data: {chunk}` events, then `data: [DONE]`; a stream cut by the "
            'upstream ends with `data: {"error": ...}` and no [DONE]',
        }
    }
}
_MODEL = _obj(
    {
        "id": STRING,
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": STRING,
        "pricing": _obj({"currency": STRING, "input_per_mtok": STRING, "output_per_mtok": STRING}),
    },
    ("id", "object"),
)
LIMIT_TOTAL = _obj({"amount": AMOUNT, "period": {"const": "total"}}, ("amount",), extra=False)
LIMIT = _obj({"amount": AMOUNT, "period": {"enum": list(PERIODS)}}, ("amount",), extra=False)
_RATE: Schema = {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_RATE_LIMIT}
RATE_LIMITS_FIELDS: Schema = {"rpm": _RATE, "tpm": _RATE, "max_concurrency": _RATE}
RATE_LIMITS = _obj(
    RATE_LIMITS_FIELDS,
    extra=False,
    description="requests per minute, tokens per minute (the request's size in bytes plus its"
    " max_tokens reserved, corrected to the actual), concurrent requests; per gateway process",
)
KEY = _obj(
    {
        "id": STRING,
        "name": STRING,
        "hint": STRING,
        "models": {"type": ["array", "null"], "items": STRING},
        "account": NULLABLE_STRING,
        "parent": NULLABLE_STRING,
        "created_at": {"type": "integer"},
        "expires_at": {"type": ["integer", "null"]},
        "revoked_at": {"type": ["integer", "null"]},
        "metadata": {"type": "object", "additionalProperties": STRING},
        "rate_limits": {"oneOf": [RATE_LIMITS, {"type": "null"}]},
    },
    ("id", "name"),
)
NEW_KEY = {
    **KEY,
    "properties": {
        **KEY["properties"],
        "key": {"type": "string", "description": "the secret, shown once"},
        "limit": {"oneOf": [LIMIT, {"type": "null"}]},
    },
    "required": ["id", "name", "key"],
}
KEY_NAME: Schema = {"type": "string", "minLength": 1, "pattern": r"\S"}
MODELS: Schema = {"type": ["array", "null"], "items": STRING}
TTL_S: Schema = {"type": "number", "exclusiveMinimum": 0}
CHILD_KEY_REQUEST = _obj(
    {
        "name": KEY_NAME,
        "models": {**MODELS, "description": "at most the parent's models (default: those)"},
        "limit": LIMIT_TOTAL,
        "ttl_s": TTL_S,
        "rate_limits": {
            **RATE_LIMITS,
            "description": "each at most the parent's (a field left out is the parent's)",
        },
        "idempotency_key": IDEMPOTENCY_KEY,
    },
    ("name", "limit"),
    extra=False,
)


def _consumer_paths() -> Schema:
    def relay(summary: str, body: Schema, ok: Schema, stream: bool) -> Schema:
        content = {**_json(ok), **(_STREAM if stream else {})}
        return {
            "post": _op(
                summary,
                200,
                ok,
                security="consumerKey",
                body=body,
                ok_content=content,
                errors=(400, 402, 404, 413, 429, 502, 503, 504),
            )
        }

    return {
        "/v1/chat/completions": relay(
            "Chat completion (OpenAI shape), metered, priced and charged",
            CHAT_REQUEST,
            COMPLETION_RESPONSE,
            True,
        ),
        "/v1/completions": relay(
            "Text completion (OpenAI shape)", COMPLETION_REQUEST, COMPLETION_RESPONSE, True
        ),
        "/v1/embeddings": relay(
            "Embeddings (OpenAI shape)", EMBEDDING_REQUEST, EMBEDDING_RESPONSE, False
        ),
        "/v1/models": {
            "get": _op(
                "The models this key may call, with its prices",
                200,
                _obj(
                    {"object": {"const": "list"}, "data": {"type": "array", "items": _MODEL}},
                    ("data",),
                ),
                security="consumerKey",
            )
        },
        "/v1/models/{model}": {
            "get": _op(
                "One model this key may call, with its prices (404 when it may not)",
                200,
                _MODEL,
                security="consumerKey",
                params=[_path("model", STRING)],
                errors=(404,),
            )
        },
        "/v1/messages": {
            "post": _op(
                "Anthropic Messages (x-api-key or Bearer; Anthropic-shaped errors), passed "
                "through to producers that speak it, translated for the others",
                200,
                MESSAGE_RESPONSE,
                security="consumerKey",
                body=MESSAGES_REQUEST,
                ok_content={**_json(MESSAGE_RESPONSE), **_TYPED_STREAM},
                errors=(400, 402, 404, 413, 429, 502, 503, 504),
            )
        },
        "/v1/messages/count_tokens": {
            "post": _op(
                "Input tokens of a Messages request: the producer's count, else an offline one",
                200,
                _obj({"input_tokens": {"type": "integer"}}, ("input_tokens",)),
                security="consumerKey",
                body=COUNT_TOKENS_REQUEST,
                errors=(400, 404, 413),
            )
        },
        "/v1/responses": {
            "post": _op(
                "OpenAI Responses, passed through to producers that speak it, translated "
                "to chat completions for the others",
                200,
                RESPONSE_OBJECT,
                security="consumerKey",
                body=RESPONSES_REQUEST,
                ok_content={**_json(RESPONSE_OBJECT), **_TYPED_STREAM},
                errors=(400, 402, 404, 413, 429, 502, 503, 504),
            )
        },
        "/v1/responses/{response_id}": {
            method: _op(
                summary,
                200,
                _obj({"id": STRING}, ("id",)),
                security="consumerKey",
                params=[_path("response_id", STRING)],
                errors=(404,),
            )
            for method, summary in (
                ("get", "A stored response (producers that speak Responses store them)"),
                ("delete", "Delete a stored response"),
            )
        },
        "/v1/keys": {
            "post": _op(
                "Mint a child key for a sub-agent, with a budget carved from this key's room",
                201,
                NEW_KEY,
                security="consumerKey",
                body=CHILD_KEY_REQUEST,
                params=[IDEMPOTENCY_HEADER],
                errors=(400, 402, 403, 409, 413, 503),
            )
        },
    }


# -------------------------------------------------------------------------- admin API

_CUSTOMER_KINDS = [str(k) for k in AccountKind if k in CUSTOMER_KINDS]
_ALL_KINDS = [str(k) for k in AccountKind]
_PERIODS = [str(p) for p in Period]
_RECURRING = [str(p) for p in Period if p is not Period.TOTAL]

CREATE_KEY_REQUEST = _obj(
    {
        "name": KEY_NAME,
        "models": {**MODELS, "description": "null: every model"},
        "ttl_s": TTL_S,
        "metadata": {"type": ["object", "null"]},
        "account": {
            "oneOf": [ACCOUNT_ID, {"type": "string", "pattern": r"^[0-9]{1,18}$"}],
            "description": "the account that pays for this key's requests",
        },
        "service_tier": {"type": "string", "description": "the key's default tier"},
        "limit": {**LIMIT, "description": "a budget on this key (needs an account)"},
        "rate_limits": RATE_LIMITS,
        "idempotency_key": IDEMPOTENCY_KEY,
    },
    ("name",),
    extra=False,
)
ACCOUNT_PATH = _path(
    "account_id", {"type": "string", "pattern": r"^[0-9]{1,18}$", "examples": ["1"]}
)
KEY_PATH = _path("key_id", {"type": "string", "minLength": 1})
_WRITE = {"idempotency_key": IDEMPOTENCY_KEY}
_WRITE_REQUIRED = ("idempotency_key",)
MONEY = {"amount": STRING, "amount_nano": {"type": "integer"}}
BALANCE = _obj(
    {
        name: STRING
        for name in ("total", "available", "held", "chain_available", "spent_this_period")
    }
    | {
        f"{name}_nano": {"type": "integer"}
        for name in ("total", "available", "held", "chain_available", "spent_this_period")
    }
    | {"period": {"type": ["string", "null"]}, "spent_by_period": {"type": "object"}},
    ("total_nano", "available_nano", "held_nano"),
)
ACCOUNT = _obj(
    {
        "object": {"const": "ledger.account"},
        "id": {"type": "integer"},
        "name": STRING,
        "parent_id": {"type": ["integer", "null"]},
        "kind": {"enum": _ALL_KINDS},
        "draws_on_parent": {"type": "boolean"},
        "balance": BALANCE,
    },
    ("id", "name", "kind"),
)
BUDGET = _obj(
    {
        "object": {"const": "ledger.budget"},
        "scope": {},
        "period": {"enum": _PERIODS},
        "limit": STRING,
        "spent": STRING,
        "room": STRING,
        "limit_nano": {"type": "integer"},
        "spent_nano": {"type": "integer"},
        "room_nano": {"type": "integer"},
    },
    ("period", "limit_nano"),
)
LIST = _obj({"object": {"const": "list"}, "data": {"type": "array"}}, ("data",))
LEDGER_ERRORS = (400, 402, 403, 404, 409, 413, 503)


def _admin_op(summary: str, status: int, ok: Schema, **kwargs: Any) -> Schema:
    kwargs.setdefault("errors", LEDGER_ERRORS)
    return _op(summary, status, ok, security="adminKey", **kwargs)


def _admin_write(summary: str, ok: Schema, body: Schema, **kwargs: Any) -> Schema:
    params = [*kwargs.pop("params", []), IDEMPOTENCY_HEADER]
    return _admin_op(summary, kwargs.pop("status", 201), ok, body=body, params=params, **kwargs)


def _admin_paths() -> Schema:
    return {
        "/admin/v1/keys": {
            "post": _admin_write(
                "Create an API key (optionally paid by an account, with a budget)",
                NEW_KEY,
                CREATE_KEY_REQUEST,
            ),
            "get": _admin_op(
                "List keys",
                200,
                _obj(
                    {
                        "object": {"const": "list"},
                        "data": {"type": "array", "items": KEY},
                        "has_more": {"type": "boolean"},
                    },
                    ("data",),
                ),
                params=[
                    _query("include_revoked", {"enum": ["true", "false"]}),
                    _query("name", NAME_FILTER, "only keys of this name, in any case"),
                    _query(
                        "after", {"type": "string", "maxLength": 64}, "the previous page's last id"
                    ),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1_000}),
                ],
            ),
        },
        "/admin/v1/keys/{key_id}": {
            "get": _admin_op("One key", 200, KEY, params=[KEY_PATH]),
            "delete": _admin_op(
                "Revoke a key and, transitively, its children",
                200,
                _obj({"id": STRING, "revoked": {"type": "array", "items": STRING}}, ("id",)),
                params=[KEY_PATH],
            ),
        },
        "/admin/v1/usage": {
            "get": _admin_op(
                "Usage summed over records, optionally grouped",
                200,
                _obj(
                    {
                        **LIST["properties"],
                        "group_by": {"type": "array"},
                        "has_more": {"type": "boolean"},
                        "next_after": {
                            "description": "the first group's last value: the next page's"
                            " 'after' (null on the last page)"
                        },
                    },
                    ("data",),
                ),
                params=[
                    _query(
                        "group_by",
                        STRING,
                        "comma-separated: key, model, producer, account, upstream_model, "
                        "status, day; rolled up: team, org (the key's account's ancestor of "
                        "that kind), week (ISO), month",
                    ),
                    _query("since", TIME),
                    _query("until", TIME),
                    _query("key", STRING, "a key id"),
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 10_000},
                        "values of the first group per page (default 200; days when it is"
                        " day); pages follow a first group the store keeps (not team, org,"
                        " week, month)",
                    ),
                    _query("after", STRING, "the previous page's next_after"),
                ],
            )
        },
        "/admin/v1/info": {
            "get": _admin_op(
                "The gateway's version and ledger currency",
                200,
                _obj({"version": STRING, "currency": STRING}, ("version", "currency")),
            )
        },
        "/admin/v1/health": {
            "get": _admin_op("Producer circuit state", 200, _obj({"producers": {}}, ("producers",)))
        },
        "/admin/v1/dispatch": {
            "get": _admin_op(
                "Scheduler state: queues by producer and tier, limits, breakers, served tokens",
                200,
                _obj(
                    {
                        "queued": {"type": "integer"},
                        "waiting": {"type": "integer"},
                        "pools": {"type": "object"},
                        "breakers": {"type": "object"},
                    },
                    ("queued", "pools", "breakers"),
                ),
            )
        },
        "/admin/v1/accounts": {
            "post": _admin_write(
                "Create an account",
                ACCOUNT,
                _obj(
                    {
                        "name": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 200,
                            "pattern": r"\S",
                        },
                        "parent": {"oneOf": [ACCOUNT_ID, {"type": "null"}]},
                        "kind": {"enum": _CUSTOMER_KINDS},
                        "draws_on_parent": {"type": "boolean"},
                        "rate_limits": RATE_LIMITS,
                        **_WRITE,
                    },
                    ("name", *_WRITE_REQUIRED),
                    extra=False,
                ),
            ),
            "get": _admin_op(
                "List accounts with balances",
                200,
                _obj({**LIST["properties"], "has_more": {"type": "boolean"}}, ("data",)),
                params=[
                    _query("parent", {"type": "string", "pattern": r"^[0-9]{1,18}$"}),
                    _query("kind", {"enum": _ALL_KINDS}),
                    _query("include_operator", {"enum": ["true", "false"]}),
                    _query("name", NAME_FILTER, "only accounts of this name, in any case"),
                    _query("after", {"type": "string", "pattern": r"^[0-9]{1,18}$"}),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT}),
                ],
            ),
        },
        "/admin/v1/accounts/{account_id}": {
            "get": _admin_op(
                "An account: balance, credit buckets, grants, budgets",
                200,
                ACCOUNT,
                params=[ACCOUNT_PATH],
            )
        },
        "/admin/v1/accounts/{account_id}/topups": {
            "post": _admin_write(
                "Add paid credit",
                _obj({"object": {"const": "ledger.top_up"}, "id": {"type": "integer"}, **MONEY}),
                _obj({"amount": AMOUNT, **_WRITE}, ("amount", *_WRITE_REQUIRED), extra=False),
                params=[ACCOUNT_PATH],
            )
        },
        "/admin/v1/accounts/{account_id}/grants/{grant_id}": {
            "delete": _admin_op(
                "Revoke a grant: nothing more is issued, its unspent credit expires now",
                200,
                _obj(
                    {"id": {"type": "integer"}, "revoked": {"const": True}, "expired": STRING},
                    ("id", "revoked", "expired"),
                ),
                params=[ACCOUNT_PATH, _path("grant_id", {"type": "integer", "minimum": 1})],
            )
        },
        "/admin/v1/accounts/{account_id}/grants": {
            "post": _admin_write(
                "Grant an allowance (one-off or recurring)",
                _obj({"object": {"const": "ledger.grant"}, "id": {"type": "integer"}, **MONEY}),
                _obj(
                    {
                        "amount": AMOUNT,
                        "expires_at": {"type": ["string", "integer"]},
                        "effective_at": {"type": ["string", "integer"]},
                        "recurring": {
                            "oneOf": [
                                {"enum": _RECURRING},
                                _obj(
                                    {"period": {"enum": _RECURRING}, "tz": STRING},
                                    ("period",),
                                    extra=False,
                                ),
                                {"type": "null"},
                            ]
                        },
                        "rollover": {
                            "type": "string",
                            "description": '"expire", "all" or a cap like "5.00" (recurring)',
                        },
                        "priority": {"type": "integer", "description": "lower is spent first"},
                        **_WRITE,
                    },
                    ("amount", *_WRITE_REQUIRED),
                    extra=False,
                ),
                params=[ACCOUNT_PATH],
            )
        },
        "/admin/v1/accounts/{account_id}/budgets": {
            "post": _admin_write(
                "Set a spending budget for a period",
                BUDGET,
                _obj(
                    {"amount": AMOUNT, "period": {"enum": _PERIODS}, "tz": STRING, **_WRITE},
                    ("amount", "period", *_WRITE_REQUIRED),
                    extra=False,
                ),
                params=[ACCOUNT_PATH],
                status=200,
            ),
            "get": _admin_op(
                "An account's budgets",
                200,
                _obj({"object": {"const": "list"}, "data": {"type": "array", "items": BUDGET}}),
                params=[ACCOUNT_PATH],
            ),
        },
        "/admin/v1/accounts/{account_id}/rate_limits": {
            "post": _admin_op(
                "Replace an account's rate limits (a field left out or null: unlimited)",
                200,
                _obj(
                    {
                        "object": {"const": "account.rate_limits"},
                        "account_id": ACCOUNT_ID,
                        **RATE_LIMITS_FIELDS,
                    }
                ),
                body=_obj({**RATE_LIMITS_FIELDS, **_WRITE}, extra=False),
                params=[ACCOUNT_PATH],
            )
        },
        "/admin/v1/accounts/{account_id}/statement": {
            "get": _admin_op(
                "A statement for a period (default: this month); JSON or CSV",
                200,
                _obj({"object": {"const": "ledger.statement"}}),
                params=[
                    ACCOUNT_PATH,
                    _query("since", TIME),
                    _query("until", TIME),
                    _query("format", {"enum": ["json", "csv"]}),
                ],
                ok_content={
                    **_json(_obj({"object": {"const": "ledger.statement"}})),
                    "text/csv": {"schema": STRING},
                },
            )
        },
        "/admin/v1/transfers": {
            "post": _admin_write(
                "Move credit between accounts",
                _obj({"object": {"const": "ledger.transfer"}, "id": {"type": "integer"}, **MONEY}),
                _obj(
                    {
                        "from": ACCOUNT_ID,
                        "to": ACCOUNT_ID,
                        "amount": AMOUNT,
                        "actor": {"type": "string", "pattern": r"^(operator|account:[0-9]+)$"},
                        **_WRITE,
                    },
                    ("from", "to", "amount", *_WRITE_REQUIRED),
                    extra=False,
                ),
            )
        },
        "/admin/v1/ledger/check": {
            "get": _admin_op(
                "Check the ledger's invariants (500 with the violations when unsound)",
                200,
                _obj(
                    {
                        "object": {"const": "ledger.check"},
                        "ok": {"type": "boolean"},
                        "violations": {"type": "array", "items": STRING},
                        "store_compared": {"type": "boolean"},
                        "checked_at": NULLABLE_STRING,
                    },
                    ("ok", "violations"),
                ),
                errors=(500,),
            )
        },
    }


@cache
def document() -> Schema:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tokenworks",
            "version": "1",
            "description": "An LLM gateway that dispatches, meters, prices and settles tokens. "
            "Amounts are decimal strings in the ledger currency; errors are "
            '{"error": {"message", "type", "param", "code"}}.',
        },
        "paths": {**_consumer_paths(), **_admin_paths()},
        "components": {
            "securitySchemes": {
                "consumerKey": {"type": "http", "scheme": "bearer"},
                "adminKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the admin key (TOKENWORKS_ADMIN_KEY or admin_key)",
                },
            },
            "schemas": {
                "Error": _obj(
                    {
                        "error": _obj(
                            {
                                "message": STRING,
                                "type": STRING,
                                "param": NULLABLE_STRING,
                                "code": NULLABLE_STRING,
                            },
                            ("message", "type", "param", "code"),
                        )
                    },
                    ("error",),
                )
            },
        },
    }


@cache
def _encoded() -> bytes:
    return msgspec.json.encode(document())


async def openapi_json(request: Request) -> Response:
    return Response(_encoded(), media_type="application/json")


routes = [Route("/openapi.json", openapi_json, methods=["GET"])]

__all__ = ["document", "routes"]
