"""The ledger's admin API under /admin/v1: accounts, credits, transfers, budgets,
statements and the invariant check (docs/ledger.md, "Ledger admin API").

Amounts are decimal strings in the ledger currency ("12.50"); JSON numbers are refused so
that no float ever touches money. Every write needs an idempotency key (`idempotency_key` in
the body or an `Idempotency-Key` header): a retry with the same key and body returns the first
result and moves nothing again; the same key with another body is 409. A write's response is
built only from what the ledger recorded for that key, so a retry answers byte for byte alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenworks.api.admin import (
    MAX_ADMIN_BODY_BYTES,
    _admin,
    json_response,
    parse_time_ms,
)
from tokenworks.api.errors import ApiError
from tokenworks.api.idempotency import idempotency_key
from tokenworks.api.key_requests import (
    parse_name_filter,
    parse_rate_limits,
    rate_limits_from,
    refuse_unknown_fields,
)
from tokenworks.api.openai import gateway_of, open_ledger, read_json
from tokenworks.keys.rate_limits import FIELDS as RATE_LIMIT_FIELDS
from tokenworks.keys.rate_limits import RateLimits
from tokenworks.ledger import (
    AccountKind,
    InvalidRequest,
    Ledger,
    Period,
    Recurrence,
    Rollover,
)
from tokenworks.ledger.domain import (
    CASH_PRIORITY,
    CUSTOMER_KINDS,
    MAX_AMOUNT_NANO,
    MAX_TIME_MS,
)
from tokenworks.ledger.periods import from_ms, zone
from tokenworks.money import format_nano, parse_amount

# Admin keys live in their own namespace of the ledger's idempotency table, apart from the
# keys the gateway derives itself (hold ids, key limits).
IDEMPOTENCY_PREFIX = "admin:"
MAX_LIST_LIMIT = 10_000
MAX_TIME_CHARS = 40  # the longest ISO 8601 time with offset and microseconds is 32
MAX_TZ_CHARS = 64  # the longest IANA zone name is 32
DEFAULT_LIST_LIMIT = 1_000

# A child account's kind when the request does not say: one level down the tree.
_CHILD_KIND = {
    AccountKind.ORGANISATION: AccountKind.TEAM,
    AccountKind.TEAM: AccountKind.USER,
    AccountKind.USER: AccountKind.AGENT,
    AccountKind.AGENT: AccountKind.AGENT,
}
_CUSTOMER_KIND_NAMES = ", ".join(str(k) for k in AccountKind if k in CUSTOMER_KINDS)
_PERIOD_NAMES = ", ".join(str(p) for p in Period)
_RECURRING_NAMES = ", ".join(str(p) for p in Period if p is not Period.TOTAL)

Handler = Callable[[Request, Ledger], Awaitable[Response]]


# --------------------------------------------------------------------------- plumbing


def _ledger_endpoint(handler: Handler) -> Any:
    """Admin auth and the gateway's ledger; ledger errors are answered by `api/errors.py`."""

    async def wrapped(request: Request) -> Response:
        ledger = open_ledger(gateway_of(request))
        try:
            return await handler(request, ledger)
        except ValueError as exc:  # a value the ledger's own parsing refused (dates, zones)
            raise InvalidRequest(str(exc)) from exc

    wrapped.__name__ = handler.__name__
    return _admin(wrapped)


async def _body(request: Request, allowed: set[str]) -> dict[str, Any]:
    body = await read_json(request, MAX_ADMIN_BODY_BYTES)
    # A misspelt field (say "expires" for "expires_at") must not silently change money.
    refuse_unknown_fields(body, allowed | {"idempotency_key"})
    return body


def _idempotency_key(request: Request, body: dict[str, Any]) -> str:
    key = idempotency_key(request.headers, body, required=True)
    assert key is not None
    return IDEMPOTENCY_PREFIX + key


def _amount(body: dict[str, Any], name: str, *, allow_zero: bool = False) -> int:
    value = body.get(name)
    if value is None:
        raise ApiError(400, f"missing required parameter: '{name}'", param=name, code="missing")
    if isinstance(value, int | float):  # bool is an int too
        raise ApiError(
            400,
            f"'{name}' must be a decimal string like \"12.50\": JSON numbers are refused so "
            "that no float ever touches money",
            param=name,
            code="invalid_amount",
        )
    try:
        nano = parse_amount(value)
    except ValueError as exc:
        raise ApiError(400, f"'{name}': {exc}", param=name, code="invalid_amount") from exc
    low = "0" if allow_zero else "greater than 0"
    if nano < 0 or (nano == 0 and not allow_zero):
        raise ApiError(400, f"'{name}' must be {low}", param=name, code="invalid_amount")
    if nano > MAX_AMOUNT_NANO:
        raise ApiError(400, f"'{name}' is too large", param=name, code="invalid_amount")
    return nano


def _account_id(value: Any, name: str, *, status: int = 400) -> int:
    """An account id from the path (404 if malformed: no such account) or the body (400)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**62:
        return value
    if status == 404:
        raise ApiError(404, f"no account {value!r}", code="not_found")
    raise ApiError(400, f"'{name}' must be an account id", param=name)


def _path_account(request: Request) -> int:
    return _account_id(request.path_params["account_id"], "account_id", status=404)


def _time(value: Any, name: str) -> int | None:
    """A time from the body or the query: ISO 8601 or unix seconds, between 1970 and 9999."""
    if value is None or value == "":
        return None
    what = f"'{name}' must be an ISO 8601 date/time or unix seconds between 1970 and 9999"
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ApiError(400, what, param=name, code="invalid_request")
    text = str(value)
    if len(text) > MAX_TIME_CHARS:
        raise ApiError(400, what, param=name, code="invalid_request")
    try:
        ms = parse_time_ms(text, name)
    except (OverflowError, OSError, ValueError) as exc:  # past what a datetime can hold
        raise ApiError(400, what, param=name, code="invalid_request") from exc
    if ms is None or not 0 <= ms <= MAX_TIME_MS:
        raise ApiError(400, what, param=name, code="invalid_request")
    return ms


def _tz(value: Any, name: str) -> str:
    """An IANA time zone name the ledger knows."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TZ_CHARS or not value.isprintable():
        raise ApiError(
            400,
            f"'{name}' must be a time zone name like \"Europe/Paris\"",
            param=name,
            code="invalid_request",
        )
    try:
        zone(value)
    except InvalidRequest as exc:
        raise ApiError(400, f"'{name}': {exc}", param=name, code="invalid_request") from exc
    return value


def _dt(ms: int | None) -> datetime | None:
    return None if ms is None else from_ms(ms)


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return from_ms(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _money(nano: int) -> dict[str, Any]:
    return {"amount": format_nano(nano), "amount_nano": nano}


# --------------------------------------------------------------------------- views


# The period `spent_this_period` reports when an account has several budgets: the billing
# month first, then the next-longest resetting period.
_REPORTED_PERIODS = ("month", "week", "day", "total")


def _balance_view(ledger: Ledger, account_id: int) -> dict[str, Any]:
    b = ledger.balance(account_id)
    by_period = b.spent_this_period_nano
    period = next((p for p in _REPORTED_PERIODS if p in by_period), None)
    spent = by_period[period] if period is not None else 0
    return {
        "total": format_nano(b.balance_nano),
        "available": format_nano(b.available_nano),
        "held": format_nano(b.held_nano),
        "chain_available": format_nano(b.chain_available_nano),
        # Spend is counted per budget period: "0" with `period: null` when no budget counts it.
        "spent_this_period": format_nano(spent),
        "period": period,
        "spent_by_period": {p: format_nano(v) for p, v in by_period.items()},
        "total_nano": b.balance_nano,
        "available_nano": b.available_nano,
        "held_nano": b.held_nano,
        "chain_available_nano": b.chain_available_nano,
        "spent_this_period_nano": spent,
        "spent_by_period_nano": dict(by_period),
    }


def _account_view(ledger: Ledger, account_id: int) -> dict[str, Any]:
    acc = ledger.account(account_id)
    return {
        "object": "ledger.account",
        **acc.public(),
        "created_at": _iso(acc.created_ms),
        "balance": _balance_view(ledger, account_id),
    }


def _budget_view(b: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "ledger.budget",
        "scope": b["scope"],
        "period": b["period"],
        "tz": b["tz"],
        "limit": format_nano(b["limit_nano"]),
        "spent": format_nano(b["spent_nano"]),
        "held": format_nano(b["held_nano"]),
        "delegated": format_nano(b["delegated_nano"]),
        "room": format_nano(b["room_nano"]),
        "limit_nano": b["limit_nano"],
        "spent_nano": b["spent_nano"],
        "held_nano": b["held_nano"],
        "delegated_nano": b["delegated_nano"],
        "room_nano": b["room_nano"],
        "period_start": _iso(b["period_start_ms"]),
        "period_end": _iso(b["period_end_ms"]),
        "parent_scope": b["parent_scope"],
        "expires_at": _iso(b["expires_ms"]),
        "revoked": b["revoked"],
    }


def _rollover_name(cap_nano: int | None) -> str:
    if cap_nano is None:
        return "all"
    return "expire" if cap_nano == 0 else format_nano(cap_nano)


def _credit_views(ledger: Ledger, account_id: int) -> tuple[list[Any], list[Any]]:
    """The account's open buckets (in consumption order) and its active grants."""
    buckets, grants = ledger.open_credit(account_id)
    bucket_views = [
        {
            "id": b.id,
            "source": "cash" if b.grant_id is None else "grant",
            "grant_id": b.grant_id,
            "priority": None if b.priority == CASH_PRIORITY else b.priority,
            "expires_at": _iso(b.expires_ms),
            "remaining": format_nano(b.remaining_nano),
            "held": format_nano(b.held_nano),
            "remaining_nano": b.remaining_nano,
            "held_nano": b.held_nano,
        }
        for b in buckets
    ]
    grant_views = [
        {
            "id": g.id,
            **_money(g.amount_nano),
            "priority": g.priority,
            "recurring": {"period": str(g.period), "tz": g.tz} if g.period else None,
            "rollover": _rollover_name(g.rollover_cap_nano) if g.period else "expire",
            "effective_at": _iso(g.effective_ms),
            "expires_at": _iso(g.expires_ms),
            "next_due_at": _iso(g.next_due_ms),
            "bucket_id": g.bucket_id,
        }
        for g in sorted(grants, key=lambda g: g.id)
    ]
    return bucket_views, grant_views


# --------------------------------------------------------------------------- accounts


@_ledger_endpoint
async def create_account(request: Request, ledger: Ledger) -> Response:
    body = await _body(request, {"name", "parent", "kind", "draws_on_parent", "rate_limits"})
    key = _idempotency_key(request, body)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > 200:
        raise ApiError(400, "'name' must be a string of 1-200 characters", param="name")
    parent = body.get("parent")
    parent_id = None if parent is None else _account_id(parent, "parent")
    kind_name = body.get("kind")
    if kind_name is None:
        if parent_id is None:
            kind = AccountKind.ORGANISATION
        else:
            parent_kind = ledger.account(parent_id).kind
            kind = _CHILD_KIND.get(parent_kind, AccountKind.AGENT)
    else:
        if kind_name not in {str(k) for k in CUSTOMER_KINDS}:
            raise ApiError(400, f"'kind' must be one of {_CUSTOMER_KIND_NAMES}", param="kind")
        kind = AccountKind(kind_name)
    draws = body.get("draws_on_parent", True)
    if not isinstance(draws, bool):
        raise ApiError(400, "'draws_on_parent' must be true or false", param="draws_on_parent")
    rate_limits = parse_rate_limits(body)
    acc = await ledger.create_account(
        name.strip(), parent_id, kind, idempotency_key=key, draws_on_parent=draws
    )
    keys = gateway_of(request).keys
    if rate_limits is not None:  # setting them again on a retry changes nothing
        keys.set_account_limits(str(acc.id), rate_limits)
    return json_response(
        {
            "object": "ledger.account",
            "id": acc.id,
            "name": acc.name,
            "parent_id": acc.parent_id,
            "kind": acc.kind,
            "draws_on_parent": acc.draws_on_parent,
            "rate_limits": _rate_limits_view(keys.account_limits(str(acc.id))),
        },
        status=201,
    )


def _rate_limits_view(limits: RateLimits | None) -> dict[str, int | None] | None:
    return None if limits is None or limits.empty else limits.public()


@_ledger_endpoint
async def set_rate_limits(request: Request, ledger: Ledger) -> Response:
    """Replace an account's rate limits (each field left out or null: unlimited). Setting
    the same limits twice is the same as once, so no idempotency key is needed."""
    account_id = _path_account(request)
    body = await _body(request, set(RATE_LIMIT_FIELDS))
    limits = rate_limits_from(body, "")
    ledger.customer(account_id)  # operator accounts never pay for requests
    keys = gateway_of(request).keys
    keys.set_account_limits(str(account_id), limits)
    return json_response(
        {"object": "account.rate_limits", "account_id": account_id, **limits.public()}
    )


@_ledger_endpoint
async def list_accounts(request: Request, ledger: Ledger) -> Response:
    """A page of accounts in id order, filtered by `parent`, `kind` and `name` (in any case:
    how the CLI finds the account a person named in one read)."""
    params = request.query_params
    parent = params.get("parent")
    parent_id = None if parent is None else _account_id(parent, "parent")
    kind = params.get("kind")
    include_operator = params.get("include_operator", "false").lower() == "true"
    name = parse_name_filter(params)
    folded = None if name is None else name.casefold()
    after = _account_id(params["after"], "after") if params.get("after") else 0
    try:
        limit = int(params.get("limit", DEFAULT_LIST_LIMIT))
    except ValueError:
        limit = -1
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ApiError(400, f"'limit' must be an integer in [1, {MAX_LIST_LIMIT}]", param="limit")
    # Ids ascend with creation: walk them from `after` and stop one past the page, O(page)
    # (plus the accounts a filter skips), never a sort of every account per page.
    accounts = ledger.engine.accounts
    ids: list[int] = []
    for i in range(after + 1, ledger.engine.next_account_id):
        a = accounts.get(i)
        if (
            a is not None
            and (include_operator or a.kind in CUSTOMER_KINDS)
            and (parent_id is None or a.parent_id == parent_id)
            and (kind is None or str(a.kind) == kind)
            and (folded is None or a.name.casefold() == folded)
        ):
            ids.append(i)
            if len(ids) > limit:
                break
    data = [_account_view(ledger, i) for i in ids[:limit]]
    return json_response({"object": "list", "data": data, "has_more": len(ids) > limit})


@_ledger_endpoint
async def get_account(request: Request, ledger: Ledger) -> Response:
    account_id = _path_account(request)
    view = _account_view(ledger, account_id)
    view["buckets"], view["grants"] = _credit_views(ledger, account_id)
    view["budgets"] = [_budget_view(b) for b in ledger.budgets(account_id)]
    account_limits = gateway_of(request).keys.account_limits(str(account_id))
    view["rate_limits"] = _rate_limits_view(account_limits)
    return json_response(view)


# --------------------------------------------------------------------------- credit in


@_ledger_endpoint
async def top_up(request: Request, ledger: Ledger) -> Response:
    account_id = _path_account(request)
    body = await _body(request, {"amount"})
    key = _idempotency_key(request, body)
    amount = _amount(body, "amount")
    transfer_id = await ledger.top_up(account_id, amount, idempotency_key=key)
    return json_response(
        {
            "object": "ledger.top_up",
            "id": transfer_id,
            "transfer_id": transfer_id,
            "account_id": account_id,
            **_money(amount),
        },
        status=201,
    )


def _recurrence(value: Any) -> Recurrence | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"period": value}
    if not isinstance(value, dict):
        raise ApiError(
            400, "'recurring' must be {\"period\": \"month\", \"tz\": \"Europe/Paris\"}",
            param="recurring",
        )  # fmt: skip
    refuse_unknown_fields(value, ("period", "tz"), "recurring.")
    period = value.get("period")
    if period not in {str(p) for p in Period if p is not Period.TOTAL}:
        raise ApiError(
            400, f"recurring.period must be one of {_RECURRING_NAMES}", param="recurring.period"
        )
    return Recurrence(Period(period), _tz(value.get("tz", "UTC"), "recurring.tz"))


def _rollover(value: Any, recurring: Recurrence | None) -> Rollover:
    if value is None or value == "expire":
        return Rollover.expire()
    if recurring is None:
        raise ApiError(
            400, "a one-off grant expires whole: 'rollover' applies to recurring grants only",
            param="rollover",
        )  # fmt: skip
    if value == "all":
        return Rollover.up_to(None)
    if isinstance(value, str) and value and value[0].isdigit():
        return Rollover.up_to(_amount({"rollover": value}, "rollover", allow_zero=True))
    raise ApiError(400, '\'rollover\' is "expire", "all" or a cap like "5.00"', param="rollover")


@_ledger_endpoint
async def create_grant(request: Request, ledger: Ledger) -> Response:
    account_id = _path_account(request)
    body = await _body(
        request, {"amount", "expires_at", "effective_at", "recurring", "rollover", "priority"}
    )
    key = _idempotency_key(request, body)
    amount = _amount(body, "amount")
    expires_ms = _time(body.get("expires_at"), "expires_at")
    effective_ms = _time(body.get("effective_at"), "effective_at")
    recurring = _recurrence(body.get("recurring"))
    rollover = _rollover(body.get("rollover"), recurring)
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority < 2**31:
        raise ApiError(
            400,
            "'priority' must be an integer in [0, 2147483647] (lower is spent first)",
            param="priority",
        )
    grant_id = await ledger.grant(
        account_id,
        amount,
        idempotency_key=key,
        expires_at=_dt(expires_ms),
        recurring=recurring,
        rollover=rollover,
        priority=priority,
        effective_at=_dt(effective_ms),
    )
    return json_response(
        {
            "object": "ledger.grant",
            "id": grant_id,
            "account_id": account_id,
            **_money(amount),
            "priority": priority,
            "recurring": (
                {"period": str(recurring.period), "tz": recurring.tz} if recurring else None
            ),
            "rollover": _rollover_name(rollover.cap_nano) if recurring else "expire",
            "effective_at": _iso(effective_ms),
            "expires_at": _iso(expires_ms),
        },
        status=201,
    )


@_ledger_endpoint
async def revoke_grant(request: Request, ledger: Ledger) -> Response:
    """End a grant: nothing more is issued and its unspent credit expires now. Revoking is
    idempotent by nature (a revoked grant stays revoked), so the key derives from the grant."""
    account_id = _path_account(request)
    raw = request.path_params["grant_id"]
    if not (raw.isascii() and raw.isdigit() and len(raw) < 19):
        raise ApiError(404, f"no grant {raw!r}", code="not_found")
    grant_id = int(raw)
    key = f"{IDEMPOTENCY_PREFIX}revoke-grant:{account_id}:{grant_id}"
    expired = await ledger.revoke_grant(account_id, grant_id, idempotency_key=key)
    return json_response(
        {
            "object": "ledger.grant",
            "id": grant_id,
            "account_id": account_id,
            "revoked": True,
            "expired": format_nano(expired),
            "expired_nano": expired,
        }
    )


@_ledger_endpoint
async def create_transfer(request: Request, ledger: Ledger) -> Response:
    body = await _body(request, {"from", "to", "amount", "actor"})
    key = _idempotency_key(request, body)
    src = _account_id(body.get("from"), "from")
    dst = _account_id(body.get("to"), "to")
    amount = _amount(body, "amount")
    actor = body.get("actor", "operator")
    kind, _, ident = actor.partition(":") if isinstance(actor, str) else ("", "", "")
    account_actor = kind == "account" and ident.isascii() and ident.isdigit() and len(ident) < 19
    if actor != "operator" and not account_actor:
        raise ApiError(400, '\'actor\' is "operator" or "account:<id>"', param="actor")
    transfer_id = await ledger.transfer(src, dst, amount, idempotency_key=key, actor=actor)
    return json_response(
        {
            "object": "ledger.transfer",
            "id": transfer_id,
            "from": src,
            "to": dst,
            **_money(amount),
            "actor": actor,
        },
        status=201,
    )


# --------------------------------------------------------------------------- budgets


@_ledger_endpoint
async def set_budget(request: Request, ledger: Ledger) -> Response:
    account_id = _path_account(request)
    body = await _body(request, {"amount", "period", "tz"})
    key = _idempotency_key(request, body)
    amount = _amount(body, "amount", allow_zero=True)
    period = body.get("period")
    if period not in {str(p) for p in Period}:
        raise ApiError(400, f"'period' must be one of {_PERIOD_NAMES}", param="period")
    tz = _tz(body.get("tz", "UTC"), "tz")
    ledger.customer(account_id)  # budgets of operator accounts make no sense
    view = await ledger.set_budget(account_id, amount, period, idempotency_key=key, tz=tz)
    return json_response(_budget_view(view))


@_ledger_endpoint
async def list_budgets(request: Request, ledger: Ledger) -> Response:
    account_id = _path_account(request)
    ledger.customer(account_id)  # an operator account has no budgets: 400, not []
    data = [_budget_view(b) for b in ledger.budgets(account_id)]
    return json_response({"object": "list", "data": data})


# --------------------------------------------------------------------------- reports


@_ledger_endpoint
async def statement(request: Request, ledger: Ledger) -> Response:
    account_id = _path_account(request)
    params = request.query_params
    fmt = params.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError(400, "'format' is json or csv", param="format")
    now = datetime.now(UTC)
    since_ms = _time(params.get("since"), "since")
    until_ms = _time(params.get("until"), "until")
    # Defaults: this calendar month (UTC) up to and including now.
    if since_ms is None:
        since_ms = int(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())
        since_ms *= 1000
    if until_ms is None:
        until_ms = int(now.timestamp() * 1000) + 1
    if until_ms <= since_ms:
        raise ApiError(400, "'since' must be before 'until'", param="since")
    if fmt == "csv":
        text = await ledger.statement_csv(account_id, from_ms(since_ms), from_ms(until_ms))
        filename = f"statement-{account_id}.csv"
        return Response(
            text,
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    data = await ledger.statement(account_id, from_ms(since_ms), from_ms(until_ms))
    for line in data["spend_by_model"].values():
        line["spend"] = format_nano(line["spend_nano"])
    return json_response({"object": "ledger.statement", **data})


@_ledger_endpoint
async def check(request: Request, ledger: Ledger) -> Response:
    violations = await ledger.check()
    body: dict[str, Any] = {
        "object": "ledger.check",
        "ok": not violations,
        "violations": violations,
        # False when traffic never paused long enough to compare the store with memory.
        "store_compared": ledger.store_compared,
        "checked_at": _iso(ledger.now_ms()),
    }
    if not violations:
        return json_response(body)
    # Unsound: a non-2xx status (for probes) and an OpenAI-shaped error next to the list.
    shown = "; ".join(violations[:5]) + ("; ..." if len(violations) > 5 else "")
    body["error"] = {
        "message": f"{len(violations)} ledger invariant(s) violated: {shown}",
        "type": "server_error",
        "param": None,
        "code": "ledger_unsound",
    }
    return json_response(body, status=500)


routes = [
    Route("/admin/v1/accounts", create_account, methods=["POST"]),
    Route("/admin/v1/accounts", list_accounts, methods=["GET"]),
    Route("/admin/v1/accounts/{account_id}", get_account, methods=["GET"]),
    Route("/admin/v1/accounts/{account_id}/topups", top_up, methods=["POST"]),
    Route("/admin/v1/accounts/{account_id}/grants", create_grant, methods=["POST"]),
    Route("/admin/v1/accounts/{account_id}/grants/{grant_id}", revoke_grant, methods=["DELETE"]),
    Route("/admin/v1/accounts/{account_id}/budgets", set_budget, methods=["POST"]),
    Route("/admin/v1/accounts/{account_id}/rate_limits", set_rate_limits, methods=["POST"]),
    Route("/admin/v1/accounts/{account_id}/budgets", list_budgets, methods=["GET"]),
    Route("/admin/v1/accounts/{account_id}/statement", statement, methods=["GET"]),
    Route("/admin/v1/transfers", create_transfer, methods=["POST"]),
    Route("/admin/v1/ledger/check", check, methods=["GET"]),
]
