"""`POST /v1/keys`: an agent mints a key for a sub-agent it spawns, with a delegated budget.

The child pays from the parent's account, may use at most the parent's models, expires no
later than the parent, and its budget is carved out of the parent key's room in the ledger:
the child's spend counts against the parent, and revoking or expiring the parent revokes the
child, whose unspent room returns. Minting is one insert and one in-memory ledger update, so
an agent that spawns a thousand sub-agents pays a thousand cheap calls.

What an agent can make the gateway keep is bounded (`keys:` in the config): live children
per key, live keys per tree (all depths below an admin-made key), and a mint rate per tree;
names and metadata are bounded in `key_requests.py`.
"""

from __future__ import annotations

import math
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenworks.api.admin import MAX_ADMIN_BODY_BYTES, _limit_view, json_response
from tokenworks.api.errors import ApiError
from tokenworks.api.key_requests import (
    find_retry,
    optional_idempotency_key,
    parse_key_name,
    parse_limit,
    parse_models,
    parse_ttl,
)
from tokenworks.api.openai import authenticate, bearer, gateway_of, open_ledger, read_json
from tokenworks.config import KeyLimits
from tokenworks.keys.store import ApiKey
from tokenworks.ledger import IdempotencyConflict, LedgerError, Refused, StoreUnavailable
from tokenworks.money import format_nano


class MintRate:
    """A token bucket per key tree (keyed by its root, the admin-made key): `burst` mints at
    once, then `rate_per_s`. Per tree rather than per parent, since every child may mint too:
    per-parent buckets would multiply with the tree's width."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # root id -> (tokens, at_s)

    def take(self, root_id: str, now_s: float) -> float:
        """0.0 if a mint may proceed now (and it is counted), else seconds until one may."""
        tokens, at_s = self._buckets.get(root_id, (float(self.burst), now_s))
        tokens = min(float(self.burst), tokens + (now_s - at_s) * self.rate_per_s)
        if tokens < 1.0:
            self._buckets[root_id] = (tokens, now_s)
            return (1.0 - tokens) / self.rate_per_s
        self._buckets[root_id] = (tokens - 1.0, now_s)
        return 0.0


def check_room(gateway: Any, parent: ApiKey, now_ms: int) -> None:
    """Refuse a new child beyond the configured mint rate (429) or counts (403). The rate
    comes first: a count at its cap prunes expired keys, which the rate keeps rare."""
    limits: KeyLimits = gateway.config.keys
    keys = gateway.keys
    root = keys.root_of(parent)
    wait_s = gateway.mint_rate.take(root.id, now_ms / 1000)
    if wait_s > 0:
        retry_after_s = max(1, math.ceil(wait_s))
        raise ApiError(
            429, f"sub-agent keys are minted at most {limits.mint_rate_per_s:g} per second "
            "per key tree; retry later", code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after_s)},
        )  # fmt: skip
    if keys.live_children(parent.id, now_ms, limits.max_children_per_key) >= (
        limits.max_children_per_key
    ):
        raise ApiError(
            403, f"this key already has {limits.max_children_per_key} live sub-agent keys; "
            "revoke some first", code="too_many_keys",
        )  # fmt: skip
    if keys.live_descendants(root.id, now_ms, limits.max_keys_per_tree) >= (
        limits.max_keys_per_tree
    ):
        raise ApiError(
            403, f"this key's tree already has {limits.max_keys_per_tree} live sub-agent keys; "
            "revoke some first", code="too_many_keys",
        )  # fmt: skip


async def mint_child_key(request: Request) -> Response:
    try:
        parent = authenticate(request)
        gateway = gateway_of(request)
        body = await read_json(request, MAX_ADMIN_BODY_BYTES)
        name = parse_key_name(body)
        if parent.account_id is None:
            raise ApiError(403, "this key has no account to delegate from", code="no_account")
        asked_models = parse_models(body, gateway.router.routes)
        models = asked_models
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
        asked_ttl_s = parse_ttl(body)
        ttl_s = asked_ttl_s
        now_ms = int(time.time() * 1000)
        if parent.expires_ms is not None:
            left_s = (parent.expires_ms - now_ms) / 1000
            ttl_s = left_s if ttl_s is None else min(ttl_s, left_s)
        # A sub-agent is served at its parent's default tier.
        metadata = {k: v for k, v in parent.metadata.items() if k == "service_tier"}
        # A retry (same Idempotency-Key, same request) gets the same child and secret, derived
        # from the parent's own secret: an agent that lost the answer does not mint a second
        # budget. What is compared is what the agent asked (its TTL before the parent's cap,
        # which shrinks between retries).
        asked = {
            "name": name, "models": asked_models, "limit": limit,
            "ttl_ms": int(asked_ttl_s * 1000) if asked_ttl_s is not None else None,
        }  # fmt: skip
        child, child_id, secret = find_retry(
            gateway.keys, bearer(request), optional_idempotency_key(request, body), asked
        )
        if child is not None and not child.active(now_ms):
            # The first call was refused (its key revoked at once) or the key is gone: a retry
            # must not bring it back. A new request needs a new idempotency key.
            raise ApiError(
                409, "this idempotency key belongs to a key that was refused, revoked or has "
                "expired; use a new idempotency key", code="idempotency_conflict",
            )  # fmt: skip
        if child is None:
            check_room(gateway, parent, now_ms)
            child, secret = gateway.keys.create(
                name, models, account_id=parent.account_id, parent_id=parent.id,
                ttl_s=ttl_s, metadata=metadata, secret=secret, key_id=child_id,
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
