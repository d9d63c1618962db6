"""`Ledger`: the async face of the engine and its store, what the gateway and admin call.

Holds are applied in memory and acknowledged at once, and never written while open: a hold
lost in a crash reserved nothing durable, and its request's answer never reached its end
(settlement is durable before the last byte). Settlements and admin writes return only when
their group commit is durable; the settled hold is written then, once. One `Ledger` serves
one event loop; the engine under it is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from tokenworks.db.reads import READ_TIMEOUT_S, ReadTimeout
from tokenworks.db.table import Columns
from tokenworks.ledger import auditor
from tokenworks.ledger.domain import (
    MAX_TIME_MS,
    Account,
    AccountKind,
    BalanceView,
    Bucket,
    Grant,
    Hold,
    InvalidRequest,
    LedgerBusy,
    LedgerError,
    NotFound,
    Period,
    Recurrence,
    Rollover,
    StoreUnavailable,
    check_text,
    scope_name,
)
from tokenworks.ledger.engine import (
    CLOSED_HOLDS_KEPT,
    Engine,
    TransferPolicy,
    default_transfer_policy,
)
from tokenworks.ledger.periods import to_ms
from tokenworks.ledger.rows import hold_from_row
from tokenworks.ledger.slices import SlicedCopy
from tokenworks.ledger.statement import build_statement, statement_csv
from tokenworks.ledger.store import Store, open_store
from tokenworks.ledger.writer import GroupCommitWriter

log = logging.getLogger("tokenworks.ledger")
T = TypeVar("T")

DEFAULT_HOLD_TTL_S = 600.0
MAX_PENDING_OPS = 50_000
BACKPRESSURE_WAIT_S = 5.0
# Bound on one sweep's turns (each at most `SWEEP_TURN_ITEMS` of each kind); what is left
# is taken up on the next sweep.
MAX_SWEEP_TURNS = 2_000


class HoldView(NamedTuple):
    """A hold as its caller sees it; `available_after_nano` feeds the balance header.

    A named tuple: made twice per request, and a tuple is several times cheaper to build
    than a frozen dataclass."""

    id: str
    status: str
    amount_nano: int
    price_nano: int
    cost_nano: int
    clamped_nano: int
    expires_ms: int
    available_after_nano: int

    @classmethod
    def of(cls, h: Hold) -> HoldView:
        return cls(
            h.id,
            str(h.status),
            h.amount_nano,
            h.price_nano,
            h.cost_nano,
            h.clamped_nano,
            h.expires_ms,
            h.available_after_nano,
        )


@dataclass(frozen=True, slots=True)
class AccountView:
    """A customer account as `create_account` answers it (the engine's `Account` is the
    live object, with balances)."""

    id: int
    name: str
    parent_id: int | None
    kind: str
    draws_on_parent: bool


class Ledger:
    def __init__(
        self,
        engine: Engine,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        max_pending_ops: int = MAX_PENDING_OPS,
    ) -> None:
        self.engine = engine
        self.store = store
        self.writer = GroupCommitWriter(engine, store)
        self.clock = clock
        self.max_pending_ops = max_pending_ops
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self.store_compared = False  # whether the last check() compared the store with memory
        self.read_timeout_s: float | None = READ_TIMEOUT_S  # a statement's or check's limit
        self._checking = asyncio.Lock()  # one check copies the engine at a time
        self.last_copy: SlicedCopy | None = None  # the last check's copy (its counts)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        transfer_policy: TransferPolicy = default_transfer_policy,
        sweep_interval_s: float | None = 1.0,
        max_pending_ops: int = MAX_PENDING_OPS,
    ) -> Ledger:
        """Open (or create) the ledger at `url` and rebuild the engine from it."""
        store = open_store(url)
        await store.open(int(clock() * 1000))  # upgrades what an earlier version left
        try:
            snap = await store.load()
            now_ms = int(clock() * 1000)
            if snap is None:
                engine = Engine(transfer_policy=transfer_policy)
            else:
                engine = Engine.restore(snap, transfer_policy=transfer_policy)
                for row in reversed(await store.recent_closed_holds(CLOSED_HOLDS_KEPT)):
                    engine.remember_hold(hold_from_row(row))
            ledger = cls(engine, store, clock=clock, max_pending_ops=max_pending_ops)
            # Journalled after the writer took its starting point, so the flush writes it.
            if snap is None:
                engine.bootstrap(now_ms)
            elif expired_nano := engine.release_orphans(now_ms):
                log.warning(
                    "restart: %d nano of ended grants, kept for holds of the last process, expired",
                    expired_nano,
                )
            ledger.writer.start()
            await ledger.writer.flush()
        except BaseException:
            await store.close()
            raise
        if sweep_interval_s:
            ledger._sweeper = asyncio.get_running_loop().create_task(
                ledger._sweep_loop(sweep_interval_s), name="ledger-sweeper"
            )
        return ledger

    async def close(self) -> None:
        """Stop sweeping, flush everything journalled, close the store."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.writer.stop()
        await self.store.close()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def flush(self) -> None:
        """Wait until everything applied (and attached) so far is durable."""
        await self.writer.flush()

    def attach(self, table: str, columns: Columns, row: tuple[Any, ...]) -> bool:
        """Commit a row of another table in the ledger's next transaction, so that a request's
        usage row becomes durable with its settlement. False: not taken (store failed, backlog
        full, or a value its column cannot hold: `writer.refused_rows`); the caller must store
        it otherwise, or not at all."""
        return not self._closed and self.writer.attach(table, columns, row)

    async def _sweep_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._sweep_due(self.now_ms)
            except Exception:  # a sweep bug must not kill the loop silently
                log.exception("ledger sweep failed")

    async def _sweep_due(self, now_ms: Callable[[], int]) -> dict[str, int]:
        """Sweep in bounded turns until nothing is due (at most `MAX_SWEEP_TURNS`).

        Between turns the loop serves requests, and each turn is committed before the next
        is taken: a boundary where every tenant's grant renews is many batches of about one
        turn each (`SWEEP_TURN_OPS`, far below the backpressure limit), and a settlement
        meanwhile waits for one such commit at most, never for the whole boundary."""
        totals: dict[str, int] = {}
        for turn in range(MAX_SWEEP_TURNS):
            if turn and self.engine.pending_ops():
                self.writer.poke()
                await self.writer.flush()
            result = self.engine.sweep(now_ms())
            self.writer.poke()
            for k, v in result.items():
                totals[k] = totals.get(k, 0) + v
            if not result["more"]:
                break
            await asyncio.sleep(0)
        totals.pop("more", None)
        return totals

    def _usable(self) -> None:
        if self.writer.failure is not None:
            raise StoreUnavailable(f"ledger store failed: {self.writer.failure!r}")
        if self._closed:
            raise LedgerError("ledger is closed")

    async def _durable(self, fn: Callable[[], T], key: str | None = None) -> T:
        """Apply an admin write (consulting the store for keys the engine forgot) and wait
        for it to be committed."""
        self._usable()
        if key and not self.engine.knows_key(key):
            check_text(key, "an idempotency key")  # before the store is asked about it
            seen = await self.store.get_idempotency(key)
            if seen is not None:
                self.engine.prime_key(key, seen[1], seen[2])
        result = fn()
        self.writer.poke()
        await self.writer.wait_durable(self.engine.seq)
        return result

    # ------------------------------------------------------------------ accounts & credit

    async def create_account(
        self,
        name: str,
        parent_id: int | None,
        kind: AccountKind | str,
        *,
        idempotency_key: str,
        draws_on_parent: bool = True,
    ) -> AccountView:
        """A customer account; with `draws_on_parent` its holds may use its parents' credit."""
        r = await self._durable(
            lambda: self.engine.create_account(
                name,
                parent_id,
                AccountKind(kind),
                draws_on_parent=draws_on_parent,
                idempotency_key=idempotency_key,
                now_ms=self.now_ms(),
            ),
            idempotency_key,
        )
        return AccountView(**r)

    async def top_up(self, account_id: int, amount_nano: int, *, idempotency_key: str) -> int:
        """Paid credit into an account's cash; returns the transfer id."""
        r = await self._durable(
            lambda: self.engine.top_up(
                account_id, amount_nano, idempotency_key=idempotency_key, now_ms=self.now_ms()
            ),
            idempotency_key,
        )
        return int(r["transfer_id"])

    async def grant(
        self,
        account_id: int,
        amount_nano: int,
        *,
        idempotency_key: str,
        expires_at: datetime | None = None,
        recurring: Recurrence | None = None,
        rollover: Rollover | None = None,
        priority: int = 0,
        effective_at: datetime | None = None,
    ) -> int:
        """An allowance; returns the grant id. Lower `priority` is spent first."""
        r = await self._durable(
            lambda: self.engine.grant(
                account_id,
                amount_nano,
                expires_ms=to_ms(expires_at) if expires_at else None,
                recurring=recurring,
                rollover_cap_nano=(rollover or Rollover.expire()).cap_nano,
                priority=priority,
                effective_ms=to_ms(effective_at) if effective_at else None,
                idempotency_key=idempotency_key,
                now_ms=self.now_ms(),
            ),
            idempotency_key,
        )
        return int(r["grant_id"])

    async def revoke_grant(self, account_id: int, grant_id: int, *, idempotency_key: str) -> int:
        """End a grant now; returns what of its current credit expired (nano)."""
        r = await self._durable(
            lambda: self.engine.revoke_grant(
                account_id, grant_id, idempotency_key=idempotency_key, now_ms=self.now_ms()
            ),
            idempotency_key,
        )
        return int(r["expired_nano"])

    async def transfer(
        self,
        from_id: int,
        to_id: int,
        amount_nano: int,
        *,
        idempotency_key: str,
        actor: str,
    ) -> int:
        """Move cash between customer accounts if the transfer policy lets `actor` do it
        ("operator" or "account:<id>"); returns the transfer id."""
        r = await self._durable(
            lambda: self.engine.transfer(
                from_id,
                to_id,
                amount_nano,
                actor=actor,
                idempotency_key=idempotency_key,
                now_ms=self.now_ms(),
            ),
            idempotency_key,
        )
        return int(r["transfer_id"])

    # ------------------------------------------------------------------ budgets

    async def set_budget(
        self,
        scope: int | str | tuple[str, str],
        limit_nano: int,
        period: Period | str,
        *,
        idempotency_key: str,
        tz: str = "UTC",
    ) -> dict[str, Any]:
        """Limit an account (`7`) or key (`("key", "k1")`) per day/week/month/total."""
        name = scope_name(scope)
        return await self._durable(
            lambda: self.engine.set_budget(
                name,
                limit_nano,
                Period(period),
                tz=tz,
                idempotency_key=idempotency_key,
                now_ms=self.now_ms(),
            ),
            idempotency_key,
        )

    async def delegate(
        self,
        parent_key_id: str,
        child_key_id: str,
        limit_nano: int,
        *,
        idempotency_key: str,
        ttl_s: float | None = None,
        expires_ms: int | None = None,
    ) -> dict[str, Any]:
        """Give a freshly minted child key a budget carved out of its parent key's room.

        `expires_ms` (absolute) wins over `ttl_s`: a retried call must name the same expiry,
        which a TTL counted from "now" would not.

        Raises `Refused` naming the parent when its room is smaller than `limit_nano`. The
        child's spend counts against the parent; revoking or expiring the parent revokes the
        child; whatever the child leaves unspent returns to the parent.
        """
        now = self.now_ms()
        if ttl_s is not None and not 0 <= ttl_s <= MAX_TIME_MS / 1000:
            raise InvalidRequest(f"ttl_s {ttl_s!r} out of range")
        return await self._durable(
            lambda: self.engine.delegate(
                scope_name(("key", parent_key_id)),
                scope_name(("key", child_key_id)),
                limit_nano,
                expires_ms=expires_ms
                if expires_ms is not None
                else (now + int(ttl_s * 1000) if ttl_s else None),
                idempotency_key=idempotency_key,
                now_ms=now,
            ),
            idempotency_key,
        )

    async def revoke(
        self, scope: int | str | tuple[str, str], *, idempotency_key: str
    ) -> list[str]:
        """Revoke a scope and everything delegated from it; returns the revoked scopes."""
        r = await self._durable(
            lambda: self.engine.revoke(
                scope_name(scope), idempotency_key=idempotency_key, now_ms=self.now_ms()
            ),
            idempotency_key,
        )
        return list(r["revoked"])

    def budgets(self, scope: int | str | tuple[str, str]) -> list[dict[str, Any]]:
        return self.engine.budget_view(scope_name(scope), self.now_ms())

    # ------------------------------------------------------------------ the hot path

    async def hold(
        self,
        chain: Sequence[int],
        amount_nano: int,
        *,
        request_id: str,
        key_scopes: Iterable[str] = (),
        ttl_s: float = DEFAULT_HOLD_TTL_S,
    ) -> HoldView:
        """Reserve `amount_nano` for `request_id` on the account chain (payer last).

        Raises `Refused` (a limit: its `reason` says which) or `LedgerBusy` (backpressure).
        Idempotent per request id. Not awaited for durability: see the module docstring.
        """
        self._usable()
        if self.engine.pending_ops() > self.max_pending_ops:
            await self._backpressure()
        seq = self.engine.seq
        h = self.engine.hold(
            request_id,
            chain,
            amount_nano,
            key_scopes=key_scopes,
            ttl_ms=int(ttl_s * 1000),
            now_ms=self.now_ms(),
        )
        if self.engine.seq != seq:  # a grant fell due on the way: that is written
            self.writer.poke()
        return HoldView.of(h)

    async def _backpressure(self) -> None:
        self.writer.poke()
        try:
            await asyncio.wait_for(self.writer.flush(), BACKPRESSURE_WAIT_S)
        except TimeoutError:
            raise LedgerBusy("the ledger's writer is behind; try again shortly") from None

    async def _load_hold(self, hold_id: str) -> None:
        """Bring a closed hold the engine no longer caches back from the store (a late retry)."""
        check_text(hold_id, "a hold id")
        row = await self.store.get_hold(hold_id)
        if row is None:
            raise NotFound(f"no hold {hold_id}")
        self.engine.remember_hold(hold_from_row(row))

    async def settle(
        self,
        hold_id: str,
        *,
        price_nano: int,
        cost_nano: int,
        producer: str,
        model: str,
        durable: bool = True,
    ) -> HoldView:
        """Charge the actual price (at most the hold) and the producer's cost; release the
        rest. Idempotent per hold: a retry with the same figures returns the first result.
        Returns once durable unless `durable=False`."""
        self._usable()
        if self.engine.find_hold(hold_id) is None:
            await self._load_hold(hold_id)
        h = self.engine.settle(
            hold_id,
            price_nano=price_nano,
            cost_nano=cost_nano,
            producer=producer,
            model=model,
            now_ms=self.now_ms(),
        )
        view = HoldView.of(h)
        self.writer.poke()
        if durable:
            await self.writer.wait_durable(self.engine.seq)
        return view

    async def void(self, hold_id: str) -> HoldView:
        """Release a hold entirely (request failed before any token was produced)."""
        self._usable()
        if self.engine.find_hold(hold_id) is None:
            await self._load_hold(hold_id)
        h = self.engine.void(hold_id, now_ms=self.now_ms())
        self.writer.poke()
        return HoldView.of(h)

    async def extend_hold(self, hold_id: str, ttl_s: float) -> HoldView:
        """Keep a long stream's hold alive for another `ttl_s`."""
        self._usable()
        h = self.engine.extend(hold_id, ttl_ms=int(ttl_s * 1000), now_ms=self.now_ms())
        return HoldView.of(h)

    async def sweep_expired(self, now: datetime | None = None) -> dict[str, int]:
        """Expire holds, grant periods and delegated budgets due by `now` (default: clock)."""
        self._usable()
        at_ms = to_ms(now) if now else self.now_ms()
        result = await self._sweep_due(lambda: at_ms)
        await self.writer.wait_durable(self.engine.seq)
        return result

    # ------------------------------------------------------------------ reads

    def balance(self, account_id: int) -> BalanceView:
        """From memory: always current, never waits on the store."""
        return self.engine.balance(account_id, self.now_ms())

    def spendable(self, payer_id: int, key_scopes: Iterable[str]) -> int:
        """What a key paid by this account may still spend: credit (parents' included),
        capped by the tightest budget on the chain and the key's scopes."""
        return self.engine.spendable(payer_id, key_scopes, self.now_ms())

    def available_to(self, payer_id: int) -> int:
        """What a hold on this account could draw now, its parents' credit included: the
        payer's balance after a settlement, cheaper than `balance` on the hot path."""
        return self.engine.chain_available(payer_id)

    def account(self, account_id: int) -> Account:
        """The account (raises `NotFound`); its figures are live, read them at once."""
        return self.engine.account(account_id)

    def customer(self, account_id: int) -> Account:
        """A customer account (`InvalidRequest` for an operator's or a producer's)."""
        return self.engine.customer(account_id)

    def accounts(self) -> list[Account]:
        """Every account, operator and producer accounts included."""
        return list(self.engine.accounts.values())

    def open_credit(self, account_id: int) -> tuple[list[Bucket], list[Grant]]:
        """Copies of the account's open buckets (consumption order) and active grants."""
        return self.engine.open_credit(account_id)

    async def statement(self, account_id: int, since: datetime, until: datetime) -> dict[str, Any]:
        """Opening balance, credits in, spend by model, expiries and closing balance."""
        since_ms, until_ms = to_ms(since), to_ms(until)
        if until_ms <= since_ms:
            raise ValueError("a statement needs since < until")
        acc = self.engine.account(account_id)
        await self.flush()
        # One snapshot on a read connection, under a time limit (`ReadTimeout`).
        opening, closing, moves = await self.store.statement_data(
            account_id, since_ms, until_ms, self.read_timeout_s
        )
        return build_statement(acc.public(), since_ms, until_ms, opening, closing, moves)

    async def statement_csv(self, account_id: int, since: datetime, until: datetime) -> str:
        return statement_csv(await self.statement(account_id, since, until))

    async def check(self) -> list[str]:
        """Every invariant, in memory and in the store; an empty list means sound.

        The engine and the store are compared at one commit boundary: the engine's figures
        are copied a slice per loop turn while the engine marks what changes
        (`slices.SlicedCopy`); the writer reads the changed objects again as it takes a batch
        (the cut) and, once that batch is committed, opens a read snapshot of the store,
        which later commits do not change. The copy is checked and compared with the
        snapshot on a thread, so traffic never has to pause for long. Checks run one at a
        time (a second waits, within its time limit). When the store cannot be read (it
        failed), that is itself a violation: a check that did not compare the store does not
        pass. Past `read_timeout_s` it raises `ReadTimeout` (a comparison already on its
        thread finishes there, unread).
        """
        self.store_compared = False
        if self._closed:
            raise LedgerError("ledger is closed")
        limit = asyncio.timeout(self.read_timeout_s)
        try:
            async with limit:
                return await self._check()
        except TimeoutError as exc:
            if not limit.expired():  # a timeout of the store's own, not the check's limit
                raise
            raise ReadTimeout(self.read_timeout_s or 0.0) from exc

    async def _check(self) -> list[str]:
        async with self._checking:
            copy = self.last_copy = SlicedCopy(self.engine)
            try:
                await copy.copy()
                return await self._compare(copy)
            finally:
                copy.abandon()  # cancelled, timed out or failed: marking stops with it

    async def _compare(self, copy: SlicedCopy) -> list[str]:
        try:
            taken, snap = await self.writer.cut(lambda: copy.cut(self.now_ms()))
        except Exception as exc:
            if not isinstance(exc, StoreUnavailable):
                log.exception("ledger check could not open a store snapshot")
            why = str(exc) if isinstance(exc, StoreUnavailable) else repr(exc)
            taken = copy.cut(self.now_ms())  # without the writer: nothing to compare with
            cut = await asyncio.to_thread(copy.assemble, taken)
            return [
                *await asyncio.to_thread(auditor.fact_violations, cut.facts),
                f"store not compared: {why}",
            ]
        try:
            cut = await asyncio.to_thread(copy.assemble, taken)
            audit = await snap.audit()
            settled = await snap.settled_scopes(auditor.budgets_since_ms(cut), MAX_TIME_MS)
        finally:
            await snap.close()

        def compare() -> list[str]:
            try:
                return auditor.cut_violations(cut, audit, settled)
            finally:
                auditor.let_go(cut, audit)  # here, a chunk a call: not all at once on the loop

        violations = await asyncio.to_thread(compare)
        self.store_compared = True
        return violations
