"""The one reading of an idempotency key, for every endpoint that takes one.

A key comes as `idempotency_key` in the JSON body or as an `Idempotency-Key` header (both
may be sent if they agree). It is 1-200 printable characters: it names a stored operation,
so a control character or a stray byte is a client's mistake, told as such (400), never
stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenworks.api.errors import ApiError

HEADER = "idempotency-key"
MAX_IDEMPOTENCY_KEY_CHARS = 200
PARAM = "idempotency_key"
MISSING_MESSAGE = (
    "every admin write needs an idempotency key ('idempotency_key' in the body or an "
    "Idempotency-Key header) so that a retry never applies it twice: use a fresh "
    "random value (a UUID) per operation and reuse it only to retry that operation"
)


def idempotency_key(
    headers: Mapping[str, str], body: dict[str, Any], *, required: bool
) -> str | None:
    """The request's idempotency key; None when it has none and none is `required`."""
    in_body = body.get(PARAM)
    header = headers.get(HEADER) or None
    if in_body is not None and (not isinstance(in_body, str) or not in_body):
        raise ApiError(400, "'idempotency_key' must be a non-empty string", param=PARAM)
    if in_body and header and in_body != header:
        raise ApiError(
            400, "the Idempotency-Key header and the body's idempotency_key differ", param=PARAM
        )
    key = in_body or header
    if key is None:
        if required:
            raise ApiError(400, MISSING_MESSAGE, param=PARAM, code="missing_idempotency_key")
        return None
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not key.isprintable():
        raise ApiError(
            400,
            f"an idempotency key is 1-{MAX_IDEMPOTENCY_KEY_CHARS} printable characters",
            param=PARAM,
        )
    return key
