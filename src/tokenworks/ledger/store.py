"""The store interface both backends implement, and the SQL they share.

A store is dumb on purpose: it writes the engine's batches atomically (one transaction per
batch, upserts of final values plus inserts of immutable transfers), loads the open state
back, and answers the audit and statement queries. All judgement lives in the engine.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokenworks.db import backend
from tokenworks.db.table import Columns, Table
from tokenworks.ledger.rows import Batch, Snapshot
from tokenworks.ledger.schema import (
    ACCOUNTS,
    BUCKETS,
    BUDGETS,
    GRANTS,
    HOLDS,
    HORIZON_KEY,
    IDEMPOTENCY,
    META,
    PERIOD_MS,
    TRANSFERS,
)


@dataclass(slots=True)
class AuditData:
    """What `check()` compares the engine against, straight from the store.

    Transfers retention deleted (`expiry.py`) count through what it kept in their place:
    each period row's `dropped_nano`, each bucket's base, the per-week, per-kind sums."""

    # settled holds whose spend transfers do not add up to their price: (id, price, posted)
    mischarged: list[tuple[str, int, int]]
    bad_transfers: int  # non-positive amounts or self-transfers other than rollovers
    # (sum of COST transfers, dropped ones included; sum of settled holds' cost_nano)
    costs: tuple[int, int]
    open_holds: list[str]  # none, ever: holds are written when they close
    # (account_id, week start, period net, dropped + stored transfers' net): weeks whose
    # period row disagrees with its transfers
    weeks: list[tuple[int, int, int, int]] = field(default_factory=list)
    # (week start, sum of every account's period net): weeks not summing to 0
    unbalanced_weeks: list[tuple[int, int]] = field(default_factory=list)
    horizon_ms: int = 0  # every transfer from here on is kept (0: none deleted)
    dropped_after_horizon: int = 0  # sums of deleted transfers at or after it: none, ever
    # A column of ints per figure, not a tuple per row (`AuditReader`). Per account: its id,
    # stored balance, the net of its transfers with the dropped ones, the sum of its period
    # nets.
    account_ids: list[int] = field(default_factory=list)
    account_balances: list[int] = field(default_factory=list)
    account_nets: list[int] = field(default_factory=list)
    account_periods: list[int] = field(default_factory=list)
    # Per bucket: its id, stored remaining, closed (0/1), the net of its transfers with its base.
    bucket_ids: list[int] = field(default_factory=list)
    bucket_remaining: list[int] = field(default_factory=list)
    bucket_closed: list[int] = field(default_factory=list)
    bucket_nets: list[int] = field(default_factory=list)


Movement = tuple[str, int, str | None, int, str | None]
StatementData = tuple[int, int, list[Movement]]

# Rows of other tables committed in the ledger's transaction (the usage rows of the requests
# a batch settles): (table, columns, rows). Inserted with ON CONFLICT DO NOTHING.
Attachment = tuple[str, Columns, list[tuple[Any, ...]]]


class StoreSnapshot(Protocol):
    async def audit(self) -> AuditData: ...

    async def settled_scopes(self, since_ms: int, until_ms: int) -> list[tuple[str, int, int]]:
        """(scopes JSON, price, closed_ms) of holds settled in [since, until)."""

    async def close(self) -> None: ...


class Store(Protocol):
    dialect: str
    # How long the group-commit writer may wait for more settlements before a commit, while
    # requests are in flight: worth it where a commit has a fixed cost on the gateway's core.
    linger_s: float

    async def open(self, now_ms: int) -> None:
        """Connect, create the tables if missing, and upgrade what an earlier version left
        (`upgrade.py`) at `now_ms`."""

    async def close(self) -> None: ...

    async def write(self, batch: Batch, attached: Sequence[Attachment] = ()) -> None:
        """Persist a batch, and rows attached to it, in one transaction; durable on return."""

    async def load(self) -> Snapshot | None:
        """The open state, or None for an empty store."""

    async def get_hold(self, hold_id: str) -> tuple[Any, ...] | None: ...

    async def get_idempotency(self, key: str) -> tuple[str, str, str] | None:
        """(op, body_hash, result) of a key the engine no longer caches."""

    async def snapshot(self) -> StoreSnapshot:
        """A read-only view of the store as it is now, unchanged by later commits: the writer
        opens one right after a commit, so `check()` compares the engine at that commit with
        the store at that commit while traffic goes on."""

    def refuses(self, exc: BaseException) -> bool:
        """Whether `exc`, raised by `write`, is the store refusing a value of the batch (a
        number out of a column's range, a text it cannot hold, a constraint): retrying the
        same rows fails the same way. Anything else (a lost connection, a full disk, a lock
        timeout) is the store being unavailable, which a retry may clear."""

    async def recent_closed_holds(self, limit: int) -> list[tuple[Any, ...]]:
        """The latest closed holds, so a restarted engine still answers their retries."""

    async def statement_data(
        self, account_id: int, since_ms: int, until_ms: int, timeout_s: float | None
    ) -> StatementData:
        """(opening, closing, movements) of the account over [since, until), read from one
        snapshot on a read connection (never the writer's), stopped past `timeout_s` with
        `db.reads.ReadTimeout`. Movements: (kind, incoming 0/1, model, amount, hold_id)."""


BATCH_TABLES: tuple[tuple[Table, str], ...] = (
    (ACCOUNTS, "accounts"),
    (BUCKETS, "buckets"),
    (GRANTS, "grants"),
    (BUDGETS, "budgets"),
    (HOLDS, "holds"),
    (TRANSFERS, "transfers"),
    (IDEMPOTENCY, "idempotency"),
    (META, "meta"),
)

LOAD_QUERIES = {
    "accounts": f"SELECT {', '.join(ACCOUNTS.column_names)} FROM ledger_accounts ORDER BY id",
    "buckets": f"SELECT {', '.join(BUCKETS.column_names)} FROM ledger_buckets WHERE closed = 0",
    "grants": f"SELECT {', '.join(GRANTS.column_names)} FROM ledger_grants WHERE active = 1",
    # A revoked (or expired, then revoked by the sweep) key's budget is not loaded: a fleet
    # mints millions of sub-agent keys, and a dead key never authenticates, so its budget
    # never limits a hold again. A revoked account's is: it still refuses that account's holds.
    "budgets": f"SELECT {', '.join(BUDGETS.column_names)} FROM ledger_budgets "
    "WHERE revoked = 0 OR scope NOT LIKE 'key:%'",
    "meta": "SELECT k, v FROM ledger_meta",
}
GET_HOLD = f"SELECT {', '.join(HOLDS.column_names)} FROM ledger_holds WHERE id = :id"
RECENT_CLOSED_HOLDS = (
    f"SELECT {', '.join(HOLDS.column_names)} FROM ledger_holds WHERE closed_ms IS NOT NULL "
    "ORDER BY closed_ms DESC LIMIT :limit"
)
GET_IDEMPOTENCY = "SELECT op, body_hash, result FROM ledger_idempotency WHERE key = :key"

# Sums that may pass int64 (an account's transfers over its life) use XSUM: PostgreSQL's SUM
# (exact NUMERIC over BIGINT), SQLite's `xsum` (an exact aggregate the store registers:
# SQLite's own SUM raises on int64 overflow). Differences of two such sums are taken in
# Python, where they are exact.
#
# An account's balance is checked against its period nets, and each period row against its
# week's transfers (AUDIT_WEEKS): together, the balance against every transfer it ever had,
# those retention deleted counted through `dropped_nano`.
AUDIT_ACCOUNTS = """
SELECT a.id, a.balance_nano, p.s
FROM ledger_accounts a
LEFT JOIN (SELECT account_id AS id, XSUM(net_nano) AS s
           FROM ledger_account_periods GROUP BY account_id) p ON p.id = a.id
"""
# Per (account, week): net_nano = dropped_nano + credits - debits of the week's stored
# transfers, written without a minus (SQLite keeps a WIDE value past int64 as BLOB digits,
# which it cannot negate): net + debits = dropped + credits. Only the weeks that disagree.
AUDIT_WEEKS = f"""
SELECT a, w, XSUM(p), XSUM(q), XSUM(n) FROM (
  SELECT account_id AS a, period_start_ms AS w, net_nano AS p, dropped_nano AS q,
         net_nano AS n
  FROM ledger_account_periods
  UNION ALL
  SELECT debit_account_id, ts_ms - ts_ms % {PERIOD_MS}, amount_nano, NULL, NULL
  FROM ledger_transfers
  UNION ALL
  SELECT credit_account_id, ts_ms - ts_ms % {PERIOD_MS}, NULL, amount_nano, NULL
  FROM ledger_transfers
) m GROUP BY a, w HAVING COALESCE(XSUM(p), 0) <> COALESCE(XSUM(q), 0)
"""
# Double entry week by week: it holds for the weeks whose transfers are gone too.
AUDIT_UNBALANCED_WEEKS = """
SELECT period_start_ms, XSUM(net_nano) FROM ledger_account_periods
GROUP BY period_start_ms HAVING XSUM(net_nano) <> 0
"""
AUDIT_BUCKETS = """
SELECT b.id, b.remaining_nano, b.closed, c.s, d.s, x.net_nano
FROM ledger_buckets b
LEFT JOIN (SELECT credit_bucket_id AS id, XSUM(amount_nano) AS s
           FROM ledger_transfers WHERE credit_bucket_id IS NOT NULL
           GROUP BY credit_bucket_id) c ON c.id = b.id
LEFT JOIN (SELECT debit_bucket_id AS id, XSUM(amount_nano) AS s
           FROM ledger_transfers WHERE debit_bucket_id IS NOT NULL
           GROUP BY debit_bucket_id) d ON d.id = b.id
LEFT JOIN ledger_bucket_bases x ON x.bucket_id = b.id
"""
# A hold's spend is at most its amount (<= 2**62): SUM cannot overflow. Holds compacted
# away (`compaction.py`) are checked in aggregate (AUDIT_ORPHAN_SPEND): the spend transfers
# whose hold row is gone, stored or deleted by retention, add up to the compacted settled
# holds' prices. (Retention never deletes the transfers of a hold that still has its row.)
AUDIT_MISCHARGED = """
SELECT h.id, h.price_nano, COALESCE(t.s, 0)
FROM ledger_holds h
LEFT JOIN (SELECT hold_id, CAST(SUM(amount_nano) AS BIGINT) AS s FROM ledger_transfers
           WHERE kind = 'spend' GROUP BY hold_id) t ON t.hold_id = h.id
WHERE (h.status = 'settled' AND h.price_nano <> COALESCE(t.s, 0))
   OR (h.status <> 'settled' AND COALESCE(t.s, 0) <> 0)
"""
AUDIT_ORPHAN_SPEND = """
SELECT (SELECT XSUM(price_nano) FROM ledger_holds_compacted WHERE status = 'settled'),
       (SELECT XSUM(amount_nano) FROM ledger_transfers t WHERE kind = 'spend'
        AND NOT EXISTS (SELECT 1 FROM ledger_holds h WHERE h.id = t.hold_id)),
       (SELECT XSUM(amount_nano) FROM ledger_transfers_dropped WHERE kind = 'spend')
"""
AUDIT_BAD_TRANSFERS = """
SELECT COUNT(*) FROM ledger_transfers
WHERE amount_nano <= 0 OR (debit_account_id = credit_account_id AND kind <> 'rollover')
"""
AUDIT_COSTS = """
SELECT (SELECT XSUM(amount_nano) FROM ledger_transfers WHERE kind = 'cost'),
       (SELECT XSUM(cost_nano) FROM (
          SELECT cost_nano FROM ledger_holds WHERE status = 'settled'
          UNION ALL
          SELECT cost_nano FROM ledger_holds_compacted WHERE status = 'settled') s),
       (SELECT XSUM(amount_nano) FROM ledger_transfers_dropped WHERE kind = 'cost')
"""
AUDIT_OPEN_HOLDS = "SELECT id FROM ledger_holds WHERE status = 'open'"
GET_HORIZON = f"SELECT v FROM ledger_meta WHERE k = '{HORIZON_KEY}'"
# Nothing at or after the horizon was deleted: no dropped sum there.
AUDIT_HORIZON = f"""
SELECT h.v,
  (SELECT COUNT(*) FROM ledger_transfers_dropped WHERE period_start_ms >= h.v)
  + (SELECT COUNT(*) FROM ledger_account_periods WHERE period_start_ms >= h.v
     AND dropped_nano <> 0)
FROM (SELECT COALESCE(MAX(v), 0) AS v FROM ledger_meta WHERE k = '{HORIZON_KEY}') h
"""
SETTLED_SCOPES = """
SELECT scopes, price_nano, closed_ms FROM ledger_holds
WHERE status = 'settled' AND closed_ms >= :since AND closed_ms < :until
UNION ALL
SELECT scopes, price_nano, closed_ms FROM ledger_holds_compacted
WHERE status = 'settled' AND closed_ms >= :since AND closed_ms < :until
"""
MOVEMENTS = """
SELECT kind, 0, model, amount_nano, hold_id FROM ledger_transfers
WHERE debit_account_id = :acc AND ts_ms >= :since AND ts_ms < :until AND kind <> 'rollover'
UNION ALL
SELECT kind, 1, model, amount_nano, hold_id FROM ledger_transfers
WHERE credit_account_id = :acc AND ts_ms >= :since AND ts_ms < :until AND kind <> 'rollover'
"""
# An account's balance before `until`: the net of every whole period before the one `until`
# falls in (a row per period: ledger_account_periods), plus its transfers from that period's
# start. O(periods + one period's transfers), not O(history).
NET_BEFORE = """
SELECT (SELECT XSUM(net_nano) FROM ledger_account_periods
        WHERE account_id = :acc AND period_start_ms < :period),
       (SELECT XSUM(amount_nano) FROM ledger_transfers
        WHERE credit_account_id = :acc AND ts_ms >= :period AND ts_ms < :until),
       (SELECT XSUM(amount_nano) FROM ledger_transfers
        WHERE debit_account_id = :acc AND ts_ms >= :period AND ts_ms < :until)
"""


def net_before_params(account_id: int, until_ms: int) -> dict[str, int]:
    return {"acc": account_id, "period": until_ms - until_ms % PERIOD_MS, "until": until_ms}


def net_of(row: Sequence[Any]) -> int:
    """NET_BEFORE's row as the balance."""
    return exact(row[0]) + exact(row[1]) - exact(row[2])


# Upgrade of a ledger written before ledger_account_periods: each account's net per period.
PERIOD_NETS = f"""
SELECT a, p, XSUM(n) FROM (
  SELECT credit_account_id AS a, ts_ms - ts_ms % {PERIOD_MS} AS p, amount_nano AS n
  FROM ledger_transfers
  UNION ALL
  SELECT debit_account_id, ts_ms - ts_ms % {PERIOD_MS}, -amount_nano FROM ledger_transfers
) m GROUP BY a, p
"""


def exact(value: Any) -> int:
    """A stored amount or an XSUM as an int: NULL (no rows) is 0, and SQLite gives a value
    past int64 as its decimal digits (bytes or text)."""
    return 0 if value is None else value if type(value) is int else int(value)


# Rows an audit read holds at once. The per-account and per-bucket queries (AUDIT_ROWS) are
# read this many rows at a time into columns of ints: a fetch of every row is one call that
# holds the GIL (and so the event loop) while it builds a tuple per row, and 300,000 live
# tuples wake the collector, whose passes hold it too; ints are not tracked, and a chunk's
# tuples are freed before the next.
AUDIT_CHUNK_ROWS = 1_000


class AuditReader:
    """AuditData from the audit queries: the small ones whole (`AUDIT_QUERIES`: each is a
    row or the rows that disagree), then AUDIT_ROWS' rows a chunk at a time (`take`)."""

    chunk_rows = AUDIT_CHUNK_ROWS  # rows a store fetches per `take`

    def __init__(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        self.data = audit_data(rows)
        # The collector walks every element of a young list (a cache miss per element, the
        # GIL held): passed to the oldest generation while empty, the columns are not
        # walked again as they grow (a full pass aside). A pass over the few young objects.
        gc.collect(1)
        # Per account: its period nets less what its transfers add up to, over the weeks
        # that disagree (AUDIT_WEEKS); its net is its period nets less that.
        self._off: dict[int, int] = {}
        for a, _, net, counted in self.data.weeks:
            self._off[a] = self._off.get(a, 0) + net - counted

    def take(self, name: str, chunk: Sequence[Any]) -> None:
        """Add at most `chunk_rows` rows of AUDIT_ROWS[name] to the columns."""
        d, off = self.data, self._off
        if name == "accounts":
            for i, bal, p in chunk:
                periods = exact(p)
                d.account_ids.append(i)
                d.account_balances.append(exact(bal))
                d.account_nets.append(periods - off.get(i, 0))
                d.account_periods.append(periods)
            return
        for i, rem, closed, c, dr, base in chunk:
            d.bucket_ids.append(i)
            d.bucket_remaining.append(exact(rem))
            d.bucket_closed.append(int(closed))
            d.bucket_nets.append(exact(c) - exact(dr) + exact(base))


def audit_data(rows: dict[str, list[tuple[Any, ...]]]) -> AuditData:
    """AuditData from the rows of AUDIT_QUERIES (by name), the nets taken exactly; its
    columns empty (`AuditReader` fills them)."""
    # (account, week, period net, what its transfers add up to, dropped ones included):
    # p - q is the period net less that.
    weeks = [(a, w, exact(n), exact(n) - exact(p) + exact(q)) for a, w, p, q, n in rows["weeks"]]
    compacted, orphaned, dropped_spend = (exact(v) for v in rows["orphan_spend"][0])
    mischarged = list(rows["mischarged"])
    if compacted != orphaned + dropped_spend:
        mischarged.append(("(compacted holds)", compacted, orphaned + dropped_spend))
    posted, settled, dropped_cost = rows["costs"][0]
    horizon, after = rows["horizon"][0]
    return AuditData(
        mischarged=mischarged,
        bad_transfers=int(rows["bad_transfers"][0][0]),
        costs=(exact(posted) + exact(dropped_cost), exact(settled)),
        open_holds=[r[0] for r in rows["open_holds"]],
        weeks=weeks,
        unbalanced_weeks=[(w, exact(t)) for w, t in rows["unbalanced_weeks"]],
        horizon_ms=exact(horizon),
        dropped_after_horizon=int(after),
    )


AUDIT_QUERIES = {
    "weeks": AUDIT_WEEKS,
    "unbalanced_weeks": AUDIT_UNBALANCED_WEEKS,
    "mischarged": AUDIT_MISCHARGED,
    "orphan_spend": AUDIT_ORPHAN_SPEND,
    "bad_transfers": AUDIT_BAD_TRANSFERS,
    "costs": AUDIT_COSTS,
    "open_holds": AUDIT_OPEN_HOLDS,
    "horizon": AUDIT_HORIZON,
}
# A row per account and per bucket: read AUDIT_CHUNK_ROWS at a time (`AuditReader.take`).
AUDIT_ROWS = {"accounts": AUDIT_ACCOUNTS, "buckets": AUDIT_BUCKETS}


def upsert_tail(table: Table, excluded: str) -> str:
    """The ON CONFLICT clause: update mutable rows, ignore repeats of immutable ones."""
    key = ", ".join(table.key)
    if not table.upsert:
        return f" ON CONFLICT ({key}) DO NOTHING"
    sets = ", ".join(f"{c} = {excluded}.{c}" for c in table.column_names if c not in table.key)
    return f" ON CONFLICT ({key}) DO UPDATE SET {sets}"


def numbered(sql: str, params: dict[str, Any]) -> tuple[str, list[Any]]:
    """Rewrite `:name` placeholders as PostgreSQL's `$n`, reusing numbers for repeats."""
    order: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    out = re.sub(r"(?<!:):([a-z_]+)", sub, sql)
    return out, [params[n] for n in order]


def open_store(url: str) -> Store:
    """`sqlite:///relative.db`, `sqlite:////abs.db`, `sqlite://:memory:` or `postgresql://...`
    (a `?schema=name` query parameter puts the tables in that schema)."""
    if backend(url) == "sqlite":
        from tokenworks.ledger.store_sqlite import SqliteStore

        return SqliteStore(url)
    from tokenworks.ledger.store_postgres import PostgresStore

    return PostgresStore(url)
