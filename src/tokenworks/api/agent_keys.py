"""`POST /v1/keys`: an agent mints a key for a sub-agent it spawns, with a delegated budget.

The child pays from the parent's account, may use at most the parent's models, expires no
later than the parent, and its budget is carved out of the parent key's room in the ledger:
the child's spend counts against the parent, and revoking or expiring the parent revokes the
child, whose unspent room returns. Minting is one insert and one in-memory ledger update, so
an agent that spawns a thousand sub-agents pays a thousand cheap calls.

What an agent can make the gateway keep is bounded (`keys:` in the config): live children
per key, live keys per tree (all depths below an admin-made key), and a mint rate per tree;
names and metadata are bounded in `key_requests.py`. A child's rate limits are no looser
than its parent's: a field it leaves out is the parent's, one it asks looser is refused (403
naming the field; never clamped, so an agent is not surprised later by a limit it did not ask
for), and its requests draw on its parent's limits too, so minting cannot multiply a rate.
What minting does is `keys/lifecycle.py`'s; this handler parses, calls and returns.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenworks.api.admin import MAX_ADMIN_BODY_BYTES, _limit_view, json_response
from tokenworks.api.errors import ApiError
from tokenworks.api.idempotency import idempotency_key
from tokenworks.api.key_requests import (
    parse_key_name,
    parse_limit,
    parse_models,
    parse_rate_limits,
    parse_ttl,
    refuse_unknown_fields,
)
from tokenworks.api.openai import authenticate, bearer, gateway_of, open_ledger, read_json
from tokenworks.keys import lifecycle

CHILD_KEY_FIELDS = ("name", "models", "limit", "ttl_s", "rate_limits", "idempotency_key")


async def mint_child_key(request: Request) -> Response:
    parent = authenticate(request)
    gateway = gateway_of(request)
    body = await read_json(request, MAX_ADMIN_BODY_BYTES)
    refuse_unknown_fields(body, CHILD_KEY_FIELDS)
    name = parse_key_name(body)
    lifecycle.require_delegable(parent)
    asked_models = parse_models(body, gateway.router.routes)
    lifecycle.child_models(parent, asked_models)
    limit = parse_limit(body, default_period="total")
    if limit is None:
        raise ApiError(400, "a child key needs a 'limit' (its delegated budget)", param="limit")
    if limit[1] != "total":
        raise ApiError(400, "a delegated budget's period is 'total'", param="limit.period")
    ttl_s = parse_ttl(body)
    rate_limits = lifecycle.child_rate_limits(parent, parse_rate_limits(body))
    child, secret = await lifecycle.mint_child(
        gateway.keys, open_ledger(gateway), parent, bearer(request),
        idempotency_key(request.headers, body, required=False),
        lifecycle.NewChild(name, asked_models, limit[0], ttl_s, rate_limits),
        limits=gateway.config.keys, mint_rate=gateway.mint_rate,
        now_ms=int(time.time() * 1000),
    )  # fmt: skip
    return json_response({**child.public(), "key": secret, "limit": _limit_view(limit)}, 201)


routes = [Route("/v1/keys", mint_child_key, methods=["POST"])]
