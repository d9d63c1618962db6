"""The admin API under /admin/v1, authorised by the admin key."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenworks.api.errors import ApiError
from tokenworks.api.openai import GatewayView, gateway_of, open_ledger, read_json
from tokenworks.keys.store import derived_secret
from tokenworks.ledger import IdempotencyConflict, LedgerError, StoreUnavailable
from tokenworks.ledger.domain import MAX_AMOUNT_NANO
from tokenworks.money import format_nano, parse_amount
from tokenworks.pricing.quote import PricingError

PERIODS = ("day", "week", "month", "total")

_encode = msgspec.json.encode
MAX_ADMIN_BODY_BYTES = 1024 * 1024
MAX_IDEMPOTENCY_KEY_CHARS = 200


def json_response(data: Any, status: int = 200) -> Response:
    return Response(_encode(data), status_code=status, media_type="application/json")


def require_admin(request: Request) -> None:
    expected = gateway_of(request).admin_key
    if not expected:
        raise ApiError(
            403,
            "the admin API is disabled: set TOKENWORKS_ADMIN_KEY or admin_key in the config",
            code="admin_disabled",
        )
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(secret.strip(), expected):
        raise ApiError(401, "invalid admin key", code="invalid_admin_key")


def parse_time_ms(value: str | None, name: str) -> int | None:
    """`2026-11-29`, `2026-11-29T10:00:00Z`, or unix seconds; naive times are UTC."""
    if value is None or value == "":
        return None
    try:
        if value.replace(".", "", 1).isdigit():
            return int(float(value) * 1000)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ApiError(
            400, f"'{name}' must be an ISO 8601 date/time or unix seconds", param=name
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


Endpoint = Callable[[Request], Awaitable[Response]]


def _admin(handler: Endpoint) -> Endpoint:
    async def wrapped(request: Request) -> Response:
        try:
            require_admin(request)
            return await handler(request)
        except ApiError as exc:
            return exc.response()

    wrapped.__name__ = handler.__name__
    return wrapped


def parse_limit(body: dict[str, Any], *, default_period: str) -> tuple[int, str] | None:
    """`"limit": {"amount": "5.00", "period": "day"}` -> (nano, period); absent -> None."""
    limit = body.get("limit")
    if limit is None:
        return None
    if not isinstance(limit, dict) or not isinstance(limit.get("amount"), str):
        raise ApiError(
            400, "'limit' must be {\"amount\": \"<decimal string>\", \"period\": ...}",
            param="limit",
        )  # fmt: skip
    try:
        amount_nano = parse_amount(limit["amount"])
    except ValueError as exc:
        raise ApiError(400, f"limit.amount: {exc}", param="limit.amount") from exc
    if not 0 <= amount_nano <= MAX_AMOUNT_NANO:
        raise ApiError(
            400, f"limit.amount must be within 0..{format_nano(MAX_AMOUNT_NANO)}",
            param="limit.amount",
        )  # fmt: skip
    period = limit.get("period", default_period)
    if period not in PERIODS:
        raise ApiError(
            400, f"limit.period must be one of {', '.join(PERIODS)}", param="limit.period"
        )
    return amount_nano, period


def check_service_tier(
    gateway: GatewayView, tier: Any, account: str | None, models: list[str] | None
) -> None:
    """A key's default service tier must be priced on every deployment of every model the key
    may call: a request prices it on each candidate before dispatch, and one that cannot is
    refused, so a tier some model lacks is caught here rather than on that model's first call."""
    if not isinstance(tier, str):
        raise ApiError(400, "'service_tier' must be a string", param="service_tier")
    tariff = gateway.pricer.tariff_for(account)
    routes = gateway.router.routes
    for name in models if models is not None else list(routes):
        route = routes.get(name)
        if route is None:
            raise ApiError(400, f"unknown model {name!r}", param="models", code="unknown_model")
        for d in route.deployments:
            try:
                gateway.pricer.worst_case(
                    route.model.name, d.producer, d.model, 0, 0,
                    at=datetime.now(UTC), service_tier=tier, tariff=tariff,
                )  # fmt: skip
            except PricingError as exc:
                raise ApiError(
                    400,
                    f"model {name!r} cannot serve service tier {tier!r} ({exc}); restrict the "
                    "key's 'models' or choose another tier",
                    param="service_tier",
                ) from exc


def parse_key_name(body: dict[str, Any]) -> str:
    """A key's name: non-empty, and storable (PostgreSQL text cannot hold NUL)."""
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, "'name' must be a non-empty string", param="name")
    if "\x00" in name:
        raise ApiError(400, "'name' must not contain NUL characters", param="name")
    return name.strip()


def parse_models(body: dict[str, Any]) -> list[str] | None:
    models = body.get("models")
    if models is not None and (
        not isinstance(models, list) or not all(isinstance(m, str) for m in models)
    ):
        raise ApiError(400, "'models' must be null or an array of model names", param="models")
    return models


def parse_ttl(body: dict[str, Any]) -> float | None:
    ttl_s = body.get("ttl_s")
    if ttl_s is not None and (
        not isinstance(ttl_s, int | float) or isinstance(ttl_s, bool) or ttl_s <= 0
    ):
        raise ApiError(400, "'ttl_s' must be a positive number of seconds", param="ttl_s")
    return ttl_s


@_admin
async def create_key(request: Request) -> Response:
    body = await read_json(request, MAX_ADMIN_BODY_BYTES)
    name = parse_key_name(body)
    models = parse_models(body)
    gateway = gateway_of(request)
    if models is not None:
        unknown = sorted(set(models) - set(gateway.router.routes))
        if unknown:
            raise ApiError(
                400, f"unknown models: {', '.join(unknown)}", param="models", code="unknown_model"
            )
    ttl_s = parse_ttl(body)
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ApiError(400, "'metadata' must be an object", param="metadata")
    account = body.get("account")
    if account is not None:
        if isinstance(account, bool) or not isinstance(account, int | str):
            raise ApiError(400, "'account' must be an account id", param="account")
        try:
            open_ledger(gateway).engine.account(int(account))
        except (ValueError, LedgerError) as exc:
            raise ApiError(404, f"no account {account!r}", param="account") from exc
        account = str(int(account))
    tier = body.get("service_tier")
    if tier is not None:
        check_service_tier(gateway, tier, account, models)
        metadata = {**metadata, "service_tier": tier}
    limit = parse_limit(body, default_period="month")
    if limit is not None and account is None:
        raise ApiError(400, "a key with a limit needs an 'account' to pay for it", param="limit")
    metadata = {str(k): str(v) for k, v in metadata.items()}
    idempotency_key = optional_idempotency_key(request, body)
    assert gateway.admin_key is not None  # _admin answered 403 without one
    secret = derived_secret(gateway.admin_key, idempotency_key) if idempotency_key else None
    key = gateway.keys.by_secret(secret) if secret else None
    if key is not None:  # a retry: the same request must find the same key
        same_request(key, name, models, account, None, ttl_s, metadata)
    else:
        key, secret = gateway.keys.create(
            name, models, account_id=account, ttl_s=ttl_s, metadata=metadata,
            secret=secret,
        )  # fmt: skip
    if limit is not None:  # idempotent too, so a retry finishes what a failed call began
        try:
            await open_ledger(gateway).set_budget(
                ("key", key.id), limit[0], limit[1], idempotency_key=f"key-limit:{key.id}"
            )
        except IdempotencyConflict as exc:
            raise _conflict() from exc
        except StoreUnavailable as exc:
            raise ApiError(503, "the ledger is unavailable", code="ledger_unavailable") from exc
        except LedgerError as exc:
            raise ApiError(400, str(exc), param="limit") from exc
    return json_response({**key.public(), "key": secret, "limit": _limit_view(limit)}, 201)


def optional_idempotency_key(request: Request, body: dict[str, Any]) -> str | None:
    """`idempotency_key` in the body or the `Idempotency-Key` header (they must agree)."""
    in_body = body.get("idempotency_key")
    header = request.headers.get("idempotency-key")
    if in_body is not None and (not isinstance(in_body, str) or not in_body):
        raise ApiError(400, "'idempotency_key' must be a non-empty string", param="idempotency_key")
    if in_body and header and in_body != header:
        raise ApiError(
            400, "the Idempotency-Key header and the body's idempotency_key differ",
            param="idempotency_key",
        )  # fmt: skip
    key = in_body or header
    if key is not None and len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise ApiError(400, "idempotency keys are at most 200 characters", param="idempotency_key")
    return key


def _conflict() -> ApiError:
    return ApiError(
        409,
        "this idempotency key was already used for a different request; "
        "use a new key for a new request",
        code="idempotency_conflict",
    )


def same_request(
    key: Any,
    name: str,
    models: list[str] | None,
    account: str | None,
    parent: str | None,
    ttl_s: float | None,
    metadata: dict[str, str],
    *,
    check_ttl: bool = True,
) -> None:
    """409 unless a retried key creation asks for exactly the key it made the first time.

    A child key's TTL is capped by its parent's remaining life, which shrinks between
    retries, so that comparison is skipped there (`check_ttl=False`).
    """
    ttl_ms = int(ttl_s * 1000) if ttl_s is not None else None
    made_ttl_ms = key.expires_ms - key.created_ms if key.expires_ms is not None else None
    if (
        key.name != name
        or key.models != (frozenset(models) if models is not None else None)
        or key.account_id != account
        or key.parent_id != parent
        or (check_ttl and ttl_ms != made_ttl_ms)
        or key.metadata != metadata
    ):
        raise _conflict()


def _limit_view(limit: tuple[int, str] | None) -> dict[str, str] | None:
    return None if limit is None else {"amount": format_nano(limit[0]), "period": limit[1]}


@_admin
async def list_keys(request: Request) -> Response:
    include = request.query_params.get("include_revoked", "true").lower() != "false"
    keys = gateway_of(request).keys.list(include_revoked=include)
    return json_response({"data": [k.public() for k in keys]})


@_admin
async def get_key(request: Request) -> Response:
    key = gateway_of(request).keys.get(request.path_params["key_id"])
    if key is None:
        raise ApiError(404, "no such key", code="key_not_found")
    return json_response(key.public())


@_admin
async def revoke_key(request: Request) -> Response:
    key_id = request.path_params["key_id"]
    gateway = gateway_of(request)
    try:
        revoked = gateway.keys.revoke(key_id)
    except KeyError as exc:
        raise ApiError(404, "no such key", code="key_not_found") from exc
    await revoke_budgets(gateway, key_id)
    return json_response({"id": key_id, "revoked": [k.id for k in revoked]})


async def revoke_budgets(gateway: GatewayView, key_id: str) -> None:
    """Close a revoked key's delegated budget so its unspent room returns to the parent."""
    ledger = open_ledger(gateway)
    if ledger.budgets(("key", key_id)):
        await ledger.revoke(("key", key_id), idempotency_key=f"revoke-key:{key_id}")


@_admin
async def usage(request: Request) -> Response:
    params = request.query_params
    groups = [g for g in params.get("group_by", "").split(",") if g]
    if "\x00" in params.get("key", ""):  # never a key id, and PostgreSQL cannot compare it
        raise ApiError(400, "'key' must not contain NUL characters", param="key")
    gateway = gateway_of(request)
    await gateway.flush_usage()
    try:
        rows = gateway.store.query(
            groups,
            since_ms=parse_time_ms(params.get("since"), "since"),
            until_ms=parse_time_ms(params.get("until"), "until"),
            key_id=params.get("key") or None,
        )
    except ValueError as exc:
        raise ApiError(400, str(exc), param="group_by") from exc
    data = []
    for row in rows:
        item: dict[str, Any] = dict(row.group)
        item["requests"] = row.requests
        sums = dict(row.sums)
        item.update(sums)
        item["total_tokens"] = sums["input_tokens"] + sums["output_tokens"]
        # Amounts are decimal strings in the ledger currency; the nano integers stay exact.
        item["cost"] = format_nano(sums["cost_nano"])
        item["price"] = format_nano(sums["price_nano"])
        data.append(item)
    return json_response({"object": "list", "group_by": groups, "data": data})


@_admin
async def health(request: Request) -> Response:
    return json_response({"producers": gateway_of(request).router.health.snapshot()})


routes = [
    Route("/admin/v1/keys", create_key, methods=["POST"]),
    Route("/admin/v1/keys", list_keys, methods=["GET"]),
    Route("/admin/v1/keys/{key_id}", get_key, methods=["GET"]),
    Route("/admin/v1/keys/{key_id}", revoke_key, methods=["DELETE"]),
    Route("/admin/v1/usage", usage, methods=["GET"]),
    Route("/admin/v1/health", health, methods=["GET"]),
]
