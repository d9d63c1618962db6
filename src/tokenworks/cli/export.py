"""`tokenworks export --month YYYY-MM --out DIR`: a closed month to Parquet, for a warehouse.

One file per table per month (`DIR/<table>-YYYY-MM.parquet`), written in batches of
`--batch-rows` rows read from a streaming cursor (SQLite's, or a PostgreSQL server-side
cursor), so memory stays flat whatever the month holds: each batch is one Parquet row group.
Reads the database directly (read-only), like `tokenworks reprice`; the schema of every file
is in docs/retention.md. Only closed months: a month still running would export half of it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenworks.db import backend, sqlite_path
from tokenworks.db.table import Columns
from tokenworks.ledger.schema import HOLDS, HOLDS_COMPACTED, TRANSFERS
from tokenworks.metering.rollup import DAILY_COLUMNS
from tokenworks.metering.store import USAGE_SCHEMA

BATCH_ROWS = 10_000


@dataclass(frozen=True, slots=True)
class Export:
    """A table's rows of one month: which rows (by a time column), in which order."""

    table: str
    columns: Columns
    time_column: str
    order: str


_DAILY: Columns = tuple(
    (c, "TEXT" if c in ("day", "key_id", "account_id", "public_model", "producer",
                        "upstream_model") else "BIGINT")
    for c in DAILY_COLUMNS
)  # fmt: skip

EXPORTS = (
    Export("usage", USAGE_SCHEMA, "ts_ms", "ts_ms, request_id"),
    Export("usage_daily", _DAILY, "day", "day"),
    Export("ledger_transfers", TRANSFERS.columns, "ts_ms", "id"),
    Export("ledger_holds", HOLDS.columns, "closed_ms", "closed_ms, id"),
    Export("ledger_holds_compacted", HOLDS_COMPACTED.columns, "closed_ms", "closed_ms"),
)


class ExportError(Exception):
    """A request the export cannot serve; the message says why."""


def month_range_ms(month: str, now_ms: int) -> tuple[int, int]:
    """[start, end) of a closed UTC month named YYYY-MM."""
    try:
        start = dt.datetime.strptime(month, "%Y-%m").replace(tzinfo=dt.UTC)
    except ValueError:
        raise ExportError(f"--month must be YYYY-MM, not {month!r}") from None
    end = dt.datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=dt.UTC)
    start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    if end_ms > now_ms:
        raise ExportError(f"{month} is not over yet: only closed months are exported")
    return start_ms, end_ms


def _arrow_type(sql_type: str) -> Any:
    import pyarrow as pa  # type: ignore[import-untyped]  # no type information shipped

    t = sql_type.lower()
    if t == "double precision":
        return pa.float64()
    if t in ("bigint", "integer"):
        return pa.int64()
    if t == "text":
        return pa.string()
    raise AssertionError(f"no Parquet type for {sql_type}")


def arrow_schema(columns: Columns) -> Any:
    import pyarrow as pa

    return pa.schema([(name, _arrow_type(ty)) for name, ty in columns])


def _bounds(export: Export, start_ms: int, end_ms: int) -> tuple[Any, ...]:
    if export.time_column == "day":  # usage_daily: days as text, YYYY-MM-DD
        return tuple(
            dt.datetime.fromtimestamp(ms // 1000, dt.UTC).strftime("%Y-%m-%d")
            for ms in (start_ms, end_ms)
        )
    return start_ms, end_ms


class Source:
    """Read-only, streaming access to one database's tables."""

    def __init__(self, url: str) -> None:
        self.sqlite = backend(url) == "sqlite"
        if self.sqlite:
            import sqlite3

            path = sqlite_path(url)
            if path == ":memory:" or not Path(path).exists():
                raise ExportError(f"no database at {path}")
            self.conn: Any = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        else:
            from tokenworks.db.postgres import connect

            self.conn = connect(url, autocommit=False)

    def close(self) -> None:
        self.conn.close()

    def has(self, table: str) -> bool:
        if self.sqlite:
            sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        else:
            sql = "SELECT 1 WHERE to_regclass(%s) IS NOT NULL"
        found = self.conn.execute(sql, (table,)).fetchone() is not None
        if not self.sqlite:
            self.conn.rollback()
        return found

    def batches(self, sql: str, params: tuple[Any, ...], batch_rows: int) -> Iterator[list[Any]]:
        if self.sqlite:
            cur = self.conn.execute(sql.replace("%s", "?"), params)
            while rows := cur.fetchmany(batch_rows):
                yield rows
            return
        from psycopg.rows import tuple_row

        # A server-side cursor: the server holds the result, the client a batch at a time.
        with self.conn.transaction(), self.conn.cursor("export", row_factory=tuple_row) as cur:
            cur.execute(sql, params)
            while rows := cur.fetchmany(batch_rows):
                yield rows


def export_month(
    url: str, month: str, out: Path, *, batch_rows: int = BATCH_ROWS, now_ms: int | None = None
) -> dict[str, int]:
    """Write every table's rows of a closed month as Parquet; returns rows per file."""
    import pyarrow as pa
    import pyarrow.parquet as pq  # type: ignore[import-untyped]  # as above

    start_ms, end_ms = month_range_ms(month, now_ms or int(time.time() * 1000))
    out.mkdir(parents=True, exist_ok=True)
    source = Source(url)
    written: dict[str, int] = {}
    try:
        for export in EXPORTS:
            if not source.has(export.table):
                continue
            schema = arrow_schema(export.columns)
            names = ", ".join(c for c, _ in export.columns)
            sql = (
                f"SELECT {names} FROM {export.table} WHERE {export.time_column} >= %s"
                f" AND {export.time_column} < %s ORDER BY {export.order}"
            )
            path = out / f"{export.table}-{month}.parquet"
            tmp = path.with_suffix(".parquet.partial")  # never a half file under the name
            rows_out = 0
            with pq.ParquetWriter(tmp, schema) as writer:
                for rows in source.batches(sql, _bounds(export, start_ms, end_ms), batch_rows):
                    columns = [
                        pa.array([_plain(v) for v in col], type=field.type)
                        for col, field in zip(zip(*rows, strict=True), schema, strict=True)
                    ]
                    writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
                    rows_out += len(rows)
            tmp.replace(path)
            written[path.name] = rows_out
    finally:
        source.close()
    return written


def _plain(value: Any) -> Any:
    # PostgreSQL's SUM and NUMERIC arrive as Decimal; every exported number is an integer or
    # a float column already typed by the schema.
    return int(value) if type(value).__name__ == "Decimal" else value


def run(args: argparse.Namespace) -> int:
    from tokenworks.config import CONFIG_ENV, ConfigError, load

    url = args.database
    if url is None:
        path = args.config or os.environ.get(CONFIG_ENV)
        if not path:
            print(f"tokenworks: pass --database URL, --config FILE or set {CONFIG_ENV}",
                  file=sys.stderr)  # fmt: skip
            return 2
        try:
            url = load(path).database
        except ConfigError as exc:
            print(f"tokenworks: {exc}", file=sys.stderr)
            return 2
    if not 1 <= args.batch_rows <= 1_000_000:
        print("tokenworks: --batch-rows must be within 1..1000000", file=sys.stderr)
        return 2
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        print("tokenworks: export needs pyarrow: pip install 'tokenworks[export]'", file=sys.stderr)
        return 2
    try:
        written = export_month(url, args.month, Path(args.out), batch_rows=args.batch_rows)
    except ExportError as exc:
        print(f"tokenworks: {exc}", file=sys.stderr)
        return 2
    for name, rows in written.items():
        print(f"{name}\t{rows} rows")
    return 0


def add_subcommand(sub: Any, handler: Any) -> None:
    export = sub.add_parser("export", help="write a closed month to Parquet files")
    export.add_argument("--month", required=True, help="YYYY-MM, a month that is over (UTC)")
    export.add_argument("--out", required=True, help="folder for <table>-YYYY-MM.parquet")
    export.add_argument("--config", default=None, help="config file (or $TOKENWORKS_CONFIG)")
    export.add_argument("--database", default=None, help="a database URL instead of --config")
    export.add_argument("--batch-rows", type=int, default=BATCH_ROWS, help="rows per row group")
    export.set_defaults(func=handler)


__all__ = ["EXPORTS", "ExportError", "add_subcommand", "export_month", "run"]
