"""The PostgreSQL store: one writer connection, a small read pool.

Each batch is one statement with one parameter: the batch's rows as one JSON document,
which an `INSERT ... SELECT ... FROM jsonb_array_elements(...) ON CONFLICT` per table (each a
data-modifying CTE of the one statement, which PostgreSQL runs as one transaction) unpacks on
the server. A batch of thousands of settlements is one round trip. JSON rather than typed
arrays because encoding is the part that runs on the gateway's event loop: msgspec writes the
document about four times faster than asyncpg encodes the same rows as arrays (measured:
3 against 13 us per settled request), and jsonb keeps integers exact. A
session advisory lock on the writer connection makes this process the ledger's only writer
(a crash drops the connection and with it the lock).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from tokenworks.db import split_schema
from tokenworks.db.postgres import REFUSED_SQLSTATE_CLASSES, server_settings
from tokenworks.db.reads import ReadTimeout, pg_timeout_ms
from tokenworks.db.table import Columns
from tokenworks.ledger.domain import BeforeHorizon, LedgerError
from tokenworks.ledger.expiry import ensure_partitions
from tokenworks.ledger.rows import Batch, Snapshot
from tokenworks.ledger.schema import PERIOD_MS, TRANSFERS, ddl
from tokenworks.ledger.store import (
    AUDIT_QUERIES,
    AUDIT_ROWS,
    BATCH_TABLES,
    GET_HOLD,
    GET_HORIZON,
    GET_IDEMPOTENCY,
    LOAD_QUERIES,
    MOVEMENTS,
    NET_BEFORE,
    RECENT_CLOSED_HOLDS,
    SETTLED_SCOPES,
    Attachment,
    AuditData,
    AuditReader,
    StatementData,
    net_before_params,
    net_of,
    numbered,
    upsert_tail,
)
from tokenworks.ledger.upgrade import upgrade_postgres

CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 60.0


def _json_insert(table: str, columns: Columns, key: str, tail: str) -> str:
    """Insert the rows under `key` of the statement's JSON parameter: arrays in column order."""
    values = ", ".join(f"(r->>{i})::{ty}" for i, (_, ty) in enumerate(columns))
    names = ", ".join(c for c, _ in columns)
    return (
        f"INSERT INTO {table} ({names}) SELECT {values} "
        f"FROM jsonb_array_elements($1::jsonb -> '{key}') AS r{tail}"
    )


# The account-period nets of the transfers the statement inserted (RETURNING: only rows that
# were new, so a batch retried after a lost answer cannot count twice). GROUP BY: each
# (account, period) once, as ON CONFLICT DO UPDATE requires within one statement.
PERIODS_FROM_TRANSFERS = f"""
INSERT INTO ledger_account_periods (account_id, period_start_ms, net_nano)
SELECT a, p, SUM(n) FROM (
  SELECT credit_account_id AS a, ts_ms - ts_ms % {PERIOD_MS} AS p, amount_nano::numeric AS n
  FROM new_transfers
  UNION ALL
  SELECT debit_account_id, ts_ms - ts_ms % {PERIOD_MS}, -amount_nano::numeric FROM new_transfers
) m GROUP BY a, p
ON CONFLICT (account_id, period_start_ms)
DO UPDATE SET net_nano = ledger_account_periods.net_nano + EXCLUDED.net_nano"""


def batch_statement(attached: Sequence[tuple[str, Columns]]) -> str:
    """One statement writing every ledger table and the attached tables from one JSON object:
    {table name: [row, ...], "a0": [row, ...], ...}, rows as arrays in column order.

    An absent or empty list inserts nothing, so the statement is the same for every batch of a
    shape. Each table appears once and a batch holds each key once (the engine's journal is
    keyed by id), so no ON CONFLICT DO UPDATE meets the same row twice. The account-period
    nets are the statement's last step, fed by the transfers' insert.
    """
    ctes = []
    for i, (t, name) in enumerate(BATCH_TABLES):
        sql = _json_insert(t.name, t.columns, name, upsert_tail(t, "EXCLUDED"))
        if t is TRANSFERS:
            # No conflict target: the key is (id, ts_ms) on a partitioned table and (id) on
            # an older one; a retried transfer repeats both, so it is ignored either way,
            # and only new rows reach RETURNING (the period nets).
            sql = _json_insert(t.name, t.columns, name, " ON CONFLICT DO NOTHING")
            ctes.append(
                f"new_transfers AS ({sql} RETURNING ts_ms, debit_account_id, "
                "credit_account_id, amount_nano)"
            )
        else:
            ctes.append(f"w{i} AS ({sql})")
    ctes += [
        f"a{i} AS ({_json_insert(table, columns, f'a{i}', ' ON CONFLICT DO NOTHING')})"
        for i, (table, columns) in enumerate(attached)
    ]
    return "WITH " + ",\n".join(ctes) + "\n" + PERIODS_FROM_TRANSFERS


def batch_document(batch: Batch, attached: Sequence[Attachment]) -> str:
    """The batch statement's parameter."""
    doc: dict[str, list[tuple[Any, ...]]] = {
        name: rows for _, name in BATCH_TABLES if (rows := getattr(batch, name))
    }
    for i, (_, _, rows) in enumerate(attached):
        doc[f"a{i}"] = rows
    return _encode_json(doc).decode()


_encode_json = msgspec.json.encode

# Errors raised while encoding a batch, before the server is asked, are refusals too.
ENCODING_ERRORS = (msgspec.EncodeError, OverflowError, TypeError, ValueError)


async def _numeric_as_int(conn: asyncpg.Connection) -> None:
    """NUMERIC (wide balances, SUMs of BIGINT) read as int, not Decimal: every NUMERIC the
    ledger reads is a whole number."""
    await conn.set_type_codec(
        "numeric", schema="pg_catalog", encoder=str, decoder=int, format="text"
    )


def _sql(text: str) -> str:
    return text.replace("XSUM(", "SUM(")


async def _fetch(
    conn: asyncpg.Connection | PoolConnectionProxy, text: str, params: dict[str, Any]
) -> list[tuple[Any, ...]]:
    q, args = numbered(_sql(text), params)
    return [tuple(r) for r in await conn.fetch(q, *args)]


async def _read_audit(conn: asyncpg.Connection) -> AuditData:
    """The audit, on the event loop: the per-account and per-bucket rows through a cursor
    of the snapshot's transaction, AUDIT_CHUNK_ROWS at a time, each chunk turned into
    columns of ints between two awaits (a `fetch` of every row would make them all, and a
    tuple of each, in one turn)."""
    reader = AuditReader({k: await _fetch(conn, q, {}) for k, q in AUDIT_QUERIES.items()})
    for name, q in AUDIT_ROWS.items():
        cursor = await conn.cursor(_sql(q))
        while chunk := await cursor.fetch(reader.chunk_rows):
            reader.take(name, chunk)
    return reader.data


class PostgresSnapshot:
    """A REPEATABLE READ, read-only transaction on a pool connection: every query in it sees
    the database as of its first statement."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._conn: Any = None
        self._tx: Any = None

    async def begin(self) -> None:
        self._conn = await self._pool.acquire()
        self._tx = self._conn.transaction(isolation="repeatable_read", readonly=True)
        await self._tx.start()
        # Before the snapshot: retention drops a month partition (DETACH, DROP) only while
        # no audit holds this, so the snapshot never sees the sums of a month whose rows it
        # also sees, nor a month gone without its sums.
        await self._conn.execute("LOCK TABLE ledger_transfers IN ACCESS SHARE MODE")
        await self._conn.fetchval("SELECT 1")  # the snapshot is taken here

    async def audit(self) -> AuditData:
        return await _read_audit(self._conn)

    async def settled_scopes(self, since_ms: int, until_ms: int) -> list[tuple[str, int, int]]:
        return await _fetch(self._conn, SETTLED_SCOPES, {"since": since_ms, "until": until_ms})

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self._tx is not None:
                await self._tx.rollback()
        finally:
            await self._pool.release(conn)


class PostgresStore:
    dialect = "postgres"
    # A commit here is one statement whose wait costs the event loop nothing, while a linger
    # leaves requests idle in front of it: measured, lingering 2 ms cost 10 % of throughput
    # (the gateway's core sat idle at c64 while every request waited on the next commit).
    linger_s = 0.0

    def __init__(self, url: str) -> None:
        self.url, self.schema = split_schema(url)
        self._full_url = url
        self._writer: asyncpg.Connection | None = None
        self._pool: asyncpg.Pool | None = None
        # The batch statement for each shape of attachments (in practice one or two).
        self._write_sql: dict[tuple[tuple[str, Columns], ...], str] = {}

    # ------------------------------------------------------------------ lifecycle

    async def open(self, now_ms: int) -> None:
        settings = server_settings(self.schema)
        w = await asyncpg.connect(
            self.url,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=COMMAND_TIMEOUT_S,
            server_settings=settings,
        )
        try:
            if self.schema:
                await w.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            lock_id = int.from_bytes(
                hashlib.blake2b(
                    f"tokenworks-ledger:{self.schema}".encode(), digest_size=8
                ).digest(),
                "big",
                signed=True,
            )
            if not await w.fetchval("SELECT pg_try_advisory_lock($1)", lock_id):
                raise LedgerError("another process is the writer of this ledger")
            async with w.transaction():
                # Concurrent first opens of one database would race on CREATE TABLE.
                await w.execute("SELECT pg_advisory_xact_lock(7412)")
                for stmt in ddl("postgres"):
                    await w.execute(stmt)
                await upgrade_postgres(w, now_ms)
            # A partitioned transfers table gets this and next month's partitions (the
            # retention job makes them ahead on every run after).
            await asyncio.to_thread(ensure_partitions, self._full_url, now_ms)
            self._pool = await asyncpg.create_pool(
                self.url,
                init=_numeric_as_int,
                min_size=1,
                max_size=4,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
                server_settings=settings,
            )
        except BaseException:
            await w.close()
            raise
        self._writer = w

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._writer is not None:
            await self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ writes

    async def write(self, batch: Batch, attached: Sequence[Attachment] = ()) -> None:
        w = self._writer
        assert w is not None, "store is not open"
        shape = tuple((table, columns) for table, columns, _ in attached)
        sql = self._write_sql.get(shape)
        if sql is None:
            sql = self._write_sql[shape] = batch_statement(shape)
        await w.execute(sql, batch_document(batch, attached))

    # ------------------------------------------------------------------ reads

    def refuses(self, exc: BaseException) -> bool:
        if isinstance(exc, ENCODING_ERRORS):
            return True
        state = getattr(exc, "sqlstate", None)
        return isinstance(exc, asyncpg.PostgresError) and str(state)[:2] in REFUSED_SQLSTATE_CLASSES

    async def _all(self, text: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        assert self._pool is not None, "store is not open"
        async with self._pool.acquire() as c:
            return await _fetch(c, text, params or {})

    async def load(self) -> Snapshot | None:
        rows = {name: await self._all(sql) for name, sql in LOAD_QUERIES.items()}
        if not rows["accounts"]:
            return None
        return Snapshot(
            accounts=rows["accounts"],
            buckets=rows["buckets"],
            grants=rows["grants"],
            budgets=rows["budgets"],
            meta={k: v for k, v in rows["meta"]},
        )

    async def get_hold(self, hold_id: str) -> tuple[Any, ...] | None:
        rows = await self._all(GET_HOLD, {"id": hold_id})
        return rows[0] if rows else None

    async def recent_closed_holds(self, limit: int) -> list[tuple[Any, ...]]:
        return await self._all(RECENT_CLOSED_HOLDS, {"limit": limit})

    async def get_idempotency(self, key: str) -> tuple[str, str, str] | None:
        rows = await self._all(GET_IDEMPOTENCY, {"key": key})
        return rows[0] if rows else None

    async def snapshot(self) -> PostgresSnapshot:
        assert self._pool is not None, "store is not open"
        snap = PostgresSnapshot(self._pool)
        try:
            await snap.begin()
        except BaseException:
            await snap.close()
            raise
        return snap

    async def statement_data(
        self, account_id: int, since_ms: int, until_ms: int, timeout_s: float | None
    ) -> StatementData:
        """On a pool connection (never the writer's), in one REPEATABLE READ read-only
        transaction: its three reads see one snapshot."""
        assert self._pool is not None, "store is not open"
        async with self._pool.acquire() as c:
            try:
                async with c.transaction(isolation="repeatable_read", readonly=True):
                    if timeout_s is not None:
                        await c.execute(f"SET LOCAL statement_timeout = {pg_timeout_ms(timeout_s)}")
                    horizon = await c.fetchval(GET_HORIZON)
                    if horizon is not None and since_ms < horizon:
                        raise BeforeHorizon(horizon)
                    opening = await _fetch(c, NET_BEFORE, net_before_params(account_id, since_ms))
                    closing = await _fetch(c, NET_BEFORE, net_before_params(account_id, until_ms))
                    params = {"acc": account_id, "since": since_ms, "until": until_ms}
                    moves = await _fetch(c, MOVEMENTS, params)
            except asyncpg.QueryCanceledError as exc:
                assert timeout_s is not None
                raise ReadTimeout(timeout_s) from exc
        return net_of(opening[0]), net_of(closing[0]), moves
