"""Every error a client sees, answered in one place, in the OpenAI shape:
`{"error": {"message", "type", "param", "code"}}`.

Handlers and the layers under them raise; they never build an error response themselves.
`app.py` hands `EXCEPTION_HANDLERS` to Starlette, which picks a handler by the exception's
class (walking its MRO, as Starlette's `_exception_handler.py` does), and `api_error` finds
the answer in `ANSWERS` the same way: the most specific class listed wins. So the status, the
type and the code stay the same whichever endpoint meets an error, and the official SDKs
raise the right exception class.

    Exception
    ├── ApiError                         its own fields: request parsing, auth, bounds
    ├── ledger.LedgerError               503 ledger_unavailable  closed, or owned elsewhere
    │   ├── Refused                      402 insufficient_quota  reason: ledger.Refusal
    │   ├── LedgerBusy                   503 ledger_busy         Retry-After: 1 (backpressure)
    │   ├── IdempotencyConflict          409 idempotency_conflict
    │   ├── NotFound                     404 not_found
    │   ├── HoldClosed                   409 hold_closed
    │   ├── PolicyDenied                 403 policy_denied
    │   ├── InvalidRequest               400 invalid_request
    │   │   └── BeforeHorizon            400 before_retention_horizon (param since)
    │   └── StoreUnavailable             503 ledger_unavailable
    ├── dispatch.errors.DispatchError    its own status and code: the relay records them in
    │                                    the usage row before raising (drawn in that module);
    │                                    an upstream's 4xx keeps its own body (`raw`)
    ├── keys.lifecycle.KeyLifecycleError
    │   ├── IdempotencyKeyReused         409 idempotency_conflict
    │   ├── RetryOfDeadKey               409 idempotency_conflict
    │   ├── NotDelegable                 403 no_account
    │   ├── ModelsBeyondParent           403 (param models)
    │   ├── RateLimitsBeyondParent       403 rate_limits_beyond_parent (param the field)
    │   ├── MintRateExceeded             429 rate_limit_exceeded  Retry-After
    │   ├── TooManyKeys                  403 too_many_keys
    │   ├── UnknownKey                   404 key_not_found
    │   ├── KeyLimitInvalid              400 (param limit)
    │   ├── DelegationRefused            402 insufficient_quota
    │   ├── DelegationConflict           409 idempotency_conflict
    │   ├── DelegationInvalid            400 delegation_refused
    │   └── KeysLedgerUnavailable        503 ledger_unavailable
    ├── db.reads.ReadTimeout             503 query_timeout       a read past its time limit
    ├── starlette HTTPException          404 unknown_url, 405 method_not_allowed, else its own
    └── anything else                    500 internal: a bug; the request was not charged
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from tokenworks.db.reads import ReadTimeout
from tokenworks.dispatch.errors import DispatchError
from tokenworks.keys import lifecycle as keys
from tokenworks.ledger import (
    BeforeHorizon,
    HoldClosed,
    IdempotencyConflict,
    InvalidRequest,
    LedgerBusy,
    LedgerError,
    NotFound,
    PolicyDenied,
    Refused,
    StoreUnavailable,
)
from tokenworks.money import format_nano
from tokenworks.wire.anthropic import anthropic_error_to_openai, openai_error_to_anthropic
from tokenworks.wire.openai_errors import ERROR_TYPES, error_body, error_type

__all__ = ["ANSWERS", "ERROR_TYPES", "EXCEPTION_HANDLERS", "ApiError", "api_error", "error_body"]


class ApiError(Exception):
    """An error a client should see, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.raw = raw  # an upstream's own error body, answered as it is

    @property
    def type(self) -> str:
        return error_type(self.status)

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return error_body(self.status, self.message, self.code, self.param)

    def response(self) -> Response:
        return Response(
            self.body(),
            status_code=self.status,
            media_type="application/json",
            headers=self.headers,
        )


class _Own:
    """In an `Answer`: take this field from the exception's attribute of the same name."""


OWN: Any = _Own()


@dataclass(frozen=True, slots=True)
class Answer:
    """How one class of error is answered. `message` None: the exception's `message`, else
    its text; `param` None: the exception's `param`, if it has one."""

    status: int
    code: str | None
    message: str | Callable[[Any], str] | None = None
    param: str | None = None
    headers: Callable[[Any], dict[str, str]] | Mapping[str, str] = field(default_factory=dict)

    def error(self, exc: Exception) -> ApiError:
        # OWN: a dispatch error carries its own (the relay records it before raising).
        own = exc if isinstance(exc, DispatchError) else None
        assert own is not None or OWN not in (self.status, self.code), type(exc)
        status = own.status if own is not None and self.status is OWN else self.status
        code = own.code if own is not None and self.code is OWN else self.code
        if self.message is None:
            message = getattr(exc, "message", None) or str(exc)
        else:
            message = self.message if isinstance(self.message, str) else self.message(exc)
        param = self.param if self.param is not None else getattr(exc, "param", None)
        headers = self.headers(exc) if callable(self.headers) else dict(self.headers)
        raw = own.raw if own is not None else None
        return ApiError(status, message, code=code, param=param, headers=headers, raw=raw)


def _refused(exc: Refused) -> str:
    return exc.describe(
        f"needs {format_nano(exc.needed_nano)}", format_nano(max(exc.available_nano, 0))
    )


ANSWERS: dict[type[Exception], Answer] = {
    # The ledger. A bare LedgerError is an outage a later retry may clear (closed, the store
    # owned by another process): a 503, never the client's 400.
    LedgerError: Answer(503, "ledger_unavailable"),
    Refused: Answer(402, "insufficient_quota", _refused),
    LedgerBusy: Answer(
        503,
        "ledger_busy",
        "the ledger is catching up; try again shortly",
        headers={"Retry-After": "1"},
    ),
    IdempotencyConflict: Answer(
        409,
        "idempotency_conflict",
        "this idempotency key was already used for a different request; "
        "use a new key for a new operation",
        param="idempotency_key",
    ),
    NotFound: Answer(404, "not_found"),
    HoldClosed: Answer(409, "hold_closed"),
    PolicyDenied: Answer(403, "policy_denied"),
    InvalidRequest: Answer(400, "invalid_request"),
    BeforeHorizon: Answer(400, "before_retention_horizon"),
    StoreUnavailable: Answer(503, "ledger_unavailable"),
    # The relay: it decided the status (and recorded it) already.
    DispatchError: Answer(OWN, OWN, headers=lambda exc: exc.headers),
    # Keys.
    keys.IdempotencyKeyReused: Answer(409, "idempotency_conflict"),
    keys.RetryOfDeadKey: Answer(409, "idempotency_conflict"),
    keys.NotDelegable: Answer(403, "no_account"),
    keys.ModelsBeyondParent: Answer(403, None),
    keys.RateLimitsBeyondParent: Answer(403, "rate_limits_beyond_parent"),
    keys.MintRateExceeded: Answer(
        429, "rate_limit_exceeded", headers=lambda exc: {"Retry-After": str(exc.retry_after_s)}
    ),
    keys.TooManyKeys: Answer(403, "too_many_keys"),
    keys.UnknownKey: Answer(404, "key_not_found"),
    keys.KeyLimitInvalid: Answer(400, None),
    keys.DelegationRefused: Answer(402, "insufficient_quota"),
    keys.DelegationConflict: Answer(409, "idempotency_conflict"),
    keys.DelegationInvalid: Answer(400, "delegation_refused"),
    keys.KeysLedgerUnavailable: Answer(503, "ledger_unavailable"),
    # A read (usage summary, statement) stopped at its time limit: nothing changed.
    ReadTimeout: Answer(503, "query_timeout", headers={"Retry-After": "5"}),
}

_encode = msgspec.json.encode
INTERNAL = "internal error; the request was not charged"


def api_error(exc: BaseException) -> ApiError:
    """What the client is told for `exc`: the answer of its most specific listed class."""
    if isinstance(exc, ApiError):
        return exc
    for cls in type(exc).__mro__:
        answer = ANSWERS.get(cls)
        if answer is not None:
            return answer.error(exc)  # type: ignore[arg-type]
    return ApiError(500, INTERNAL, code="internal")


def anthropic_error(error: ApiError) -> Response:
    """An error on a Messages route in Anthropic's shape, `{"type": "error", "error": {"type",
    "message"}}`, with the same status (Anthropic's SDK picks its exception class by status:
    402 budget refusals are its `billing_error`, 429 limits its `RateLimitError`). An upstream
    Messages producer's own error body passes as sent (its `request_id` and fields of its own)."""
    raw = error.raw
    if raw is None or _anthropic_shaped(raw) is None:
        _, body = openai_error_to_anthropic(error.status, {"error": {"message": error.message}})
        raw = _encode(body)
    return Response(
        raw, status_code=error.status, media_type="application/json", headers=error.headers
    )


def _anthropic_shaped(raw: bytes) -> dict[str, Any] | None:
    """`raw` decoded when it is an Anthropic error body (`{"type": "error", "error": {...}}`):
    from a Messages producer. Error bodies are small and rare: decoding one costs nothing."""
    if b'"type"' not in raw:
        return None
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    if (
        isinstance(body, dict)
        and body.get("type") == "error"
        and isinstance(body.get("error"), dict)
    ):
        return body
    return None


def _respond(request: Request, error: ApiError) -> Response:
    """`error` in the shape of the route it met: Anthropic's on /v1/messages, else OpenAI's
    (an Anthropic producer's error body, met on an OpenAI route, translated to OpenAI's)."""
    if request.url.path.startswith("/v1/messages"):
        return anthropic_error(error)
    if error.raw is not None:
        anthropic = _anthropic_shaped(error.raw)
        if anthropic is not None:
            _, body = anthropic_error_to_openai(error.status, anthropic)
            error.raw = _encode(body)
    return error.response()


async def _answer(request: Request, exc: Exception) -> Response:
    return _respond(request, api_error(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = ApiError(404, f"no such endpoint: {request.url.path}", code="unknown_url")
    elif exc.status_code == 405:
        error = ApiError(
            405, f"method {request.method} not allowed here", code="method_not_allowed"
        )
    else:
        error = ApiError(exc.status_code, str(exc.detail))
    return _respond(request, error)


async def _server_error(request: Request, exc: Exception) -> Response:
    return _respond(request, ApiError(500, INTERNAL, code="internal"))


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Any]] = {
    ApiError: _answer,
    LedgerError: _answer,
    DispatchError: _answer,
    keys.KeyLifecycleError: _answer,
    ReadTimeout: _answer,
    HTTPException: _http_error,
    Exception: _server_error,  # Starlette sends this one from its outermost middleware
}
