"""Each error class -> the status, code, type, param and headers a client sees, answered by
the one table (`api/errors.py`) through Starlette's handlers, looked up by class."""

from __future__ import annotations

import msgspec
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient

from tokenworks.api.errors import EXCEPTION_HANDLERS, ApiError, api_error
from tokenworks.dispatch import errors as dispatch
from tokenworks.keys import lifecycle as keys
from tokenworks.ledger import (
    HoldClosed,
    IdempotencyConflict,
    InvalidRequest,
    LedgerBusy,
    LedgerError,
    NotFound,
    Period,
    PolicyDenied,
    Refusal,
    Refused,
    StoreUnavailable,
)
from tokenworks.producers.openai_compat import UpstreamError

NANO = 1_000_000_000
CREDIT = Refused("account:7", Refusal.CREDIT, 3 * NANO, NANO // 2)
DAY = Refused("key:k1", Refusal.BUDGET, 2 * NANO, -5, period=Period.DAY)


def upstream(reason: str, status: int | None = None, **kw: object) -> UpstreamError:
    return UpstreamError("p", reason, f"upstream {reason}", status=status, **kw)  # type: ignore[arg-type]


# (error, status, code, OpenAI type, param, headers)
CASES = [
    (LedgerError("ledger is closed"), 503, "ledger_unavailable", "service_unavailable", None, {}),
    (CREDIT, 402, "insufficient_quota", "insufficient_quota", None, {}),
    (LedgerBusy("behind"), 503, "ledger_busy", "service_unavailable", None, {"retry-after": "1"}),
    (IdempotencyConflict("x"), 409, "idempotency_conflict", "conflict_error", "idempotency_key", {}),
    (NotFound("no account 9"), 404, "not_found", "not_found_error", None, {}),
    (HoldClosed("h1", "settled"), 409, "hold_closed", "conflict_error", None, {}),
    (PolicyDenied("no"), 403, "policy_denied", "permission_error", None, {}),
    (InvalidRequest("bad"), 400, "invalid_request", "invalid_request_error", None, {}),
    (StoreUnavailable("down"), 503, "ledger_unavailable", "service_unavailable", None, {}),
    (dispatch.InvalidCall("too big", param="n"), 400, "invalid_value", "invalid_request_error", "n", {}),
    (dispatch.HoldRefused(CREDIT), 402, "insufficient_quota", "insufficient_quota", None, {}),
    (dispatch.HoldUnavailable("closed"), 503, "ledger_unavailable", "service_unavailable", None, {}),
    (dispatch.SettlementFailed(), 502, "settlement_failed", "upstream_error", None, {}),
    (dispatch.from_upstream(upstream("http", 422, retryable=False)), 422, "upstream_rejected", "invalid_request_error", None, {}),
    (dispatch.from_upstream(upstream("http", 429, retry_after="7")), 429, "upstream_capacity", "rate_limit_error", None, {"retry-after": "7"}),
    (dispatch.from_upstream(upstream("timeout")), 504, "upstream_timeout", "timeout_error", None, {}),
    (dispatch.from_upstream(upstream("connect")), 503, "upstream_unavailable", "service_unavailable", None, {}),
    (dispatch.from_upstream(upstream("cut")), 502, "upstream_error", "upstream_error", None, {}),
    (keys.IdempotencyKeyReused(), 409, "idempotency_conflict", "conflict_error", None, {}),
    (keys.RetryOfDeadKey(), 409, "idempotency_conflict", "conflict_error", None, {}),
    (keys.NotDelegable(), 403, "no_account", "permission_error", None, {}),
    (keys.ModelsBeyondParent(), 403, None, "permission_error", "models", {}),
    (keys.MintRateExceeded(10.0, 3), 429, "rate_limit_exceeded", "rate_limit_error", None, {"retry-after": "3"}),
    (keys.TooManyKeys("full"), 403, "too_many_keys", "permission_error", None, {}),
    (keys.UnknownKey(), 404, "key_not_found", "not_found_error", None, {}),
    (keys.KeyLimitInvalid("bad tz"), 400, None, "invalid_request_error", "limit", {}),
    (keys.DelegationRefused(CREDIT, NANO), 402, "insufficient_quota", "insufficient_quota", None, {}),
    (keys.DelegationConflict(), 409, "idempotency_conflict", "conflict_error", None, {}),
    (keys.DelegationInvalid("too deep"), 400, "delegation_refused", "invalid_request_error", None, {}),
    (keys.KeysLedgerUnavailable(), 503, "ledger_unavailable", "service_unavailable", None, {}),
    (ApiError(413, "too big", code="body_too_large"), 413, "body_too_large", "invalid_request_error", None, {}),
    (RuntimeError("a bug"), 500, "internal", "server_error", None, {}),
]  # fmt: skip


def _raising(exc: Exception) -> Starlette:
    async def endpoint(request: Request) -> None:
        raise exc

    return Starlette(routes=[Route("/", endpoint)], exception_handlers=EXCEPTION_HANDLERS)


@pytest.mark.parametrize(
    ("exc", "status", "code", "kind", "param", "headers"),
    CASES,
    ids=[type(c[0]).__name__ for c in CASES],
)
def test_each_error_class_is_answered_from_the_one_table(
    exc: Exception, status: int, code: str | None, kind: str, param: str | None,
    headers: dict[str, str],
) -> None:  # fmt: skip
    with TestClient(_raising(exc), raise_server_exceptions=False) as client:
        r = client.get("/")
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    error = msgspec.json.decode(r.content)["error"]
    assert (error["code"], error["type"], error["param"]) == (code, kind, param)
    assert error["message"] == api_error(exc).message
    for name, value in headers.items():
        assert r.headers[name] == value


def test_refusals_are_told_in_one_sentence_with_amounts_in_currency() -> None:
    assert api_error(CREDIT).message == "insufficient credit on account:7: needs 3, 0.5 available"
    assert api_error(DAY).message == "day budget exhausted on key:k1: needs 2, 0 available"
    assert api_error(dispatch.HoldRefused(DAY)).message == (
        "day budget exhausted on key:k1: this request may cost up to 2, 0 available"
    )
    assert str(DAY) == "day budget exhausted on key:k1: needs 2000000000 nano, -5 nano available"
    assert (DAY.reason, DAY.limit_kind, CREDIT.limit_kind) == (
        Refusal.BUDGET,
        "budget:day",
        "credit",
    )


def test_an_upstream_rejection_carries_the_upstreams_own_message() -> None:
    body = b'{"error": {"message": "messages[0].role is unknown"}}'
    rejected = dispatch.from_upstream(upstream("http", 400, retryable=False, body=body))
    assert (rejected.status, rejected.message) == (400, "messages[0].role is unknown")
    not_json = dispatch.from_upstream(upstream("http", 404, retryable=False, body=b"<html>"))
    assert (not_json.status, not_json.message) == (404, "upstream http")


def test_a_closed_ledger_is_an_outage_wherever_it_is_met() -> None:
    """api/admin.py answered a bare LedgerError 400 and api/admin_ledger.py 503; a closed
    ledger is not the client's mistake, and a retry may succeed: 503 everywhere."""
    assert api_error(LedgerError("ledger is closed")).status == 503
    assert keys._outage(LedgerError("ledger is closed"))
    assert not keys._outage(InvalidRequest("bad period"))
