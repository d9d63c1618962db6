"""Databases: one `database:` URL, parsed here, and the helpers every store connects with.

`sqlite:///relative.db`, `sqlite:////abs/path.db`, `sqlite://:memory:`, or
`postgresql://user@host:port/db` (`postgres://` too), optionally `?schema=NAME` to put the
tables in that schema. `table.py` declares tables; `sqlite.py` and `postgres.py` connect.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterator
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

Dialect = Literal["sqlite", "postgres"]


def backend(url: str) -> Dialect:
    """Which database a URL names; ValueError for any other."""
    if url.startswith("sqlite://"):
        return "sqlite"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgres"
    raise ValueError(f"unsupported database URL {url.split(':', 1)[0]}://...")


def sqlite_path(url: str) -> str:
    """The file of a `sqlite://` URL: `sqlite:///relative.db` is relative, `sqlite:////abs.db`
    absolute, `sqlite://:memory:` (or nothing) an in-memory database."""
    rest = url.removeprefix("sqlite://")
    if rest in ("", ":memory:", "/:memory:"):
        return ":memory:"
    return rest[1:] if rest.startswith("/") else rest


def split_schema(url: str) -> tuple[str, str | None]:
    """A PostgreSQL URL without our `schema=` query parameter (which drivers do not know),
    and that schema's name, checked to be a plain identifier."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = [(k, v) for k, v in query if k != "schema"]
    if schema is not None and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise ValueError(f"bad schema name {schema!r}")
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


@contextlib.contextmanager
def job_transaction(conn: Any) -> Iterator[None]:
    """One transaction of a background job on its own connection: on SQLite `BEGIN
    IMMEDIATE`, so the write lock is taken before the reads its writes depend on (a
    deferred transaction could be refused the lock halfway); psycopg's own block else."""
    if isinstance(conn, sqlite3.Connection):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    else:
        with conn.transaction():
            yield


__all__ = ["Dialect", "backend", "job_transaction", "split_schema", "sqlite_path"]
