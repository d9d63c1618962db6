"""A key's life past parsing: creation (with idempotent retries), sub-agent minting within
its caps, the delegated budget and its undo when the ledger refuses it, and revocation.

The HTTP handlers (`api/admin.py`, `api/agent_keys.py`) parse a request into the arguments
here, call, and return; what goes wrong is raised as a `KeyLifecycleError` below (or a ledger
error), and `api/errors.py` answers it.

    KeyLifecycleError
    ├── IdempotencyKeyReused  the idempotency key made a key for a different request
    ├── RetryOfDeadKey        ... made a key that was refused, revoked or has expired since
    ├── NotDelegable          the parent key has no account to delegate from
    ├── ModelsBeyondParent    a child asked for models its parent may not use
    ├── RateLimitsBeyondParent a child asked for rate limits looser than its parent's
    ├── MintRateExceeded      the key tree minted faster than `keys.mint_rate_per_s`
    ├── TooManyKeys           a live-children or live-tree cap is reached
    ├── UnknownKey            revoking a key that does not exist
    ├── KeyLimitInvalid       the ledger refused a key's limit as given
    ├── DelegationRefused     the parent's room is smaller than the child's budget
    ├── DelegationConflict    the delegation's idempotency key was used for another child
    ├── DelegationInvalid     the ledger refused the delegation as given (too deep, ...)
    └── KeysLedgerUnavailable the ledger could not record a limit or delegation now
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from tokenworks.keys.rate_limits import RateLimits
from tokenworks.keys.store import ApiKey, KeyStore, derived_key_id, derived_secret, hash_key
from tokenworks.ledger import (
    IdempotencyConflict,
    LedgerBusy,
    LedgerError,
    Refused,
    StoreUnavailable,
)
from tokenworks.money import format_nano

if TYPE_CHECKING:
    from tokenworks.config import KeyLimits
    from tokenworks.ledger import Ledger

Limit = tuple[int, str]
"""A key's spending limit: (amount in nano, period: day, week, month or total)."""


class KeyLifecycleError(Exception):
    """A key operation refused; `param` names the request field at fault, if one is."""

    param: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class IdempotencyKeyReused(KeyLifecycleError):
    def __init__(self) -> None:
        super().__init__(
            "this idempotency key was already used for a different request; "
            "use a new key for a new request"
        )


class RetryOfDeadKey(KeyLifecycleError):
    """A retry must not bring back a key that was refused (revoked at once) or has gone."""

    def __init__(self) -> None:
        super().__init__(
            "this idempotency key belongs to a key that was refused, revoked or has expired; "
            "use a new idempotency key"
        )


class NotDelegable(KeyLifecycleError):
    def __init__(self) -> None:
        super().__init__("this key has no account to delegate from")


class ModelsBeyondParent(KeyLifecycleError):
    param = "models"

    def __init__(self) -> None:
        super().__init__("a child key may only use models its parent may use")


class RateLimitsBeyondParent(KeyLifecycleError):
    def __init__(self, field: str, parent: int) -> None:
        super().__init__(
            f"a child key's rate limits may not be looser than its parent's: "
            f"'rate_limits.{field}' must be at most {parent} (leave it out to inherit it)"
        )
        self.param = f"rate_limits.{field}"


class MintRateExceeded(KeyLifecycleError):
    def __init__(self, rate_per_s: float, retry_after_s: int) -> None:
        super().__init__(
            f"sub-agent keys are minted at most {rate_per_s:g} per second per key tree; retry later"
        )
        self.retry_after_s = retry_after_s


class TooManyKeys(KeyLifecycleError):
    pass


class UnknownKey(KeyLifecycleError):
    def __init__(self) -> None:
        super().__init__("no such key")


class KeyLimitInvalid(KeyLifecycleError):
    param = "limit"


class DelegationRefused(KeyLifecycleError):
    def __init__(self, refused: Refused, asked_nano: int) -> None:
        super().__init__(
            f"the parent key's room is {format_nano(max(refused.available_nano, 0))}, "
            f"less than the {format_nano(asked_nano)} asked for"
        )
        self.refused = refused


class DelegationConflict(KeyLifecycleError):
    def __init__(self) -> None:
        super().__init__("this idempotency key was used for a different child key")


class DelegationInvalid(KeyLifecycleError):
    pass


class KeysLedgerUnavailable(KeyLifecycleError):
    """The ledger is closed or its store is down; the key is not made (or is undone)."""

    def __init__(self) -> None:
        super().__init__("the ledger is unavailable")


def _outage(exc: LedgerError) -> bool:
    """Closed, its store down or its writer behind: a later retry may succeed. Every other
    ledger error is an answer about the request itself."""
    return isinstance(exc, StoreUnavailable | LedgerBusy) or type(exc) is LedgerError


# --------------------------------------------------------------------------- mint caps


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


def check_room(
    keys: KeyStore, parent: ApiKey, now_ms: int, limits: KeyLimits, mint_rate: MintRate
) -> None:
    """Refuse a new child beyond the configured mint rate or counts. The rate comes first:
    a count at its cap prunes expired keys, which the rate keeps rare."""
    root = keys.root_of(parent)
    wait_s = mint_rate.take(root.id, now_ms / 1000)
    if wait_s > 0:
        raise MintRateExceeded(limits.mint_rate_per_s, max(1, math.ceil(wait_s)))
    cap = limits.max_children_per_key
    if keys.live_children(parent.id, now_ms, cap) >= cap:
        raise TooManyKeys(f"this key already has {cap} live sub-agent keys; revoke some first")
    cap = limits.max_keys_per_tree
    if keys.live_descendants(root.id, now_ms, cap) >= cap:
        raise TooManyKeys(
            f"this key's tree already has {cap} live sub-agent keys; revoke some first"
        )


# --------------------------------------------------------------------------- retries


def find_retry(
    keys: KeyStore, seed: str, idempotency_key: str | None, asked: dict[str, Any]
) -> tuple[ApiKey | None, str | None, str | None]:
    """(the key a retry made before, its id, its secret) for a creation under an idempotency
    key; (None, None, None) without one. `asked` is everything the request asked for, in a
    canonical form: a retry asking for anything else is refused (`IdempotencyKeyReused`),
    since its derived secret (HMAC of the seed, the request and the idempotency key) is not
    the one the key was made with.
    """
    if idempotency_key is None:
        return None, None, None
    key_id = derived_key_id(seed, idempotency_key)
    secret = derived_secret(seed, idempotency_key, msgspec.json.encode(asked, order="sorted"))
    made = keys.get(key_id)
    if made is not None and made.key_hash != hash_key(secret):
        raise IdempotencyKeyReused()
    return made, key_id, secret


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True, slots=True)
class NewKey:
    """What an admin asked a key to be, parsed and checked against the routes and prices."""

    name: str
    models: list[str] | None
    account: str | None
    metadata: dict[str, str]
    ttl_s: float | None
    limit: Limit | None
    rate_limits: RateLimits | None = None

    def asked(self) -> dict[str, Any]:
        """The canonical request a retry is compared by."""
        asked = {
            "name": self.name, "models": self.models, "account": self.account,
            "metadata": self.metadata, "limit": self.limit,
            "ttl_ms": int(self.ttl_s * 1000) if self.ttl_s is not None else None,
        }  # fmt: skip
        return _with_rate_limits(asked, self.rate_limits)


def _with_rate_limits(asked: dict[str, Any], limits: RateLimits | None) -> dict[str, Any]:
    # Only when given: a retry of a key made before rate limits existed still matches.
    return asked if limits is None else {**asked, "rate_limits": limits.public()}


async def create_key(
    keys: KeyStore, ledger: Ledger, seed: str, idempotency_key: str | None, new: NewKey
) -> tuple[ApiKey, str]:
    """Make a key (or find the one a retry made) and set its limit. The limit is idempotent
    too, so a retry finishes what a failed call began."""
    key, key_id, secret = find_retry(keys, seed, idempotency_key, new.asked())
    if key is None:
        key, secret = keys.create(
            new.name, new.models, account_id=new.account, ttl_s=new.ttl_s,
            metadata=new.metadata, secret=secret, key_id=key_id, rate_limits=new.rate_limits,
        )  # fmt: skip
    assert secret is not None
    if new.limit is not None:
        try:
            await ledger.set_budget(
                ("key", key.id), new.limit[0], new.limit[1],
                idempotency_key=f"key-limit:{key.id}",
            )  # fmt: skip
        except IdempotencyConflict as exc:
            raise IdempotencyKeyReused() from exc
        except LedgerError as exc:
            raise KeysLedgerUnavailable() if _outage(exc) else KeyLimitInvalid(str(exc)) from exc
    return key, secret


@dataclass(frozen=True, slots=True)
class NewChild:
    """What an agent asked a sub-agent key to be, parsed."""

    name: str
    models: list[str] | None  # as asked; None: the parent's
    limit_nano: int  # its delegated budget, a 'total'
    ttl_s: float | None  # as asked, before the parent's expiry caps it
    rate_limits: RateLimits | None = None  # with the parent's filled in (`child_rate_limits`)

    def asked(self) -> dict[str, Any]:
        # What the agent asked, not what it got: the TTL before the parent's cap, which
        # shrinks between retries.
        asked = {
            "name": self.name, "models": self.models, "limit": (self.limit_nano, "total"),
            "ttl_ms": int(self.ttl_s * 1000) if self.ttl_s is not None else None,
        }  # fmt: skip
        return _with_rate_limits(asked, self.rate_limits)


def require_delegable(parent: ApiKey) -> None:
    """A key can mint children only if it pays from an account."""
    if parent.account_id is None:
        raise NotDelegable()


def child_models(parent: ApiKey, asked: list[str] | None) -> list[str] | None:
    """The models a child may call: those asked, all of them the parent's; else the parent's."""
    if asked is None:
        return sorted(parent.models) if parent.models is not None else None
    if not parent.allows_all(asked):
        raise ModelsBeyondParent()
    return asked


def child_rate_limits(parent: ApiKey, asked: RateLimits | None) -> RateLimits | None:
    """A child's rate limits: those asked, each no looser than the parent's (else refused,
    naming the field), and the parent's for each one not asked."""
    own = parent.rate_limits
    if own is None:
        return asked
    wanted = asked or RateLimits()
    for name in wanted.looser_fields(own):
        if getattr(wanted, name) is not None:
            raise RateLimitsBeyondParent(name, getattr(own, name))
    return wanted.inherit(own)


async def mint_child(
    keys: KeyStore,
    ledger: Ledger,
    parent: ApiKey,
    parent_secret: str,
    idempotency_key: str | None,
    new: NewChild,
    *,
    limits: KeyLimits,
    mint_rate: MintRate,
    now_ms: int,
) -> tuple[ApiKey, str]:
    """Mint a sub-agent key under `parent` with its budget carved out of the parent's room.

    The child pays from the parent's account, may use at most the parent's models, expires
    no later than the parent and is served at its default tier. A retry (same idempotency
    key, same request) gets the same child and secret, derived from the parent's own secret:
    an agent that lost the answer does not mint a second budget. A child whose budget the
    ledger refuses is revoked at once, and a retry of it is refused too.
    """
    require_delegable(parent)
    models = child_models(parent, new.models)
    ttl_s = new.ttl_s
    if parent.expires_ms is not None:
        left_s = (parent.expires_ms - now_ms) / 1000
        ttl_s = left_s if ttl_s is None else min(ttl_s, left_s)
    metadata = {k: v for k, v in parent.metadata.items() if k == "service_tier"}
    child, child_id, secret = find_retry(keys, parent_secret, idempotency_key, new.asked())
    if child is not None and not child.active(now_ms):
        raise RetryOfDeadKey()
    if child is None:
        check_room(keys, parent, now_ms, limits, mint_rate)
        child, secret = keys.create(
            new.name, models, account_id=parent.account_id, parent_id=parent.id,
            ttl_s=ttl_s, metadata=metadata, secret=secret, key_id=child_id,
            rate_limits=new.rate_limits,
        )  # fmt: skip
    assert secret is not None
    try:
        await ledger.delegate(
            parent.id, child.id, new.limit_nano, idempotency_key=f"delegate:{child.id}",
            expires_ms=child.expires_ms,
        )  # fmt: skip
    except IdempotencyConflict as exc:
        raise DelegationConflict() from exc
    except Refused as exc:
        keys.revoke(child.id)
        raise DelegationRefused(exc, new.limit_nano) from exc
    except LedgerError as exc:
        keys.revoke(child.id)
        raise KeysLedgerUnavailable() if _outage(exc) else DelegationInvalid(str(exc)) from exc
    return child, secret


async def revoke_key(keys: KeyStore, ledger: Ledger, key_id: str) -> list[ApiKey]:
    """Revoke a key and every key minted under it, and close its delegated budget so its
    unspent room returns to the parent."""
    try:
        revoked = keys.revoke(key_id)
    except KeyError as exc:
        raise UnknownKey() from exc
    if ledger.budgets(("key", key_id)):
        await ledger.revoke(("key", key_id), idempotency_key=f"revoke-key:{key_id}")
    return revoked
