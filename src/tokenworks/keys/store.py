"""API keys: minting, hashing, the in-memory cache the hot path reads, and revocation.

A key is shown once (`tw-` + 43 url-safe characters, 256 bits); only its SHA-256 is stored.
A slow password hash buys nothing for random 256-bit secrets and would cost the hot path,
so a plain digest is the right tool. Lookups are one dict probe; revocation updates the
table and the cache in the same call, so it takes effect on the next request.

Storage is a small seam, `KeyRows`: the `api_keys` table in SQLite or PostgreSQL, each on its
own connection (`open_key_rows(url)`, `KeyStore.open(url)`). The store loads the *live* keys
at start (not revoked, not expired; and the ancestors they count under) and writes on create
and revoke; the hot path reads only memory. Memory and start-up follow the live tenants, not
every key ever minted: a fleet that mints a million short-lived sub-agent keys a month does
not grow either. A dead key is read from the table when an admin asks for it (to say
"revoked" rather than "unknown"), and listings page through the table.

Rate limits (`keys/rate_limits.py`) live beside the keys in `rate_limits`, one row per scope
(`key:<id>`, `account:<id>`): a key's are written in the transaction that makes the key, an
account's whenever an admin sets them. A database an earlier version made has no such table;
opening it creates one (`CREATE TABLE IF NOT EXISTS`), which is the whole upgrade. Each key
carries `rate_scopes`, every limited scope a request of it draws on (its own, its ancestors',
its account's), so a key without limits costs the hot path one empty-tuple check.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tokenworks.db import backend, sqlite_path
from tokenworks.db.table import Table
from tokenworks.keys.rate_limits import RateLimits

KEY_PREFIX = "tw-"

KEYS = Table(
    "api_keys",
    ("id",),
    (
        ("id", "TEXT"),
        ("name", "TEXT"),
        ("key_hash", "TEXT"),
        ("key_hint", "TEXT"),
        ("models", "TEXT"),  # JSON list, or NULL: every model
        ("account_id", "TEXT"),
        ("parent_id", "TEXT"),
        ("created_ms", "BIGINT"),
        ("expires_ms", "BIGINT"),
        ("revoked_ms", "BIGINT"),
        ("metadata", "TEXT"),  # JSON object
    ),
    constraints=(
        ("name", "NOT NULL"),
        ("key_hash", "NOT NULL UNIQUE"),
        ("key_hint", "NOT NULL"),
        ("created_ms", "NOT NULL"),
        ("metadata", "NOT NULL DEFAULT '{}'"),
    ),
    indexes=(
        # Listings page in (created_ms, id) order. Start-up reads live rows only: unrevoked
        # and not expired, by expiry, so that a million sub-agent keys which simply expired
        # are not read either (`api_keys_live`, on (id), held them; it goes).
        "CREATE INDEX IF NOT EXISTS api_keys_created ON api_keys (created_ms, id)",
        "DROP INDEX IF EXISTS api_keys_live",
        "CREATE INDEX IF NOT EXISTS api_keys_unrevoked_expiry ON api_keys (expires_ms)"
        " WHERE revoked_ms IS NULL",
        # A name typed on the command line finds its keys in one read, not a walk of pages.
        "CREATE INDEX IF NOT EXISTS api_keys_name ON api_keys (lower(name), created_ms, id)",
    ),
)


RATE_LIMITS = Table(
    "rate_limits",
    ("scope",),
    (
        ("scope", "TEXT"),  # "key:<id>" or "account:<id>"
        ("rpm", "BIGINT"),
        ("tpm", "BIGINT"),
        ("max_concurrency", "BIGINT"),
        ("updated_ms", "BIGINT"),
    ),
    constraints=(("updated_ms", "NOT NULL"),),
)
_UPSERT_LIMITS = (
    "INSERT INTO rate_limits (scope, rpm, tpm, max_concurrency, updated_ms) "
    "VALUES ({0}, {0}, {0}, {0}, {0}) ON CONFLICT (scope) DO UPDATE SET rpm = excluded.rpm, "
    "tpm = excluded.tpm, max_concurrency = excluded.max_concurrency, "
    "updated_ms = excluded.updated_ms"
)
LimitsRow = tuple[str, int | None, int | None, int | None, int]
RateScopes = tuple[tuple[str, RateLimits], ...]


def limits_row(scope: str, limits: RateLimits, now_ms: int) -> LimitsRow:
    return (scope, limits.rpm, limits.tpm, limits.max_concurrency, now_ms)


@dataclass(slots=True)
class ApiKey:
    id: str
    name: str
    key_hash: str
    key_hint: str
    models: frozenset[str] | None
    account_id: str | None
    parent_id: str | None
    created_ms: int
    expires_ms: int | None
    revoked_ms: int | None
    metadata: dict[str, str]
    rate_limits: RateLimits | None = None  # its own, as made
    # Every limited scope its requests draw on (own, ancestors', account's); () when none.
    rate_scopes: RateScopes = ()

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def allows_all(self, models: list[str]) -> bool:
        return self.models is None or set(models) <= self.models

    def active(self, now_ms: int) -> bool:
        if self.revoked_ms is not None:
            return False
        return self.expires_ms is None or now_ms < self.expires_ms

    def public(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "hint": self.key_hint,
            "models": sorted(self.models) if self.models is not None else None,
            "account": self.account_id,
            "parent": self.parent_id,
            "created_at": self.created_ms // 1000,
            "expires_at": self.expires_ms // 1000 if self.expires_ms else None,
            "revoked_at": self.revoked_ms // 1000 if self.revoked_ms else None,
            "metadata": self.metadata,
            "rate_limits": self.rate_limits.public() if self.rate_limits is not None else None,
        }


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def derived_key_id(seed: str, idempotency_key: str) -> str:
    """The id a key created under an idempotency key gets, whatever the request asked:
    a retry finds the key by it, and compares secrets to tell a retry from a new request."""
    mac = hmac.new(seed.encode(), b"tokenworks-key-id:" + idempotency_key.encode(), "sha256")
    return "key_" + mac.hexdigest()[:20]


def derived_secret(seed: str, idempotency_key: str, request: bytes) -> str:
    """The secret a retried key creation gets again: HMAC(seed, request digest, idempotency key).

    The seed is a secret the caller already proved it holds (the admin key, or the parent
    key of a sub-agent key), so a retry can be answered with the same secret while only its
    hash is stored, and nobody without the seed can compute it. `request` is the canonical
    form of what was asked: the same idempotency key with a different request derives a
    different secret, which is how a changed retry is told apart (409) without storing it.
    """
    digest = hashlib.sha256(request).hexdigest().encode()  # fixed length: no ambiguity
    mac = hmac.new(
        seed.encode(), b"tokenworks-key:" + digest + b":" + idempotency_key.encode(), "sha256"
    )
    return KEY_PREFIX + base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


KEY_COLUMNS = KEYS.column_names
MAX_ANCESTRY = 64  # levels of missing ancestors looked up at start
LIST_PAGE = 1_000


class KeyRows(Protocol):
    """Where the `api_keys` rows live. Each call is its own committed transaction."""

    def load(self, now_ms: int) -> list[Mapping[str, Any]]:
        """The live rows (not revoked, not expired at `now_ms`), as mappings of column name to
        value."""

    def get(self, key_ids: Sequence[str]) -> list[Mapping[str, Any]]:
        """The rows of these ids, live or not."""

    def page(
        self,
        limit: int,
        after: tuple[int, str] | None,
        include_revoked: bool,
        name: str | None = None,
    ) -> list[Mapping[str, Any]]:
        """Up to `limit` rows in (created_ms, id) order, after `after`; with `name`, only
        rows of that name in any case (`lower()`: ASCII letters on SQLite, all on
        PostgreSQL)."""

    def insert(self, row: Sequence[Any], limits: LimitsRow | None = None) -> None:
        """One row, values in `KEY_COLUMNS` order, and its rate limits, in one transaction."""

    def load_limits(self, now_ms: int) -> list[Mapping[str, Any]]:
        """The `rate_limits` rows of accounts and of live keys (as `load`): a dead sub-agent
        key's limits stay in the table, out of memory."""

    def set_limits(self, row: LimitsRow) -> None:
        """Insert or replace one scope's rate limits."""

    def revoke(self, key_ids: Sequence[str], now_ms: int) -> None:
        """Set `revoked_ms` on those of the keys not revoked yet."""

    def close(self) -> None: ...


# Start-up's read: two ranges of `api_keys_unrevoked_expiry`, not an OR, so that the planners
# read neither the revoked rows nor the expired ones.
LOAD_LIVE = (
    "SELECT * FROM api_keys WHERE revoked_ms IS NULL AND expires_ms IS NULL "
    "UNION ALL SELECT * FROM api_keys WHERE revoked_ms IS NULL AND expires_ms > {ph}"
)
# And their rate limits: the accounts' scopes as a range of the key (';' follows ':' by code
# point, hence "C" on PostgreSQL, whose locales may order punctuation otherwise), then a
# lookup per live key, so that a dead key's limits are never read either.
LOAD_LIMITS = (
    "SELECT * FROM rate_limits WHERE scope{c} >= 'account:' AND scope{c} < 'account;' "
    "UNION ALL SELECT r.* FROM (" + LOAD_LIVE.replace("SELECT *", "SELECT id") + ") k "
    "JOIN rate_limits r ON r.scope = 'key:' || k.id"
)


class _SqlKeyRows:
    """The SQL both dialects share; subclasses bring the connection and the placeholder."""

    placeholder = "?"

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        ph = self.placeholder
        self._insert = (
            f"INSERT INTO api_keys ({', '.join(KEY_COLUMNS)}) "
            f"VALUES ({', '.join([ph] * len(KEY_COLUMNS))})"
        )
        self._revoke = (
            f"UPDATE api_keys SET revoked_ms = {ph} WHERE id = {ph} AND revoked_ms IS NULL"
        )
        self._upsert_limits = _UPSERT_LIMITS.format(ph)
        self._load_limits = LOAD_LIMITS.format(ph=ph, c=' COLLATE "C"' if ph == "%s" else "")

    def load(self, now_ms: int) -> list[Mapping[str, Any]]:
        ph = self.placeholder
        sql = LOAD_LIVE.format(ph=ph)
        return list(self._conn.execute(sql, (now_ms,)).fetchall())

    def get(self, key_ids: Sequence[str]) -> list[Mapping[str, Any]]:
        if not key_ids:
            return []
        marks = ", ".join([self.placeholder] * len(key_ids))
        sql = f"SELECT * FROM api_keys WHERE id IN ({marks})"
        return list(self._conn.execute(sql, tuple(key_ids)).fetchall())

    def page(
        self,
        limit: int,
        after: tuple[int, str] | None,
        include_revoked: bool,
        name: str | None = None,
    ) -> list[Mapping[str, Any]]:
        ph = self.placeholder
        where: list[str] = [] if include_revoked else ["revoked_ms IS NULL"]
        params: list[Any] = []
        if name is not None:
            where.append(f"lower(name) = lower({ph})")
            params.append(name)
        if after is not None:
            # (created_ms, id) > after, spelled out: both dialects use the index with it.
            where.append(f"(created_ms > {ph} OR (created_ms = {ph} AND id > {ph}))")
            params += [after[0], after[0], after[1]]
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT * FROM api_keys{clause} ORDER BY created_ms, id LIMIT {ph}"
        return list(self._conn.execute(sql, (*params, limit)).fetchall())

    def load_limits(self, now_ms: int) -> list[Mapping[str, Any]]:
        return list(self._conn.execute(self._load_limits, (now_ms,)).fetchall())

    def close(self) -> None:
        self._conn.close()


class SqliteKeyRows(_SqlKeyRows):
    """`api_keys` in SQLite, on its own autocommit connection (WAL, like the usage store)."""

    placeholder = "?"

    def __init__(self, path: str) -> None:
        from tokenworks.db.sqlite import connect_rows

        super().__init__(connect_rows(path, KEYS.ddl("sqlite") + RATE_LIMITS.ddl("sqlite")))

    def insert(self, row: Sequence[Any], limits: LimitsRow | None = None) -> None:
        if limits is None:
            self._conn.execute(self._insert, tuple(row))
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute(self._insert, tuple(row))
            self._conn.execute(self._upsert_limits, limits)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def set_limits(self, row: LimitsRow) -> None:
        self._conn.execute(self._upsert_limits, row)

    def revoke(self, key_ids: Sequence[str], now_ms: int) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.executemany(self._revoke, [(now_ms, k) for k in key_ids])
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")


class PostgresKeyRows(_SqlKeyRows):
    """`api_keys` in PostgreSQL (psycopg 3, sync, autocommit), honouring `?schema=`."""

    placeholder = "%s"

    def __init__(self, url: str) -> None:
        from tokenworks.db.postgres import connect

        self._url = url
        super().__init__(connect(url, KEYS.ddl("postgres") + RATE_LIMITS.ddl("postgres")))

    def _reconnect_if_broken(self) -> None:
        if self._conn.broken or self._conn.closed:
            from tokenworks.db.postgres import connect

            self._conn.close()
            self._conn = connect(self._url)

    def insert(self, row: Sequence[Any], limits: LimitsRow | None = None) -> None:
        self._reconnect_if_broken()
        with self._conn.transaction():
            self._conn.execute(self._insert, tuple(row))
            if limits is not None:
                self._conn.execute(self._upsert_limits, limits)

    def set_limits(self, row: LimitsRow) -> None:
        self._reconnect_if_broken()
        self._conn.execute(self._upsert_limits, row)

    def get(self, key_ids: Sequence[str]) -> list[Mapping[str, Any]]:
        self._reconnect_if_broken()  # dead keys and listings read here long after start
        return super().get(key_ids)

    def page(
        self,
        limit: int,
        after: tuple[int, str] | None,
        include_revoked: bool,
        name: str | None = None,
    ) -> list[Mapping[str, Any]]:
        self._reconnect_if_broken()
        return super().page(limit, after, include_revoked, name)

    def revoke(self, key_ids: Sequence[str], now_ms: int) -> None:
        self._reconnect_if_broken()
        with self._conn.transaction(), self._conn.cursor() as cur:
            cur.executemany(self._revoke, [(now_ms, k) for k in key_ids])


def open_key_rows(url: str) -> KeyRows:
    """The `api_keys` table for a `sqlite://` or `postgresql://` database URL."""
    if backend(url) == "sqlite":
        return SqliteKeyRows(sqlite_path(url))
    return PostgresKeyRows(url)


class KeyStore:
    """Keys in a `KeyRows` table, mirrored in memory. Writes are rare; reads are on every
    request. Writes run synchronously on the caller's thread (one short statement)."""

    def __init__(self, rows: KeyRows) -> None:
        self._rows = rows
        self._lock = threading.Lock()
        self._by_hash: dict[str, ApiKey] = {}
        self._by_id: dict[str, ApiKey] = {}
        self._children: dict[str, list[str]] = {}
        # Live (unrevoked; expired ones are pruned when a count reaches its cap) children per
        # key and descendants per root key: what the mint limits count.
        self._live_children: dict[str, set[str]] = {}
        self._live_tree: dict[str, set[str]] = {}
        self._account_limits: dict[str, RateLimits] = {}
        self._by_account: dict[str, list[ApiKey]] = {}
        now_ms = int(time.time() * 1000)
        with self._lock:
            loaded = [_from_row(row) for row in rows.load(now_ms)]
            # The ancestors a live key counts under (an expired parent's live child), level by
            # level: bounded by the depth of the trees, and only where a parent is missing.
            ids = {key.id for key in loaded}
            missing = {k.parent_id for k in loaded if k.parent_id and k.parent_id not in ids}
            for _ in range(MAX_ANCESTRY):
                if not missing:
                    break
                found = [_from_row(row) for row in rows.get(sorted(missing))]
                loaded += found
                ids.update(k.id for k in found)
                missing = {k.parent_id for k in found if k.parent_id and k.parent_id not in ids}
            loaded_limits = rows.load_limits(now_ms)
        limits = {r["scope"]: _limits_from_row(r) for r in loaded_limits}
        keys = sorted(loaded, key=lambda k: (k.created_ms, k.id))
        for key in keys:
            key.rate_limits = limits.get("key:" + key.id)
        self._account_limits = {
            scope.removeprefix("account:"): value
            for scope, value in limits.items()
            if scope.startswith("account:")
        }
        # Every key is known before any is counted: a parent and its child made in the same
        # millisecond may load in either order, and the count goes to the child's root.
        self._by_id.update((key.id, key) for key in keys)
        for key in keys:
            self._remember(key, now_ms)
        for key in keys:
            key.rate_scopes = self._rate_scopes(key)

    @classmethod
    def open(cls, url: str) -> KeyStore:
        return cls(open_key_rows(url))

    def close(self) -> None:
        with self._lock:
            self._rows.close()

    def _remember(self, key: ApiKey, now_ms: int) -> None:
        self._by_hash[key.key_hash] = key
        self._by_id[key.id] = key
        if key.account_id is not None:
            self._by_account.setdefault(key.account_id, []).append(key)
        if key.parent_id is not None:
            self._children.setdefault(key.parent_id, []).append(key.id)
            if key.active(now_ms):
                self._live_children.setdefault(key.parent_id, set()).add(key.id)
                self._live_tree.setdefault(self.root_of(key).id, set()).add(key.id)

    def _rate_scopes(self, key: ApiKey) -> RateScopes:
        """Every limited scope a request of `key` draws on: its own limits and those of every
        key above it (a key's limits cover all it minted), and its account's."""
        scopes: list[tuple[str, RateLimits]] = []
        current: ApiKey | None = key
        while current is not None:
            if current.rate_limits is not None and not current.rate_limits.empty:
                scopes.append(("key:" + current.id, current.rate_limits))
            parent_id = current.parent_id
            current = self._by_id.get(parent_id) if parent_id is not None else None
        if key.account_id is not None:
            account = self._account_limits.get(key.account_id)
            if account is not None and not account.empty:
                scopes.append(("account:" + key.account_id, account))
        return tuple(scopes)

    def account_limits(self, account_id: str) -> RateLimits | None:
        return self._account_limits.get(account_id)

    def set_account_limits(self, account_id: str, limits: RateLimits) -> None:
        """Set (or, all fields None, clear) an account's rate limits; every key paying from
        it draws on them from its next request."""
        with self._lock:
            self._rows.set_limits(
                limits_row("account:" + account_id, limits, int(time.time() * 1000))
            )
            self._account_limits[account_id] = limits
            for key in self._by_account.get(account_id, ()):
                key.rate_scopes = self._rate_scopes(key)

    def root_of(self, key: ApiKey) -> ApiKey:
        """The admin-made key at the top of `key`'s tree (`key` itself when it has no parent)."""
        while key.parent_id is not None and key.parent_id in self._by_id:
            key = self._by_id[key.parent_id]
        return key

    def live_children(self, key_id: str, now_ms: int, cap: int) -> int:
        """How many live children `key_id` has, exact up to `cap` (expired ones are pruned
        only when the count reaches it, so the usual call is O(1))."""
        return self._live_count(self._live_children.get(key_id), now_ms, cap)

    def live_descendants(self, root_id: str, now_ms: int, cap: int) -> int:
        """How many live keys hang below the root key `root_id`, at every depth; see above."""
        return self._live_count(self._live_tree.get(root_id), now_ms, cap)

    def _live_count(self, ids: set[str] | None, now_ms: int, cap: int) -> int:
        if not ids:
            return 0
        if len(ids) >= cap:
            ids.difference_update([i for i in ids if not self._by_id[i].active(now_ms)])
        return len(ids)

    def authenticate(self, secret: str, now_ms: int | None = None) -> ApiKey | None:
        """The active key for a presented secret, or None."""
        # Lookup is by digest of a 256-bit secret: learning digest prefixes through timing
        # tells an attacker nothing about other keys' secrets.
        key = self._by_hash.get(hash_key(secret))
        if key is None:
            return None
        if not key.active(now_ms if now_ms is not None else int(time.time() * 1000)):
            return None
        return key

    def create(
        self,
        name: str,
        models: list[str] | None = None,
        *,
        account_id: str | None = None,
        parent_id: str | None = None,
        ttl_s: float | None = None,
        metadata: dict[str, str] | None = None,
        secret: str | None = None,
        key_id: str | None = None,
        rate_limits: RateLimits | None = None,
    ) -> tuple[ApiKey, str]:
        """Mint a key; a retryable creation passes its derived `secret` and `key_id`."""
        assert key_id is None or key_id not in self._by_id, "look the id up before creating it"
        secret = secret or new_secret()
        now_ms = int(time.time() * 1000)
        key = ApiKey(
            id=key_id or "key_" + uuid.uuid4().hex[:20],
            name=name,
            key_hash=hash_key(secret),
            key_hint=secret[:7] + "..." + secret[-4:],
            models=frozenset(models) if models is not None else None,
            account_id=account_id,
            parent_id=parent_id,
            created_ms=now_ms,
            expires_ms=now_ms + int(ttl_s * 1000) if ttl_s is not None else None,
            revoked_ms=None,
            metadata=metadata or {},
            rate_limits=rate_limits if rate_limits is not None and not rate_limits.empty else None,
        )
        limits = (
            limits_row("key:" + key.id, key.rate_limits, now_ms)
            if key.rate_limits is not None
            else None
        )
        with self._lock:
            self._rows.insert(
                (
                    key.id,
                    key.name,
                    key.key_hash,
                    key.key_hint,
                    json.dumps(sorted(key.models)) if key.models is not None else None,
                    key.account_id,
                    key.parent_id,
                    key.created_ms,
                    key.expires_ms,
                    None,
                    json.dumps(key.metadata),
                ),
                limits,
            )
            self._remember(key, now_ms)
            key.rate_scopes = self._rate_scopes(key)
        return key, secret

    def get(self, key_id: str) -> ApiKey | None:
        """The key, live from memory, else (revoked or expired, not kept in memory) from the
        table, uncached."""
        key = self._by_id.get(key_id)
        if key is not None:
            return key
        with self._lock:
            rows = self._rows.get([key_id])
        return _from_row(rows[0]) if rows else None

    def page(
        self,
        limit: int,
        after: tuple[int, str] | None = None,
        include_revoked: bool = True,
        name: str | None = None,
    ) -> builtins.list[ApiKey]:
        """Up to `limit` keys in (created_ms, id) order after `after`, from the table: the
        dead ones too, which memory does not keep. O(page), by the (created_ms, id) index
        (with `name`, by the name index)."""
        with self._lock:
            rows = self._rows.page(limit, after, include_revoked, name)
        return [self._by_id.get(r["id"]) or _from_row(r) for r in rows]

    def list(self, include_revoked: bool = True) -> builtins.list[ApiKey]:
        """Every key, in pages of the table (tools and tests; the API pages)."""
        out: list[ApiKey] = []
        after: tuple[int, str] | None = None
        while True:
            page = self.page(LIST_PAGE, after, include_revoked)
            out += page
            if len(page) < LIST_PAGE:
                return out
            after = (page[-1].created_ms, page[-1].id)

    def children(self, key_id: str) -> builtins.list[ApiKey]:  # `list` is the method here
        # Live children only: revoked ones have left memory.
        return [self._by_id[i] for i in self._children.get(key_id, ()) if i in self._by_id]

    def _forget_live(self, key: ApiKey) -> None:
        if key.parent_id is not None:
            self._live_children.get(key.parent_id, set()).discard(key.id)
            self._live_tree.get(self.root_of(key).id, set()).discard(key.id)

    def revoke(self, key_id: str) -> builtins.list[ApiKey]:
        """Revoke a key and, transitively, every live key minted under it. Returns those
        revoked. A dead key (not in memory) that is only expired is marked revoked too."""
        if key_id not in self._by_id:
            dead = self.get(key_id)
            if dead is None:
                raise KeyError(key_id)
            if dead.revoked_ms is not None:
                return []
            dead.revoked_ms = int(time.time() * 1000)
            with self._lock:
                self._rows.revoke([key_id], dead.revoked_ms)
            return [dead]
        now_ms = int(time.time() * 1000)
        revoked: list[ApiKey] = []
        pending = [key_id]
        seen: set[str] = set()
        while pending:
            current = pending.pop()
            if current in seen:
                continue
            seen.add(current)
            key = self._by_id[current]
            if key.revoked_ms is None:
                key.revoked_ms = now_ms
                revoked.append(key)
                self._forget_live(key)
            pending.extend(k.id for k in self.children(current))
        if revoked:
            with self._lock:
                self._rows.revoke([k.id for k in revoked], now_ms)
        # Dead keys leave memory (the table answers for them from now on).
        for dead_id in seen:
            dead = self._by_id.pop(dead_id)
            self._by_hash.pop(dead.key_hash, None)
            self._children.pop(dead_id, None)
            self._live_children.pop(dead_id, None)
            self._live_tree.pop(dead_id, None)
        return revoked


def _from_row(row: Mapping[str, Any]) -> ApiKey:
    models = json.loads(row["models"]) if row["models"] is not None else None
    return ApiKey(
        id=row["id"],
        name=row["name"],
        key_hash=row["key_hash"],
        key_hint=row["key_hint"],
        models=frozenset(models) if models is not None else None,
        account_id=row["account_id"],
        parent_id=row["parent_id"],
        created_ms=row["created_ms"],
        expires_ms=row["expires_ms"],
        revoked_ms=row["revoked_ms"],
        metadata=json.loads(row["metadata"] or "{}"),
    )


def _limits_from_row(row: Mapping[str, Any]) -> RateLimits:
    return RateLimits(row["rpm"], row["tpm"], row["max_concurrency"])
