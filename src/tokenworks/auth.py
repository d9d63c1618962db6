"""API keys: minting, hashing, the in-memory cache the hot path reads, and revocation.

A key is shown once (`tw-` + 43 url-safe characters, 256 bits); only its SHA-256 is stored.
A slow password hash buys nothing for random 256-bit secrets and would cost the hot path,
so a plain digest is the right tool. Lookups are one dict probe; revocation updates the
table and the cache in the same call, so it takes effect on the next request.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass

KEY_PREFIX = "tw-"

KEYS_DDL = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    key_hint TEXT NOT NULL,
    models TEXT,
    account_id TEXT,
    parent_id TEXT,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT,
    revoked_ms BIGINT,
    metadata TEXT NOT NULL DEFAULT '{}'
);
"""


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
        }


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    """Keys in SQLite, mirrored in memory. Writes are rare; reads are on every request."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        with self._lock:
            conn.executescript(KEYS_DDL)
        self._by_hash: dict[str, ApiKey] = {}
        self._by_id: dict[str, ApiKey] = {}
        self._children: dict[str, list[str]] = {}
        for row in conn.execute("SELECT * FROM api_keys"):
            self._remember(_from_row(row))

    def _remember(self, key: ApiKey) -> None:
        self._by_hash[key.key_hash] = key
        self._by_id[key.id] = key
        if key.parent_id is not None:
            self._children.setdefault(key.parent_id, []).append(key.id)

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
    ) -> tuple[ApiKey, str]:
        secret = new_secret()
        now_ms = int(time.time() * 1000)
        key = ApiKey(
            id="key_" + uuid.uuid4().hex[:20],
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
        )
        with self._lock:
            self._conn.execute(
                "INSERT INTO api_keys (id, name, key_hash, key_hint, models, account_id, "
                "parent_id, created_ms, expires_ms, revoked_ms, metadata) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
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
            )
            self._remember(key)
        return key, secret

    def get(self, key_id: str) -> ApiKey | None:
        return self._by_id.get(key_id)

    def list(self, include_revoked: bool = True) -> list[ApiKey]:
        keys = sorted(self._by_id.values(), key=lambda k: (k.created_ms, k.id))
        return [k for k in keys if include_revoked or k.revoked_ms is None]

    def children(self, key_id: str) -> list[ApiKey]:
        return [self._by_id[i] for i in self._children.get(key_id, ())]

    def revoke(self, key_id: str) -> list[ApiKey]:
        """Revoke a key and, transitively, every key minted under it. Returns those revoked."""
        if key_id not in self._by_id:
            raise KeyError(key_id)
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
            pending.extend(k.id for k in self.children(current))
        with self._lock:
            self._conn.executemany(
                "UPDATE api_keys SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL",
                [(now_ms, k.id) for k in revoked],
            )
        return revoked


def _from_row(row: sqlite3.Row) -> ApiKey:
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
