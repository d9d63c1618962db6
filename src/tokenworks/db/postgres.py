"""PostgreSQL connections: the `?schema=` of a URL applied, and DDL run once per database.

Two drivers, on purpose (docs/design.md, "Storage"): the ledger's store speaks asyncpg on
the event loop; the usage and key stores speak psycopg 3 synchronously, from a writer
thread and from request handlers and the CLI.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tokenworks.db import split_schema

CONNECT_TIMEOUT_S = 10
# Serialises concurrent first opens of one database (CREATE ... IF NOT EXISTS races).
DDL_LOCK_ID = 7413
# SQLSTATE classes of a value the store will not take, so the same rows fail again: 22 data
# exception (out of range, bad text, NUL in jsonb), 23 integrity constraint (NOT NULL,
# CHECK).
# Anything else (connection lost, timeouts, admin shutdown, disk full: classes 08, 53, 57)
# is the store being unavailable.
REFUSED_SQLSTATE_CLASSES = ("22", "23")


def server_settings(schema: str | None) -> dict[str, str]:
    """asyncpg's `server_settings` that make the URL's schema the tables' home."""
    return {"search_path": schema} if schema else {}


def connect(
    url: str, statements: Iterable[str] = (), *, autocommit: bool = True
) -> psycopg.Connection[dict[str, Any]]:
    """A psycopg connection for a `postgresql://...[?schema=NAME]` URL, rows as dicts, its
    search_path set to the schema (created if missing), with `statements` (DDL) applied
    under an advisory lock."""
    conninfo, schema = split_schema(url)
    ddl = list(statements)
    options: dict[str, Any] = {"options": f"-c search_path={schema}"} if schema else {}
    conn = psycopg.connect(
        conninfo,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT_S,
        row_factory=dict_row,
        **options,
    )
    try:
        if schema or ddl:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (DDL_LOCK_ID,))
                if schema:
                    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                for stmt in ddl:
                    conn.execute(stmt)
        conn.autocommit = autocommit
    except BaseException:
        conn.close()
        raise
    return conn
