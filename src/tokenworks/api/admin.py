"""The admin API under /admin/v1, authorised by the admin key."""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import tokenworks
from tokenworks.api.errors import ApiError
from tokenworks.api.idempotency import idempotency_key
from tokenworks.api.key_requests import (
    parse_key_name,
    parse_limit,
    parse_metadata,
    parse_models,
    parse_name_filter,
    parse_rate_limits,
    parse_ttl,
    refuse_unknown_fields,
)
from tokenworks.api.openai import GatewayView, gateway_of, open_ledger, read_json
from tokenworks.keys import lifecycle
from tokenworks.ledger import LedgerError, NotFound
from tokenworks.metering import regroup
from tokenworks.metering.store import GROUPS, MAX_PAGE_VALUES, day_ms
from tokenworks.money import format_nano
from tokenworks.pricing.quote import PricingError

_encode = msgspec.json.encode
MAX_ADMIN_BODY_BYTES = 1024 * 1024


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
    if not bearer_matches(request, expected):
        raise ApiError(401, "invalid admin key", code="invalid_admin_key")


def bearer_matches(request: Request, expected: str) -> bool:
    """`Authorization: Bearer <expected>`, compared in constant time.

    Compared as bytes: header values arrive decoded as Latin-1 and `compare_digest` refuses
    non-ASCII strings, so a client's stray byte must not become a 500."""
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        secret.strip().encode("latin-1"), expected.encode()
    )


# Times are int64 milliseconds in the stores: year 1 .. 9999 is what datetime can say.
MIN_TIME_MS = -62_135_596_800_000
MAX_TIME_MS = 253_402_300_799_999


def parse_time_ms(value: str | None, name: str) -> int | None:
    """`2026-11-29`, `2026-11-29T10:00:00Z`, or unix seconds; naive times are UTC."""
    if value is None or value == "":
        return None
    bad = ApiError(
        400, f"'{name}' must be an ISO 8601 date/time or unix seconds (years 1..9999)", param=name
    )
    try:
        if value.replace(".", "", 1).isdigit():
            seconds = float(value)
            if not math.isfinite(seconds) or seconds * 1000 > MAX_TIME_MS:
                raise bad
            return int(seconds * 1000)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        time_ms = int(parsed.timestamp() * 1000)
    except (ValueError, OverflowError) as exc:
        raise bad from exc
    if not MIN_TIME_MS <= time_ms <= MAX_TIME_MS:
        raise bad
    return time_ms


Endpoint = Callable[[Request], Awaitable[Response]]


def _admin(handler: Endpoint) -> Endpoint:
    async def wrapped(request: Request) -> Response:
        require_admin(request)
        return await handler(request)

    wrapped.__name__ = handler.__name__
    return wrapped


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


CREATE_KEY_FIELDS = (
    "name", "models", "ttl_s", "metadata", "account", "service_tier", "limit", "rate_limits",
    "idempotency_key",
)  # fmt: skip


@_admin
async def create_key(request: Request) -> Response:
    body = await read_json(request, MAX_ADMIN_BODY_BYTES)
    refuse_unknown_fields(body, CREATE_KEY_FIELDS)
    gateway = gateway_of(request)
    name = parse_key_name(body)
    models = parse_models(body, gateway.router.routes)
    ttl_s = parse_ttl(body)
    metadata = parse_metadata(body)
    account = parse_account(gateway, body.get("account"))
    tier = body.get("service_tier")
    if tier is None:
        tier = metadata.get("service_tier")
    if tier is not None:  # however it is given, a tier the key's models lack is refused now
        check_service_tier(gateway, tier, account, models)
        metadata = {**metadata, "service_tier": tier}
    limit = parse_limit(body, default_period="month")
    if limit is not None and account is None:
        raise ApiError(400, "a key with a limit needs an 'account' to pay for it", param="limit")
    rate_limits = parse_rate_limits(body)
    new = lifecycle.NewKey(name, models, account, metadata, ttl_s, limit, rate_limits)
    assert gateway.admin_key is not None  # `require_admin` answered 403 without one
    key, secret = await lifecycle.create_key(
        gateway.keys, open_ledger(gateway), gateway.admin_key,
        idempotency_key(request.headers, body, required=False), new,
    )  # fmt: skip
    return json_response({**key.public(), "key": secret, "limit": _limit_view(limit)}, 201)


def parse_account(gateway: Any, account: Any) -> str | None:
    """The customer account a key pays from: it must exist, and not be an operator account
    (revenue, expense, ...), which never pays for requests."""
    if account is None:
        return None
    if isinstance(account, bool) or not isinstance(account, int | str):
        raise ApiError(400, "'account' must be an account id", param="account")
    try:
        account_id = int(account)
    except ValueError as exc:
        raise ApiError(400, "'account' must be an account id", param="account") from exc
    try:
        gateway.ledger.customer(account_id)
    except NotFound as exc:
        raise ApiError(404, f"no account {account_id}", param="account") from exc
    except LedgerError as exc:
        raise ApiError(
            400, f"account {account_id} is an operator account; keys pay from customer accounts",
            param="account", code="operator_account",
        ) from exc  # fmt: skip
    return str(account_id)


def _limit_view(limit: tuple[int, str] | None) -> dict[str, str] | None:
    return None if limit is None else {"amount": format_nano(limit[0]), "period": limit[1]}


MAX_KEYS_PAGE = 1_000
DEFAULT_KEYS_PAGE = 100


@_admin
async def list_keys(request: Request) -> Response:
    """A page of keys in creation order, dead ones included unless `include_revoked=false`:
    `limit` (1..1,000, default 100) after the key `after` (the last id of the previous page),
    and `has_more`; `name`: only keys of that name, in any case. Read from the table,
    O(page): memory holds live keys only."""
    params = request.query_params
    include = params.get("include_revoked", "true").lower() != "false"
    name = parse_name_filter(params)
    try:
        limit = int(params.get("limit", DEFAULT_KEYS_PAGE))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_KEYS_PAGE:
        raise ApiError(400, f"'limit' must be an integer in [1, {MAX_KEYS_PAGE}]", param="limit")
    keys = gateway_of(request).keys
    after_id = params.get("after")
    after = None
    if after_id:
        last = await asyncio.to_thread(keys.get, after_id) if "\x00" not in after_id else None
        if last is None:
            raise ApiError(400, f"'after' names no key: {after_id[:64]!r}", param="after")
        after = (last.created_ms, last.id)
    page = await asyncio.to_thread(keys.page, limit + 1, after, include, name)
    data = [k.public() for k in page[:limit]]
    return json_response({"object": "list", "data": data, "has_more": len(page) > limit})


@_admin
async def get_key(request: Request) -> Response:
    key = gateway_of(request).keys.get(request.path_params["key_id"])
    if key is None:
        raise lifecycle.UnknownKey()
    return json_response(key.public())


@_admin
async def revoke_key(request: Request) -> Response:
    key_id = request.path_params["key_id"]
    gateway = gateway_of(request)
    revoked = await lifecycle.revoke_key(gateway.keys, open_ledger(gateway), key_id)
    return json_response({"id": key_id, "revoked": [k.id for k in revoked]})


@_admin
async def usage(request: Request) -> Response:
    """Usage summed per group. Everything after the account tree is read runs on a thread
    (the query, the roll-up by team or period, the JSON), in chunks that let go of the GIL:
    at 100,000 keys the answer has 200,000 groups, seconds of Python work that paying
    requests on the event loop must not wait behind."""
    params = request.query_params
    groups = [g for g in params.get("group_by", "").split(",") if g]
    if "\x00" in params.get("key", ""):  # never a key id, and PostgreSQL cannot compare it
        raise ApiError(400, "'key' must not contain NUL characters", param="key")
    since_ms = parse_time_ms(params.get("since"), "since")
    until_ms = parse_time_ms(params.get("until"), "until")
    paging = _usage_paging(params, groups)
    gateway = gateway_of(request)
    await gateway.flush_usage()
    ancestors = _ancestors(gateway, groups)  # the engine's accounts: read on the loop

    def answer() -> bytes:
        key_id = params.get("key") or None
        stored = regroup.stored_groups(groups)
        has_more, next_after = False, None
        try:
            if paging is None:
                rows = gateway.store.query(stored, since_ms, until_ms, key_id)
            else:
                page = gateway.store.query_page(
                    stored, since_ms, until_ms, key_id, limit=paging[0], after=paging[1]
                )
                rows, has_more = page.rows, page.has_more
                next_after = page.last if page.has_more else None
        except ValueError as exc:
            raise ApiError(400, f"{exc}, {_DERIVED_GROUPS}", param="group_by") from exc
        if any(g in regroup.TREE_GROUPS or g in regroup.PERIOD_GROUPS for g in groups):
            rows = regroup.rollup(groups, rows, ancestors)
        head = (
            _encode(
                {
                    "object": "list",
                    "group_by": groups,
                    "has_more": has_more,
                    "next_after": next_after,
                }
            )[:-1]
            + b', "data": ['
        )
        parts = []
        for i in range(0, len(rows), ENCODE_CHUNK_ROWS):
            parts.append(_encode([_usage_item(r) for r in rows[i : i + ENCODE_CHUNK_ROWS]])[1:-1])
            time.sleep(0)  # let the event loop have the GIL between chunks
        return head + b",".join(parts) + b"]}"

    return Response(await asyncio.to_thread(answer), media_type="application/json")


ENCODE_CHUNK_ROWS = 1_000
# Values of the first group a page holds unless `limit` says. A page is a burst of database
# work beside the paying requests: at 1,000 keys a walk of every page kept their p99 at 3x
# its figure alone; at 200, under 2x (docs/benchmarks.md, "The usage summary in pages").
DEFAULT_USAGE_PAGE = 200


def _usage_paging(params: Any, groups: list[str]) -> tuple[int, Any] | None:
    """(limit, after) of a grouped summary whose first group the store keeps; None when the
    answer comes whole (no groups, or a first group rolled up from stored ones: a team's
    accounts or a month's days would be split across pages)."""
    first = groups[0] if groups else None
    if first not in GROUPS:  # none, derived, or unknown (the store's 400 names the groups)
        derived = first in regroup.TREE_GROUPS or first in regroup.PERIOD_GROUPS
        if derived and ("limit" in params or "after" in params):
            raise ApiError(
                400,
                f"pages follow the first group_by, which must be one of {', '.join(GROUPS)}"
                f" (not {first!r}); put one of those first, or leave out 'limit' and 'after'",
                param="after" if "after" in params else "limit",
            )
        return None
    try:
        limit = int(params.get("limit", DEFAULT_USAGE_PAGE))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE_VALUES:
        raise ApiError(400, f"'limit' must be an integer in [1, {MAX_PAGE_VALUES}]", param="limit")
    after: Any = params.get("after") or None
    if after is None:
        return limit, None
    if "\x00" in after:
        raise ApiError(400, "'after' must not contain NUL characters", param="after")
    try:
        if first == "status":
            after = int(after)
        elif first == "day":
            day_ms(after)
    except ValueError:
        kind = "an HTTP status" if first == "status" else "a day, YYYY-MM-DD"
        raise ApiError(400, f"'after' must be {kind}: {after[:64]!r}", param="after") from None
    return limit, after


def _usage_item(row: Any) -> dict[str, Any]:
    item: dict[str, Any] = dict(row.group)
    item["requests"] = row.requests
    sums = dict(row.sums)
    item.update(sums)
    item["total_tokens"] = sums["input_tokens"] + sums["output_tokens"]
    # Amounts are decimal strings in the ledger currency; the nano integers stay exact.
    item["cost"] = format_nano(sums["cost_nano"])
    item["price"] = format_nano(sums["price_nano"])
    return item


_DERIVED_GROUPS = "team, org, week, month"


def _ancestors(gateway: Any, groups: list[str]) -> regroup.AncestorOf:
    """Each account's parent and kind, read once per query when a tree group is asked."""
    if not any(g in regroup.TREE_GROUPS for g in groups):
        return regroup.ancestor_finder({})
    ledger = open_ledger(gateway)
    return regroup.ancestor_finder({a.id: (a.parent_id, str(a.kind)) for a in ledger.accounts()})


@_admin
async def info(request: Request) -> Response:
    """What a client needs to present amounts: the ledger currency; and the version."""
    gateway = gateway_of(request)
    return json_response(
        {
            "object": "gateway",
            "version": tokenworks.__version__,
            "currency": gateway.pricer.currency,
        }
    )


@_admin
async def health(request: Request) -> Response:
    return json_response({"producers": gateway_of(request).relay.dispatcher.health()})


@_admin
async def dispatch(request: Request) -> Response:
    """The scheduler's live state: queues by producer and tier, capacity limits (configured
    and learned), circuit breakers, measured service rates, fair-share counters served, and
    the routing's learned speeds per deployment (what `fastest` and `sort` rank by)."""
    gateway = gateway_of(request)
    state = gateway.relay.dispatcher.snapshot()
    state["speeds"] = gateway.router.speeds.snapshot()
    return json_response(state)


routes = [
    Route("/admin/v1/keys", create_key, methods=["POST"]),
    Route("/admin/v1/keys", list_keys, methods=["GET"]),
    Route("/admin/v1/keys/{key_id}", get_key, methods=["GET"]),
    Route("/admin/v1/keys/{key_id}", revoke_key, methods=["DELETE"]),
    Route("/admin/v1/usage", usage, methods=["GET"]),
    Route("/admin/v1/health", health, methods=["GET"]),
    Route("/admin/v1/info", info, methods=["GET"]),
    Route("/admin/v1/dispatch", dispatch, methods=["GET"]),
]
