"""One way to declare a table, rendered as DDL for SQLite and PostgreSQL.

A column's type is written as PostgreSQL names it (a batch sent as JSON is cast to it as
written). The ledger's lower-case types are spelled per dialect, so a single integer key
is SQLite's rowid (one B-tree, not two); types in capitals (the usage and key tables) are
declared as written in both dialects, which both accept.
"""

from __future__ import annotations

from dataclasses import dataclass

# A running total that may pass int64 (an account's balance, a bucket's remaining credit):
# PostgreSQL's NUMERIC, and in SQLite an INTEGER column that holds a value past int64 as a
# BLOB of its decimal digits (`ledger.store_sqlite.wide`).
WIDE = "numeric(39,0)"
INT64, TEXT = "bigint", "text"

_SPELLING: dict[str, dict[str, str]] = {
    "sqlite": {INT64: "INTEGER", WIDE: "INTEGER", TEXT: "TEXT"},
    "postgres": {INT64: "BIGINT", WIDE: "NUMERIC(39,0)", TEXT: "TEXT"},
}

# (name, type) in row order: what rides in a batch, and what a JSON row is cast to.
Columns = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    key: tuple[str, ...]
    columns: Columns
    upsert: bool = True  # False: insert-only, a conflict is ignored (immutable rows)
    # Column constraints, as (column, SQL), e.g. ("ts_ms", "NOT NULL").
    constraints: tuple[tuple[str, str], ...] = ()
    indexes: tuple[str, ...] = ()  # CREATE INDEX statements, valid in both dialects
    # SQLite: a table keyed by text is a B-tree of rowids plus an index of keys; WITHOUT
    # ROWID makes it one B-tree, one insert fewer per row.
    without_rowid: bool = False

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)

    def ddl(self, dialect: str) -> list[str]:
        """CREATE TABLE (if missing) and its indexes, for `sqlite` or `postgres`."""
        spelling = _SPELLING[dialect]
        extra = dict(self.constraints)
        assert set(extra) <= set(self.column_names), (self.name, extra)
        cols = ", ".join(
            f"{c} {spelling.get(ty, ty)}" + (f" {extra[c]}" if c in extra else "")
            for c, ty in self.columns
        )
        clustered = dialect == "sqlite" and self.without_rowid
        return [
            f"CREATE TABLE IF NOT EXISTS {self.name} ({cols}, PRIMARY KEY ({', '.join(self.key)}))"
            + (" WITHOUT ROWID" if clustered else ""),
            *self.indexes,
        ]
