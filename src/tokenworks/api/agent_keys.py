"""`POST /v1/keys`: an agent mints a key for a sub-agent it spawns, with a delegated budget.

The child pays from the parent's account, may use at most the parent's models, expires no
later than the parent, and its budget is carved out of the parent key's room in the ledger:
the child's spend counts against the parent, and revoking or expiring the parent revokes the
child, whose unspent room returns. Minting is one insert and one in-memory ledger update, so
an agent that spawns a thousand sub-agents pays a thousand cheap calls.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenworks.api.admin import (
    MAX_ADMIN_BODY_BYTES,
    _limit_view,
    json_response,
    optional_idempotency_key,
    parse_key_name,
    parse_limit,
    parse_models,
    parse_ttl,
    same_request,
)
from tokenworks.api.errors import ApiError
from tokenworks.api.openai import authenticate, bearer, gateway_of, open_ledger, read_json
from tokenworks.keys.store import derived_secret
from tokenworks.ledger import IdempotencyConflict, LedgerError, Refused, StoreUnavailable
from tokenworks.money import format_nano


async def mint_child_key(request: Request) -> Response:
    try:
        parent = authenticate(request)
        gateway = gateway_of(request)
        body = await read_json(request, MAX_ADMIN_BODY_BYTES)
        name = parse_key_name(body)
        if parent.account_id is None:
            raise ApiError(403, "this key has no account to delegate from", code="no_account")
        models = parse_models(body)
        if models is None:
            models = sorted(parent.models) if parent.models is not None else None
        elif not parent.allows_all(models):
            raise ApiError(
                403, "a child key may only use models its parent may use", param="models"
            )
        limit = parse_limit(body, default_period="total")
        if limit is None:
            raise ApiError(400, "a child key needs a 'limit' (its delegated budget)", param="limit")
        if limit[1] != "total":
            raise ApiError(400, "a delegated budget's period is 'total'", param="limit.period")
        ttl_s = parse_ttl(body)
        now_ms = int(time.time() * 1000)
        if parent.expires_ms is not None:
            left_s = (parent.expires_ms - now_ms) / 1000
            ttl_s = left_s if ttl_s is None else min(ttl_s, left_s)
        # A sub-agent is served at its parent's default tier.
        metadata = {k: v for k, v in parent.metadata.items() if k == "service_tier"}
        # A retry (same Idempotency-Key) gets the same child and secret, derived from the
        # parent's own secret: an agent that lost the answer does not mint a second budget.
        idempotency_key = optional_idempotency_key(request, body)
        secret = derived_secret(bearer(request), idempotency_key) if idempotency_key else None
        child = gateway.keys.by_secret(secret) if secret else None
        if child is not None and not child.active(int(time.time() * 1000)):
            # The first call was refused (its key revoked at once) or the key is gone: a retry
            # must not bring it back. A new request needs a new idempotency key.
            raise ApiError(
                409, "this idempotency key belongs to a key that was refused, revoked or has "
                "expired; use a new idempotency key", code="idempotency_conflict",
            )  # fmt: skip
        if child is not None:
            same_request(
                child, name, models, parent.account_id, parent.id, None, metadata,
                check_ttl=False,
            )  # fmt: skip
        else:
            child, secret = gateway.keys.create(
                name, models, account_id=parent.account_id, parent_id=parent.id,
                ttl_s=ttl_s, metadata=metadata, secret=secret,
            )  # fmt: skip
        try:
            await open_ledger(gateway).delegate(
                parent.id, child.id, limit[0], idempotency_key=f"delegate:{child.id}",
                expires_ms=child.expires_ms,
            )  # fmt: skip
        except Refused as exc:
            gateway.keys.revoke(child.id)
            raise ApiError(
                402,
                f"the parent key's room is {format_nano(max(exc.available_nano, 0))}, "
                f"less than the {format_nano(limit[0])} asked for",
                code="insufficient_quota",
            ) from exc
        except IdempotencyConflict as exc:
            raise ApiError(
                409, "this idempotency key was used for a different child key",
                code="idempotency_conflict",
            ) from exc  # fmt: skip
        except StoreUnavailable as exc:
            gateway.keys.revoke(child.id)
            raise ApiError(503, "the ledger is unavailable", code="ledger_unavailable") from exc
        except LedgerError as exc:
            gateway.keys.revoke(child.id)
            raise ApiError(400, str(exc), code="delegation_refused") from exc
        return json_response({**child.public(), "key": secret, "limit": _limit_view(limit)}, 201)
    except ApiError as exc:
        return exc.response()


routes = [Route("/v1/keys", mint_child_key, methods=["POST"])]
