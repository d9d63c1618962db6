"""The ledger state machine: pure, synchronous, in memory, asserting its invariants.

Like TigerBeetle's state machine, it is the single authority for balances, holds and budget
counters while the process runs: every operation is applied here in O(depth of the chain),
recorded in a journal, and the group-commit writer persists the journal in order. The
durable state is therefore always a prefix of the engine's history, and a restart rebuilds
the engine from it (`Engine.restore`).

Time is passed in (`now_ms`), never read, so the engine is deterministic and testable.
A re-entrant lock makes every public method atomic, so threads may share one engine.
"""

from __future__ import annotations

import heapq
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from tokenworks.ledger import auditor
from tokenworks.ledger import grants as grantmath
from tokenworks.ledger.domain import (
    CASH_PRIORITY,
    CUSTOMER_KINDS,
    MAX_AMOUNT_NANO,
    MAX_BACKDATE_MS,
    Account,
    AccountKind,
    BalanceView,
    Bucket,
    Budget,
    Grant,
    Hold,
    HoldClosed,
    HoldLeg,
    HoldStatus,
    IdempotencyConflict,
    InvalidRequest,
    NotFound,
    Period,
    PolicyDenied,
    Recurrence,
    Refusal,
    Refused,
    Transfer,
    TransferKind,
    account_scope,
    body_hash,
    check_amount,
    check_text,
    check_time,
)
from tokenworks.ledger.periods import period_end_ms, period_start_ms, zone
from tokenworks.ledger.rows import (
    Batch,
    Snapshot,
    account_from_row,
    account_row,
    bucket_from_row,
    bucket_row,
    budget_from_row,
    budget_row,
    grant_from_row,
    grant_row,
    hold_row,
)
from tokenworks.ledger.slices import Marks
from tokenworks.money import format_nano

OPERATOR_ACCOUNTS = (
    ("operator:topups", AccountKind.TOPUPS),
    ("operator:grants", AccountKind.GRANTS),
    ("operator:revenue", AccountKind.REVENUE),
    ("operator:expense", AccountKind.EXPENSE),
    ("operator:expired", AccountKind.EXPIRED),
)
MAX_CHAIN_DEPTH = 16
MAX_KEY_DEPTH = 16
MAX_CATCHUP_PERIODS = 10_000
# One sweep turn's work: at most this many hold expiries, this many grant periods (each up to
# three transfers) and this many scope expiries. The ledger runs turns until nothing is due,
# yielding to requests in between and committing each turn before the next, so a month
# boundary where 100,000 grants renew at once is many small batches (none near the
# backpressure limit) and the event loop is never held for long: a grant period costs about
# 60 us, so a turn about 15 ms (bench/scale.py measures it).
SWEEP_TURN_ITEMS = 250
# The most operations one turn can journal (about the size of the batch it makes).
SWEEP_TURN_OPS = SWEEP_TURN_ITEMS * 5
CLOSED_HOLDS_KEPT = 100_000
# The expiry heap keeps a closed hold's entry until it would have expired (lazy deletion);
# past twice the open holds plus this, it is rebuilt from the open holds alone, so its size
# is bounded by the holds in flight, not by request rate x hold TTL.
HOLD_HEAP_SLACK = 4096
IDEMPOTENCY_KEPT = 100_000

TransferPolicy = Callable[["Engine", str, Account, Account, int], str | None]
"""(engine, actor, source, destination, amount) -> reason to deny, or None to allow."""


def default_transfer_policy(
    engine: Engine, actor: str, src: Account, dst: Account, amount_nano: int
) -> str | None:
    """Customers move cash inside their own organisation; an account may move what it owns
    or what any account below it owns. The operator may move anything between customers."""
    if src.kind not in CUSTOMER_KINDS or dst.kind not in CUSTOMER_KINDS:
        return "transfers move credit between customer accounts only"
    if engine.root_of(src.id) != engine.root_of(dst.id):
        return "source and destination belong to different organisations"
    if actor == "operator":
        return None
    kind, _, ident = actor.partition(":")
    if kind != "account" or not ident.isdigit():
        return f"unknown actor {actor!r}"
    if int(ident) not in engine.path_ids(src.id):
        return f"{actor} may not move credit out of account:{src.id}"
    return None


@dataclass(slots=True)
class Journal:
    """What changed since the writer last took a batch: objects, so rows show final values."""

    accounts: dict[int, Account] = field(default_factory=dict)
    buckets: dict[int, tuple[Bucket, bool]] = field(default_factory=dict)  # (bucket, closed)
    grants: dict[int, Grant] = field(default_factory=dict)
    budgets: dict[tuple[str, str], Budget] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    transfers: list[Transfer] = field(default_factory=list)
    idempotency: list[tuple[str, str, str, str]] = field(default_factory=list)
    meta_dirty: bool = False

    def __len__(self) -> int:
        return len(self.transfers) + len(self.holds) + len(self.idempotency)


@dataclass(frozen=True, slots=True)
class _Payer:
    path: tuple[int, ...]  # root first, the payer last
    scopes: tuple[str, ...]  # the budget scope of each account on the path
    funding: tuple[Account, ...]  # the payer, then each parent it may draw on

    def available_nano(self) -> int:
        """What a hold could draw now: the funding accounts' balances less what they hold."""
        total = 0
        for a in self.funding:
            total += a.balance_nano - a.held_nano
        return total


class Engine:
    """Accounts, buckets, grants, budgets and holds, with every movement a transfer."""

    def __init__(self, *, transfer_policy: TransferPolicy = default_transfer_policy) -> None:
        self._lock = threading.RLock()
        self.transfer_policy = transfer_policy
        self.accounts: dict[int, Account] = {}
        self.buckets: dict[int, Bucket] = {}
        self.grants: dict[int, Grant] = {}
        self.budgets: dict[str, dict[Period, Budget]] = {}
        self.scope_parent: dict[str, str] = {}  # live delegations: child -> parent
        self.scope_children: dict[str, set[str]] = {}
        self.holds: dict[str, Hold] = {}  # open
        self.closed_holds: OrderedDict[str, Hold] = OrderedDict()
        self._idem: OrderedDict[str, tuple[str, str]] = OrderedDict()  # key -> (hash, result)
        self._payables: dict[str, int] = {}
        # Producer costs settled since the last batch, by (producer, model): [nano, last ms].
        # Posted as one COST transfer each when the writer takes the batch (or a balance is
        # read): a payable accrues per commit, not per request. Each settled hold keeps its
        # own cost_nano, and `check` compares the two sums.
        self._accrued_costs: dict[tuple[str, str], list[int]] = {}
        self._names: dict[str, int] = {}  # operator account name -> id
        self._operator_ids: dict[AccountKind, int] = {}  # cache of the above, by kind
        self._hold_heap: list[tuple[int, str]] = []
        self._payers: dict[int, _Payer] = {}
        self._grant_heap: list[tuple[int, int]] = []
        # Each account's grant ids: a hold advances only its own accounts' due grants, so the
        # first request after a boundary does not renew every tenant's grant inline.
        self._account_grants: dict[int, list[int]] = {}
        self._scope_expiry_heap: list[tuple[int, str]] = []
        self.next_account_id = 1
        self.next_bucket_id = 1
        self.next_grant_id = 1
        self.next_transfer_id = 1
        self.bucket_seq = 0
        self.last_sweep_ms = 0
        self.seq = 0  # bumps on every state change; the writer acknowledges up to a seq
        self.journal = Journal()
        # While a check copies the engine in slices (`slices.SlicedCopy`): the accounts and
        # buckets whose checked figures changed since. None otherwise, which is all the
        # marking costs the hot path: one test per change.
        self.marks: Marks | None = None

    # ------------------------------------------------------------------ bootstrap

    def bootstrap(self, now_ms: int) -> None:
        """Create the operator accounts once (a fresh ledger)."""
        with self._lock:
            for name, kind in OPERATOR_ACCOUNTS:
                if name not in self._names:
                    acc = self._new_account(name, None, kind, False, now_ms)
                    self._names[name] = acc.id

    def operator_account(self, kind: AccountKind) -> Account:
        acc_id = self._operator_ids.get(kind)
        if acc_id is None:
            acc_id = self._operator_ids[kind] = self._names[f"operator:{kind}"]
        return self.accounts[acc_id]

    @classmethod
    def restore(cls, snap: Snapshot, **kwargs: Any) -> Engine:
        """Rebuild from the store: open buckets, active grants and budgets, nothing held.

        Holds live in memory only (one process writes a ledger), so the requests they
        covered died with the process that held them: what they reserved is free again, and
        the derived figures (held amounts, delegated room) are computed afresh. Call
        `release_orphans` next, which expires what ended grants still kept for them.
        """
        eng = cls(**kwargs)
        for r in snap.accounts:
            acc = account_from_row(r)
            eng.accounts[acc.id] = acc
            if acc.kind is AccountKind.PAYABLE:
                eng._payables[acc.name.removeprefix("payable:")] = acc.id
            elif acc.kind not in CUSTOMER_KINDS:
                eng._names[acc.name] = acc.id
        for r in snap.buckets:
            b, _ = bucket_from_row(r)  # the store loads open buckets only
            eng.buckets[b.id] = b
            acc = eng.accounts[b.account_id]
            grantmath.insert_in_order(acc.bucket_ids, b, eng.buckets)
            if b.grant_id is None:
                acc.cash_bucket_id = b.id
        for r in snap.grants:
            g = grant_from_row(r)
            eng.grants[g.id] = g
            eng._account_grants.setdefault(g.account_id, []).append(g.id)
            if g.active and g.next_due_ms is not None:
                heapq.heappush(eng._grant_heap, (g.next_due_ms, g.id))
        for r in snap.budgets:
            bg = budget_from_row(r)
            eng.budgets.setdefault(bg.scope, {})[bg.period] = bg
            if bg.parent_scope and not bg.revoked:
                eng.scope_parent[bg.scope] = bg.parent_scope
                eng.scope_children.setdefault(bg.parent_scope, set()).add(bg.scope)
            if bg.expires_ms is not None and not bg.revoked:
                heapq.heappush(eng._scope_expiry_heap, (bg.expires_ms, bg.scope))
        for scope, per in eng.budgets.items():
            for bg in per.values():
                bg.delegated_nano = 0 if bg.revoked else eng.children_unused(scope)
        m = snap.meta
        eng.next_account_id = m.get("next_account_id", 1)
        eng.next_bucket_id = m.get("next_bucket_id", 1)
        eng.next_grant_id = m.get("next_grant_id", 1)
        eng.next_transfer_id = m.get("next_transfer_id", 1)
        eng.bucket_seq = m.get("bucket_seq", 0)
        eng.last_sweep_ms = m.get("last_sweep_ms", 0)
        return eng

    def release_orphans(self, now_ms: int) -> int:
        """After a restore: expire the credit that ended grants kept only for holds that died
        with the last process (as releasing those holds would have); returns the amount."""
        with self._lock:
            assert not self.holds, "orphans are released before any new hold"
            expired_acc = self.operator_account(AccountKind.EXPIRED)
            expired_nano = 0
            for b in [b for b in self.buckets.values() if b.ended]:
                if b.remaining_nano:
                    expired_nano += b.remaining_nano
                    acc = self.accounts[b.account_id]
                    self._post(
                        TransferKind.EXPIRE, acc, expired_acc, b.remaining_nano, now_ms,
                        debit_bucket=b,
                    )  # fmt: skip
                self._maybe_close(b)
            return expired_nano

    # ------------------------------------------------------------------ journal

    def take_batch(self) -> Batch:
        """Hand the writer everything changed since the last batch, as rows."""
        with self._lock:
            self._post_accrued_costs()
            j = self.journal
            self.journal = Journal()
            meta: list[tuple[str, int]] = []
            if j.meta_dirty or j.transfers or j.accounts or j.buckets or j.grants:
                meta = [
                    ("next_account_id", self.next_account_id),
                    ("next_bucket_id", self.next_bucket_id),
                    ("next_grant_id", self.next_grant_id),
                    ("next_transfer_id", self.next_transfer_id),
                    ("bucket_seq", self.bucket_seq),
                    ("last_sweep_ms", self.last_sweep_ms),
                ]
            return Batch(
                seq=self.seq,
                accounts=[account_row(a) for a in j.accounts.values()],
                buckets=[bucket_row(b, closed) for b, closed in j.buckets.values()],
                grants=[grant_row(g) for g in j.grants.values()],
                budgets=[budget_row(b) for b in j.budgets.values()],
                holds=[hold_row(h) for h in j.holds.values()],
                transfers=j.transfers,  # a Transfer is its row (asserted in rows.py)
                idempotency=list(j.idempotency),
                meta=meta,
            )

    def pending_ops(self) -> int:
        return len(self.journal)

    def _dirty_account(self, a: Account) -> None:
        """Every change of an account's balance, and its creation, comes through here."""
        self.journal.accounts[a.id] = a
        if self.marks is not None:
            self._mark(self.marks.accounts, a.id)

    def _dirty_bucket(self, b: Bucket, closed: bool = False) -> None:
        """Every change of a bucket's remaining credit or end, its creation and its removal
        come through here."""
        self.journal.buckets[b.id] = (b, closed)
        if self.marks is not None:
            self._mark(self.marks.buckets, b.id)

    def _mark(self, ids: set[int], obj_id: int) -> None:
        """Mark for the check copying now; past its bound, stop marking (the cut then
        copies everything at once)."""
        ids.add(obj_id)
        if self.marks is not None and not self.marks.room():
            self.marks = None

    def _mark_legs(self, legs: Iterable[HoldLeg]) -> None:
        """Held amounts change on a hold's legs only (placed, released); they are not
        journalled (never stored), so they are marked here."""
        m = self.marks
        if m is None:
            return
        for leg in legs:
            m.accounts.add(leg.account_id)
            m.buckets.add(leg.bucket_id)
        if not m.room():
            self.marks = None

    def _dirty_budget(self, b: Budget) -> None:
        self.journal.budgets[(b.scope, str(b.period))] = b

    # ------------------------------------------------------------------ idempotency

    def knows_key(self, key: str) -> bool:
        return key in self._idem

    def prime_key(self, key: str, digest: str, result: str) -> None:
        """Teach the engine a key the store remembers (it fell out of the memory cache)."""
        with self._lock:
            self._idem.setdefault(key, (digest, result))

    def _idempotent(
        self, key: str, op: str, body: dict[str, Any], fn: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        if not key:
            raise InvalidRequest("an idempotency key is required")
        check_text(key, "an idempotency key")
        digest = body_hash({"op": op, **body})
        seen = self._idem.get(key)
        if seen is not None:
            if seen[0] != digest:
                raise IdempotencyConflict(f"idempotency key {key!r} was used for another request")
            self._idem.move_to_end(key)
            stored: dict[str, Any] = json.loads(seen[1])
            return stored
        result = fn()
        raw = json.dumps(result, separators=(",", ":"), sort_keys=True)
        self._idem[key] = (digest, raw)
        if len(self._idem) > IDEMPOTENCY_KEPT:
            self._idem.popitem(last=False)
        self.journal.idempotency.append((key, op, digest, raw))
        self.seq += 1
        return result

    # ------------------------------------------------------------------ accounts

    def _new_account(
        self, name: str, parent_id: int | None, kind: AccountKind, draws: bool, now_ms: int
    ) -> Account:
        acc = Account(self.next_account_id, name, parent_id, kind, draws, now_ms)
        self.next_account_id += 1
        self.accounts[acc.id] = acc
        if kind in CUSTOMER_KINDS:
            cash = self._new_bucket(acc, None, CASH_PRIORITY, None)
            acc.cash_bucket_id = cash.id
        self._dirty_account(acc)
        self.journal.meta_dirty = True
        self.seq += 1
        return acc

    def _new_bucket(
        self, acc: Account, grant_id: int | None, priority: int, expires_ms: int | None
    ) -> Bucket:
        self.bucket_seq += 1
        b = Bucket(self.next_bucket_id, acc.id, grant_id, priority, expires_ms, self.bucket_seq)
        self.next_bucket_id += 1
        self.buckets[b.id] = b
        grantmath.insert_in_order(acc.bucket_ids, b, self.buckets)
        self._dirty_bucket(b)
        return b

    def account(self, account_id: int) -> Account:
        acc = self.accounts.get(account_id)
        if acc is None:
            raise NotFound(f"no account {account_id}")
        return acc

    def customer(self, account_id: int) -> Account:
        acc = self.account(account_id)
        if acc.kind not in CUSTOMER_KINDS:
            raise InvalidRequest(
                f"account {account_id} is an operator account ({acc.kind}): only customer "
                "accounts (organisation, team, user, agent) hold credit, budgets and keys"
            )
        return acc

    def path_ids(self, account_id: int) -> list[int]:
        """Root-first ids from the organisation down to `account_id`."""
        path = []
        cur: int | None = account_id
        while cur is not None:
            path.append(cur)
            if len(path) > MAX_CHAIN_DEPTH:
                raise InvalidRequest("account tree deeper than the limit")
            cur = self.accounts[cur].parent_id
        path.reverse()
        return path

    def root_of(self, account_id: int) -> int:
        return self.path_ids(account_id)[0]

    def create_account(
        self,
        name: str,
        parent_id: int | None,
        kind: AccountKind,
        *,
        draws_on_parent: bool = True,
        idempotency_key: str,
        now_ms: int,
    ) -> dict[str, Any]:
        kind = AccountKind(kind)
        body = {"name": name, "parent": parent_id, "kind": str(kind), "draws": draws_on_parent}

        def apply() -> dict[str, Any]:
            if kind not in CUSTOMER_KINDS:
                raise InvalidRequest("operator accounts are created by the ledger itself")
            if not name or len(name) > 200:
                raise InvalidRequest("account names are 1-200 characters")
            check_text(name, "an account name")
            if parent_id is not None:
                self.customer(parent_id)
                if len(self.path_ids(parent_id)) >= MAX_CHAIN_DEPTH:
                    raise InvalidRequest("account tree deeper than the limit")
            draws = draws_on_parent and parent_id is not None
            return self._new_account(name, parent_id, kind, draws, now_ms).public()

        with self._lock:
            return self._idempotent(idempotency_key, "create_account", body, apply)

    def payable_for(self, producer: str, now_ms: int) -> Account:
        acc_id = self._payables.get(producer)
        if acc_id is None:
            acc = self._new_account(f"payable:{producer}", None, AccountKind.PAYABLE, False, now_ms)
            self._payables[producer] = acc.id
            return acc
        return self.accounts[acc_id]

    # ------------------------------------------------------------------ postings

    def _post(
        self,
        kind: TransferKind,
        debit: Account,
        credit: Account,
        amount_nano: int,
        now_ms: int,
        *,
        debit_bucket: Bucket | None = None,
        credit_bucket: Bucket | None = None,
        hold_id: str | None = None,
        model: str | None = None,
        producer: str | None = None,
    ) -> Transfer:
        assert amount_nano > 0, amount_nano
        t = Transfer(
            self.next_transfer_id,
            now_ms,
            kind,
            debit.id,
            credit.id,
            amount_nano,
            debit_bucket.id if debit_bucket else None,
            credit_bucket.id if credit_bucket else None,
            hold_id,
            model,
            producer,
        )
        self.next_transfer_id += 1
        debit.balance_nano -= amount_nano
        credit.balance_nano += amount_nano
        if debit_bucket is not None:
            assert debit_bucket.account_id == debit.id
            debit_bucket.remaining_nano -= amount_nano
            assert debit_bucket.remaining_nano >= debit_bucket.held_nano, debit_bucket
            self._dirty_bucket(debit_bucket)
        if credit_bucket is not None:
            assert credit_bucket.account_id == credit.id
            credit_bucket.remaining_nano += amount_nano
            self._dirty_bucket(credit_bucket)
        assert debit.allow_negative or debit.balance_nano >= debit.held_nano, debit
        self._dirty_account(debit)
        self._dirty_account(credit)
        self.journal.transfers.append(t)
        self.seq += 1
        return t

    def _maybe_close(self, b: Bucket) -> None:
        """Forget an ended bucket once nothing is left in it or held on it."""
        if b.ended and b.remaining_nano == 0 and b.held_nano == 0:
            acc = self.accounts[b.account_id]
            acc.bucket_ids.remove(b.id)
            del self.buckets[b.id]
            self._dirty_bucket(b, closed=True)

    # ------------------------------------------------------------------ credit in

    def top_up(
        self, account_id: int, amount_nano: int, *, idempotency_key: str, now_ms: int
    ) -> dict[str, Any]:
        check_amount(amount_nano)

        def apply() -> dict[str, Any]:
            acc = self.customer(account_id)
            cash = self.buckets[acc.cash_bucket_id]  # type: ignore[index]  # customers have one
            t = self._post(
                TransferKind.TOP_UP,
                self.operator_account(AccountKind.TOPUPS),
                acc,
                amount_nano,
                now_ms,
                credit_bucket=cash,
            )
            return {"transfer_id": t.id, "amount_nano": amount_nano}

        with self._lock:
            body = {"account": account_id, "amount": amount_nano}
            return self._idempotent(idempotency_key, "top_up", body, apply)

    def grant(
        self,
        account_id: int,
        amount_nano: int,
        *,
        expires_ms: int | None = None,
        recurring: Recurrence | None = None,
        rollover_cap_nano: int | None = 0,
        priority: int = 0,
        effective_ms: int | None = None,
        idempotency_key: str,
        now_ms: int,
    ) -> dict[str, Any]:
        """An allowance: credit from the operator's grant account, optionally recurring."""
        check_amount(amount_nano)
        if rollover_cap_nano is not None:
            check_amount(rollover_cap_nano, allow_zero=True)
        if not isinstance(priority, int) or not 0 <= priority < CASH_PRIORITY:
            raise InvalidRequest("grant priority must be in [0, 2**31)")
        if expires_ms is not None:
            check_time(expires_ms, "a grant's expiry")
        if effective_ms is not None:
            check_time(effective_ms, "a grant's effective time")
        effective = now_ms if effective_ms is None else effective_ms
        body = {
            "account": account_id,
            "amount": amount_nano,
            "expires": expires_ms,
            "period": str(recurring.period) if recurring else None,
            "tz": recurring.tz if recurring else None,
            "cap": rollover_cap_nano,
            "priority": priority,
            "effective": effective_ms,
        }

        def apply() -> dict[str, Any]:
            self.customer(account_id)
            if recurring:
                zone(recurring.tz)
            if effective < now_ms - MAX_BACKDATE_MS:
                # Every elapsed period is issued, rolled and expired now: bounded work.
                raise InvalidRequest(
                    f"a grant's effective_at may be at most {MAX_BACKDATE_MS // 86_400_000} "
                    "days in the past"
                )
            if expires_ms is not None and expires_ms <= effective:
                raise InvalidRequest("a grant must expire after it takes effect")
            g = Grant(
                id=self.next_grant_id,
                account_id=account_id,
                amount_nano=amount_nano,
                priority=priority,
                effective_ms=effective,
                expires_ms=expires_ms,
                period=recurring.period if recurring else None,
                tz=recurring.tz if recurring else "UTC",
                rollover_cap_nano=rollover_cap_nano if recurring else 0,
                next_due_ms=effective,
            )
            self.next_grant_id += 1
            self.grants[g.id] = g
            self._account_grants.setdefault(account_id, []).append(g.id)
            self.journal.grants[g.id] = g
            self.journal.meta_dirty = True
            self.seq += 1
            if not self._advance_grant(g, now_ms):  # (it schedules the next period itself)
                heapq.heappush(self._grant_heap, (effective, g.id))
            return {"grant_id": g.id, "bucket_id": g.bucket_id}

        with self._lock:
            return self._idempotent(idempotency_key, "grant", body, apply)

    def revoke_grant(
        self, account_id: int, grant_id: int, *, idempotency_key: str, now_ms: int
    ) -> dict[str, Any]:
        """End a grant now: no further issues, and what is left of its current period's
        credit expires (held credit expires as its holds release), as at a period's end."""

        def apply() -> dict[str, Any]:
            g = self.grants.get(grant_id)
            if g is None or g.account_id != account_id:
                raise NotFound(f"no grant {grant_id} on account {account_id}")
            self._advance_grant(g, now_ms)  # what fell due before now happens first
            if not g.active:
                return {"grant_id": g.id, "expired_nano": 0}
            acc = self.accounts[g.account_id]
            old = self.buckets.get(g.bucket_id) if g.bucket_id is not None else None
            g.active = False
            g.next_due_ms = None
            expired = 0
            if old is not None:
                expired = max(0, old.remaining_nano - old.held_nano)
                if expired:
                    expired_acc = self.operator_account(AccountKind.EXPIRED)
                    self._post(
                        TransferKind.EXPIRE, acc, expired_acc, expired, now_ms, debit_bucket=old
                    )
                old.ended = True
                self._dirty_bucket(old)
                self._maybe_close(old)
            self.journal.grants[g.id] = g
            self.seq += 1
            return {"grant_id": g.id, "expired_nano": expired}

        with self._lock:
            body = {"account": account_id, "grant": grant_id}
            return self._idempotent(idempotency_key, "revoke_grant", body, apply)

    def _advance_grants(self, now_ms: int, max_steps: int = SWEEP_TURN_ITEMS) -> int:
        """Issue, refill, roll over and expire the grants due at `now_ms`, earliest first, at
        most about `max_steps` grant periods; returns the periods done. Due grants left over
        stay in the heap for the next turn (their own account's holds advance them sooner)."""
        heap = self._grant_heap
        steps = work = 0
        while heap and heap[0][0] <= now_ms and work < max_steps:
            due, gid = heapq.heappop(heap)
            work += 1  # a stale entry costs a pop: it counts against the turn too
            g = self.grants.get(gid)
            if g is None or not g.active or g.next_due_ms != due:
                continue  # done already (its account's hold advanced it), or ended
            done = self._advance_grant(g, now_ms, max(1, max_steps - work + 1))
            steps += done
            work += done - 1
        return steps

    def _advance_grant(self, g: Grant, now_ms: int, limit: int = MAX_CATCHUP_PERIODS) -> int:
        """Bring one grant up to `now_ms`, at most `limit` periods (a grant back-dated by
        months catches up over several turns); returns the periods it stepped. Its heap entry
        for the old due time goes stale (skipped), a new one is pushed."""
        steps = 0
        while g.active and g.next_due_ms is not None and g.next_due_ms <= now_ms:
            if steps == limit:
                break
            self._grant_step(g, now_ms)
            steps += 1
        if steps and g.active and g.next_due_ms is not None:
            heapq.heappush(self._grant_heap, (g.next_due_ms, g.id))
        return steps

    def _advance_accounts(self, accounts: Iterable[Account], now_ms: int) -> None:
        """Bring the grants of these accounts (a hold's funding) up to `now_ms`: what the
        hold may draw must include a period that has begun, whether or not the sweep has
        reached that grant yet. Ended grants are dropped from the index on the way."""
        for acc in accounts:
            ids = self._account_grants.get(acc.id)
            if not ids:
                continue
            live = []
            for gid in ids:
                g = self.grants.get(gid)
                if g is None or not g.active:
                    continue
                if g.next_due_ms is not None and g.next_due_ms <= now_ms:
                    self._advance_grant(g, now_ms)
                live.append(gid)
            if len(live) != len(ids):
                self._account_grants[acc.id] = live

    def _grant_step(self, g: Grant, now_ms: int) -> None:
        """One boundary of a grant: issue it, or end its bucket and maybe refill."""
        due = g.next_due_ms
        assert due is not None and due <= now_ms
        acc = self.accounts[g.account_id]
        issuer = self.operator_account(AccountKind.GRANTS)
        expired_acc = self.operator_account(AccountKind.EXPIRED)
        old = self.buckets.get(g.bucket_id) if g.bucket_id is not None else None
        refill = g.bucket_id is None or (
            g.period is not None and (g.expires_ms is None or due < g.expires_ms)
        )
        new: Bucket | None = None
        if refill:
            end = period_end_ms(g.period, g.tz, due) if g.period else None
            if g.expires_ms is not None:
                end = g.expires_ms if end is None else min(end, g.expires_ms)
            new = self._new_bucket(acc, g.id, g.priority, end)
            kind = TransferKind.GRANT if g.bucket_id is None else TransferKind.REFILL
            self._post(kind, issuer, acc, g.amount_nano, due, credit_bucket=new)
            g.bucket_id = new.id
            g.next_due_ms = end
        else:
            g.active = False
            g.next_due_ms = None
        if old is not None:
            free = old.remaining_nano - old.held_nano
            carry, expire = grantmath.rollover_split(free, g.rollover_cap_nano if new else 0)
            if carry:
                assert new is not None
                self._post(
                    TransferKind.ROLLOVER, acc, acc, carry, due, debit_bucket=old, credit_bucket=new
                )
            if expire:
                self._post(TransferKind.EXPIRE, acc, expired_acc, expire, due, debit_bucket=old)
            old.ended = True
            self._dirty_bucket(old)
            self._maybe_close(old)
        self.journal.grants[g.id] = g
        self.seq += 1

    # ------------------------------------------------------------------ transfers

    def transfer(
        self,
        from_id: int,
        to_id: int,
        amount_nano: int,
        *,
        actor: str,
        idempotency_key: str,
        now_ms: int,
    ) -> dict[str, Any]:
        """Move cash (not allowances: those belong to their grantee) between accounts."""
        check_amount(amount_nano)

        def apply() -> dict[str, Any]:
            src, dst = self.customer(from_id), self.customer(to_id)
            if src.id == dst.id:
                raise InvalidRequest("a transfer needs two different accounts")
            reason = self.transfer_policy(self, actor, src, dst, amount_nano)
            if reason:
                raise PolicyDenied(reason)
            cash = self.buckets[src.cash_bucket_id]  # type: ignore[index]  # customers have one
            free = cash.remaining_nano - cash.held_nano
            if free < amount_nano:
                granted = sum(
                    max(0, b.remaining_nano - b.held_nano)
                    for b in (self.buckets[i] for i in src.bucket_ids)
                    if b.grant_id is not None
                )
                note = (
                    f"the account's other {format_nano(granted)} is grant credit, which stays "
                    "with the account it was granted to and cannot be transferred"
                    if granted
                    else ""
                )
                raise Refused(account_scope(src.id), Refusal.CREDIT, amount_nano, free, note=note)
            t = self._post(
                TransferKind.TRANSFER,
                src,
                dst,
                amount_nano,
                now_ms,
                debit_bucket=cash,
                credit_bucket=self.buckets[dst.cash_bucket_id],  # type: ignore[index]  # as above
            )
            return {"transfer_id": t.id, "amount_nano": amount_nano}

        with self._lock:
            body = {"from": from_id, "to": to_id, "amount": amount_nano, "actor": actor}
            return self._idempotent(idempotency_key, "transfer", body, apply)

    # ------------------------------------------------------------------ budgets

    def _roll(self, b: Budget, now_ms: int) -> Budget:
        if b.period_end_ms is not None and now_ms >= b.period_end_ms:
            b.spent_nano = 0
            b.period_start_ms = period_start_ms(b.period, b.tz, now_ms)
            b.period_end_ms = period_end_ms(b.period, b.tz, now_ms)
            self._dirty_budget(b)
        return b

    def _budgets_of(self, scope: str, now_ms: int) -> list[Budget]:
        per = self.budgets.get(scope)
        if not per:
            return []
        return [self._roll(b, now_ms) for b in per.values()]

    def _open_holds_on(self, scope: str) -> int:
        return sum(h.amount_nano for h in self.holds.values() if scope in h.scopes)

    def grants_due(self, now_ms: int) -> bool:
        """Whether a grant period falls due by `now_ms` (rolled on the next operation)."""
        return bool(self._grant_heap) and self._grant_heap[0][0] <= now_ms

    def children_unused(self, scope: str) -> int:
        """What the live delegated budgets minted from `scope` still reserve in it."""
        total = 0
        for c in self.scope_children.get(scope, ()):
            cb = self.budgets[c].get(Period.TOTAL)
            if cb is not None and not cb.revoked:
                total += cb.unused_nano
        return total

    def set_budget(
        self,
        scope: str,
        limit_nano: int,
        period: Period,
        *,
        tz: str = "UTC",
        idempotency_key: str,
        now_ms: int,
    ) -> dict[str, Any]:
        """Create or change the limit of one (scope, period); what was spent is kept."""
        check_amount(limit_nano, allow_zero=True)
        period = Period(period)
        body = {"scope": scope, "limit": limit_nano, "period": str(period), "tz": tz}

        def apply() -> dict[str, Any]:
            zone(tz)
            self._check_scope(scope)
            per = self.budgets.setdefault(scope, {})
            b = per.get(period)
            if b is None:
                b = Budget(
                    scope=scope,
                    period=period,
                    tz=tz,
                    limit_nano=limit_nano,
                    held_nano=self._open_holds_on(scope),
                    delegated_nano=self.children_unused(scope),
                    # A new budget counts spend from now: its first period is partial.
                    period_start_ms=now_ms,
                    period_end_ms=period_end_ms(period, tz, now_ms),
                )
                per[period] = b
            else:
                if b.revoked:
                    raise InvalidRequest(f"{scope} is revoked")
                if b.parent_scope is not None and limit_nano != b.limit_nano:
                    raise InvalidRequest("a delegated budget's limit is fixed when it is minted")
                self._roll(b, now_ms)
                b.limit_nano = limit_nano
                if tz != b.tz:
                    # The current period keeps its start and what was spent in it, and ends
                    # at the next boundary in the new zone; the next ones are the new zone's.
                    b.tz = tz
                    if b.period_end_ms is not None:
                        b.period_end_ms = period_end_ms(period, tz, now_ms)
            self._dirty_budget(b)
            self.seq += 1
            return b.public()

        with self._lock:
            return self._idempotent(idempotency_key, "set_budget", body, apply)

    def _check_scope(self, scope: str) -> None:
        check_text(scope, "a scope")
        kind, _, ident = scope.partition(":")
        if kind == "account":
            self.account(int(ident))
        elif kind != "key" or not ident:
            raise InvalidRequest(f"bad scope {scope!r}")

    def delegate(
        self,
        parent_scope: str,
        child_scope: str,
        limit_nano: int,
        *,
        expires_ms: int | None,
        idempotency_key: str,
        now_ms: int,
    ) -> dict[str, Any]:
        """Mint a child budget (a sub-agent key) carved out of the parent's room.

        The child's limit is reserved in every budget of the parent until the child spends
        it (then it counts as the parent's spend) or is revoked or expires (then it returns).
        """
        check_amount(limit_nano, allow_zero=True)
        if expires_ms is not None:
            check_time(expires_ms, "a delegated budget's expiry")
        body = {
            "parent": parent_scope,
            "child": child_scope,
            "limit": limit_nano,
            "exp": expires_ms,
        }

        def apply() -> dict[str, Any]:
            if not child_scope.startswith("key:") or not parent_scope.startswith("key:"):
                raise InvalidRequest("delegation is between key scopes")
            if child_scope in self.budgets or child_scope == parent_scope:
                raise InvalidRequest(f"{child_scope} already has a budget")
            if self._open_holds_on(child_scope):
                raise InvalidRequest(f"{child_scope} has open holds: mint a fresh key")
            depth = len(self._key_lineage(parent_scope))
            if depth >= MAX_KEY_DEPTH:
                raise InvalidRequest("sub-agent keys nested deeper than the limit")
            parents = self._budgets_of(parent_scope, now_ms)
            exp = expires_ms
            for pb in parents:
                if pb.revoked:
                    raise Refused(parent_scope, Refusal.REVOKED, limit_nano, 0)
                if pb.expires_ms is not None:
                    if pb.expires_ms <= now_ms:
                        raise Refused(parent_scope, Refusal.EXPIRED, limit_nano, 0)
                    exp = pb.expires_ms if exp is None else min(exp, pb.expires_ms)
                if pb.room_nano < limit_nano:
                    raise Refused(
                        parent_scope, Refusal.BUDGET, limit_nano, max(0, pb.room_nano),
                        period=pb.period,
                    )  # fmt: skip
            child = Budget(
                scope=child_scope,
                period=Period.TOTAL,
                tz="UTC",
                limit_nano=limit_nano,
                parent_scope=parent_scope,
                expires_ms=exp,
                period_start_ms=now_ms,
            )
            self.budgets[child_scope] = {Period.TOTAL: child}
            self.scope_parent[child_scope] = parent_scope
            self.scope_children.setdefault(parent_scope, set()).add(child_scope)
            for pb in parents:
                pb.delegated_nano += limit_nano
                self._dirty_budget(pb)
            if exp is not None:
                heapq.heappush(self._scope_expiry_heap, (exp, child_scope))
            self._dirty_budget(child)
            self.seq += 1
            return child.public()

        with self._lock:
            return self._idempotent(idempotency_key, "delegate", body, apply)

    def revoke(self, scope: str, *, idempotency_key: str, now_ms: int) -> dict[str, Any]:
        """Revoke a scope and every scope delegated from it; their unspent room returns."""

        def apply() -> dict[str, Any]:
            self._check_scope(scope)
            return {"revoked": self._revoke_tree(scope, now_ms)}

        with self._lock:
            return self._idempotent(idempotency_key, "revoke", {"scope": scope}, apply)

    def _revoke_tree(self, scope: str, now_ms: int) -> list[str]:
        done: list[str] = []
        gone: set[str] = set()
        stack = [scope]
        while stack:
            s = stack.pop()
            stack.extend(self.scope_children.pop(s, ()))
            parent = self.scope_parent.pop(s, None)
            per = self.budgets.setdefault(s, {})
            if parent is not None and parent not in gone:  # a revoked parent holds nothing
                own = per.get(Period.TOTAL)
                unused = own.unused_nano if own is not None and not own.revoked else 0
                for pb in self._budgets_of(parent, now_ms):
                    pb.delegated_nano -= unused
                    assert pb.delegated_nano >= 0, pb
                    self._dirty_budget(pb)
                self.scope_children.get(parent, set()).discard(s)
            if not per:  # remember the revocation even where no limit was set
                per[Period.TOTAL] = Budget(
                    s, Period.TOTAL, "UTC", 0, held_nano=self._open_holds_on(s)
                )
            for b in per.values():
                b.revoked = True
                b.delegated_nano = 0
                self._dirty_budget(b)
            done.append(s)
            gone.add(s)
        self.seq += 1
        return done

    def _key_lineage(self, scope: str) -> list[str]:
        """Root-first delegation ancestors of a key scope, itself last."""
        out = [scope]
        cur = scope
        while (cur := self.scope_parent.get(cur)) is not None:
            out.append(cur)
            if len(out) > MAX_KEY_DEPTH:
                raise InvalidRequest("delegation deeper than the limit")
        out.reverse()
        return out

    # ------------------------------------------------------------------ holds

    def _payer(self, account_id: int) -> _Payer:
        """What a hold on this account needs of the tree, computed once per account: accounts
        never move, nor change whether they draw on their parent."""
        payer = self._payers.get(account_id)
        if payer is None:
            path = self.path_ids(self.customer(account_id).id)
            payer = _Payer(
                path=tuple(path),
                scopes=tuple(account_scope(a) for a in path),
                funding=tuple(self._funding(path)),
            )
            self._payers[account_id] = payer
        return payer

    def _resolve_chain(self, chain: Iterable[int]) -> _Payer:
        given = chain if isinstance(chain, list) else list(chain)
        if not given:
            raise InvalidRequest("a hold needs a paying account")
        payer = self._payer(given[-1])
        path = payer.path
        if len(given) != 1 and path[len(path) - len(given) :] != tuple(given):
            raise InvalidRequest(f"chain {given} is not a path of the account tree")
        return payer

    def _funding(self, path: list[int]) -> list[Account]:
        """Leaf first: the payer, then each parent it may draw on."""
        out = []
        for acc_id in reversed(path):
            acc = self.accounts[acc_id]
            out.append(acc)
            if not acc.draws_on_parent:
                break
        return out

    def hold(
        self,
        request_id: str,
        chain: Iterable[int],
        amount_nano: int,
        *,
        key_scopes: Iterable[str] = (),
        ttl_ms: int,
        now_ms: int,
    ) -> Hold:
        """Reserve a request's worst-case price on its chain, or refuse with the reason.

        Every account on the chain and every key scope (with its delegation ancestors) must
        have budget room, and the payer plus the parents it draws on must have the credit.
        """
        check_amount(amount_nano, allow_zero=True)
        if not 0 < ttl_ms <= 86_400_000:
            raise InvalidRequest("hold ttl must be in (0, 1 day]")
        with self._lock:
            payer = self._resolve_chain(chain)
            path = payer.path
            scopes = list(payer.scopes)
            delegations = self.scope_parent
            for k in key_scopes:
                k = k if k.startswith("key:") else f"key:{k}"
                for s in self._key_lineage(k) if k in delegations else (k,):
                    if s not in scopes:
                        scopes.append(s)
            existing = self.holds.get(request_id) or self.closed_holds.get(request_id)
            if existing is not None:
                probe = Hold(request_id, tuple(path), tuple(scopes), amount_nano, [], 0, 0)
                if probe.body_hash() != existing.body_hash():
                    raise IdempotencyConflict(
                        f"request {request_id!r} already holds another amount"
                    )
                return existing
            check_text(request_id, "a request id")
            if self._grant_heap and self._grant_heap[0][0] <= now_ms:
                self._advance_accounts(payer.funding, now_ms)
            # Budgets first: they are cheap and name the tighter limit.
            parents_in_hold = {delegations[s] for s in scopes if s in delegations}
            touched: list[Budget] = []
            for s in scopes:
                if s not in self.budgets:
                    continue
                for b in self._budgets_of(s, now_ms):
                    if b.revoked:
                        raise Refused(s, Refusal.REVOKED, amount_nano, 0)
                    if b.expires_ms is not None and b.expires_ms <= now_ms:
                        raise Refused(s, Refusal.EXPIRED, amount_nano, 0)
                    if s not in parents_in_hold and b.room_nano < amount_nano:
                        raise Refused(
                            s, Refusal.BUDGET, amount_nano, max(0, b.room_nano), period=b.period
                        )
                    touched.append(b)
            funding = payer.funding
            available = payer.available_nano()
            if available < amount_nano:
                raise Refused(account_scope(funding[-1].id), Refusal.CREDIT, amount_nano, available)
            # Apply: legs leaf first, each account's buckets in consumption order.
            legs: list[HoldLeg] = []
            left = amount_nano
            for acc in funding:
                if left == 0:
                    break
                picked = grantmath.allocate((self.buckets[i] for i in acc.bucket_ids), left)
                for bucket, take in picked:
                    bucket.held_nano += take
                    legs.append(HoldLeg(bucket.id, acc.id, take))
                    left -= take
                    acc.held_nano += take
            assert left == 0, (left, amount_nano)
            if self.marks is not None:
                self._mark_legs(legs)
            for b in touched:
                b.held_nano += amount_nano
            if delegations:
                self._shift_delegated(scopes, -amount_nano, now_ms)
            # What this key may still spend with the hold in place: credit, capped by the
            # tightest budget it is checked against (the balance header's figure).
            after = available - amount_nano
            for b in touched:
                if b.scope not in parents_in_hold:
                    after = min(after, max(0, b.room_nano))
            h = Hold(
                id=request_id,
                chain=tuple(path),
                scopes=tuple(scopes),
                amount_nano=amount_nano,
                legs=legs,
                created_ms=now_ms,
                expires_ms=now_ms + ttl_ms,
                available_after_nano=after,
            )
            # Nothing is journalled: held amounts are not stored (see `restore`), and the hold
            # is written once, when it closes.
            self.holds[request_id] = h
            heapq.heappush(self._hold_heap, (h.expires_ms, h.id))
            return h

    def _shift_delegated(self, scopes: Iterable[str], delta_nano: int, now_ms: int) -> None:
        """A delegated child's unused room changed by -delta: its parent's reservation follows."""
        if delta_nano == 0:
            return
        for s in scopes:
            parent = self.scope_parent.get(s)
            if parent is None:
                continue
            for pb in self._budgets_of(parent, now_ms):
                pb.delegated_nano += delta_nano
                assert pb.delegated_nano >= 0, pb

    def _release(self, h: Hold, price_nano: int, now_ms: int) -> None:
        """Charge `price_nano` from the hold's legs in order and release the rest.

        Only what is stored is journalled (by `_post`, and budgets' spend): held amounts are
        not stored."""
        revenue = self.operator_account(AccountKind.REVENUE)
        left = price_nano
        if self.marks is not None:
            self._mark_legs(h.legs)
        for leg in h.legs:
            b = self.buckets[leg.bucket_id]
            acc = self.accounts[leg.account_id]
            b.held_nano -= leg.amount_nano
            acc.held_nano -= leg.amount_nano
            assert b.held_nano >= 0 and acc.held_nano >= 0
            take = min(leg.amount_nano, left)
            left -= take
            if take:
                self._post(
                    TransferKind.SPEND,
                    acc,
                    revenue,
                    take,
                    now_ms,
                    debit_bucket=b,
                    hold_id=h.id,
                    model=h.model,
                    producer=h.producer,
                )
            if b.ended:  # its period is over: what the hold kept and did not spend expires
                freed = leg.amount_nano - take
                if freed:
                    expired = self.operator_account(AccountKind.EXPIRED)
                    self._post(TransferKind.EXPIRE, acc, expired, freed, now_ms, debit_bucket=b)
                self._maybe_close(b)
        assert left == 0
        for s in h.scopes:
            if s not in self.budgets:
                continue
            for b in self._budgets_of(s, now_ms):
                b.held_nano -= h.amount_nano
                b.spent_nano += price_nano
                assert b.held_nano >= 0, b
                if price_nano:
                    self._dirty_budget(b)
        if self.scope_parent:
            self._shift_delegated(h.scopes, h.amount_nano - price_nano, now_ms)

    def _close(self, h: Hold, status: HoldStatus, now_ms: int) -> None:
        h.status = status
        h.closed_ms = now_ms
        h.legs = ()  # released: a closed hold reserves nothing (and is cheaper to keep)
        del self.holds[h.id]
        if len(self._hold_heap) > 2 * len(self.holds) + HOLD_HEAP_SLACK:
            self._hold_heap = [(o.expires_ms, o.id) for o in self.holds.values()]
            heapq.heapify(self._hold_heap)
        self.closed_holds[h.id] = h
        if len(self.closed_holds) > CLOSED_HOLDS_KEPT:
            self.closed_holds.popitem(last=False)
        self.journal.holds[h.id] = h
        self.seq += 1

    def find_hold(self, hold_id: str) -> Hold | None:
        return self.holds.get(hold_id) or self.closed_holds.get(hold_id)

    def remember_hold(self, h: Hold) -> None:
        """Cache a closed hold loaded from the store, so retries answer from memory."""
        assert h.status is not HoldStatus.OPEN, "the store holds closed holds only"
        with self._lock:
            if h.id not in self.holds:
                self.closed_holds[h.id] = h

    def settle(
        self,
        hold_id: str,
        *,
        price_nano: int,
        cost_nano: int,
        producer: str,
        model: str,
        now_ms: int,
    ) -> Hold:
        """Post the actual price (at most the hold; any excess is recorded as clamped, not
        charged) to revenue and the producer's cost to its payable; release the rest."""
        check_amount(price_nano, allow_zero=True)
        check_amount(cost_nano, allow_zero=True)
        with self._lock:
            h = self.find_hold(hold_id)
            if h is None:
                raise NotFound(f"no hold {hold_id}")
            if h.status is not HoldStatus.OPEN:
                probe = Hold(h.id, (), (), 0, [], 0, 0, status=HoldStatus.SETTLED)
                probe.price_nano, probe.cost_nano = price_nano, cost_nano
                probe.producer, probe.model = producer, model
                if h.status is HoldStatus.SETTLED and probe.settle_hash() == h.settle_hash():
                    return h
                if h.status is HoldStatus.SETTLED:
                    raise IdempotencyConflict(f"hold {hold_id} was settled with another price")
                raise HoldClosed(hold_id, str(h.status))
            check_text(producer, "a producer")
            check_text(model, "a model")
            charged = min(price_nano, h.amount_nano)
            h.clamped_nano = price_nano - charged
            h.price_nano = charged
            h.cost_nano = cost_nano
            h.producer = producer
            h.model = model
            self._release(h, charged, now_ms)
            if cost_nano:
                accrued = self._accrued_costs.get((producer, model))
                if accrued is None:
                    self.payable_for(producer, now_ms)  # the account exists from now on
                    self._accrued_costs[(producer, model)] = [cost_nano, now_ms]
                else:
                    accrued[0] += cost_nano
                    accrued[1] = max(accrued[1], now_ms)
            self._close(h, HoldStatus.SETTLED, now_ms)
            return h

    def _post_accrued_costs(self) -> None:
        if not self._accrued_costs:
            return
        costs, self._accrued_costs = self._accrued_costs, {}
        expense = self.operator_account(AccountKind.EXPENSE)
        for (producer, model), (amount_nano, ts_ms) in costs.items():
            payable = self.payable_for(producer, ts_ms)
            while amount_nano > 0:  # a transfer is at most MAX_AMOUNT_NANO, like any other
                part = min(amount_nano, MAX_AMOUNT_NANO)
                amount_nano -= part
                self._post(
                    TransferKind.COST, expense, payable, part, ts_ms,
                    model=model, producer=producer,
                )  # fmt: skip

    def void(self, hold_id: str, *, now_ms: int) -> Hold:
        with self._lock:
            h = self.find_hold(hold_id)
            if h is None:
                raise NotFound(f"no hold {hold_id}")
            if h.status is HoldStatus.VOIDED:
                return h
            if h.status is not HoldStatus.OPEN:
                raise HoldClosed(hold_id, str(h.status))
            self._release(h, 0, now_ms)
            self._close(h, HoldStatus.VOIDED, now_ms)
            return h

    def extend(self, hold_id: str, *, ttl_ms: int, now_ms: int) -> Hold:
        """Push a long stream's hold expiry to now + ttl (never earlier than it was)."""
        if not 0 < ttl_ms <= 86_400_000:
            raise InvalidRequest("hold ttl must be in (0, 1 day]")
        with self._lock:
            h = self.holds.get(hold_id)
            if h is None:
                found = self.find_hold(hold_id)
                raise HoldClosed(hold_id, str(found.status)) if found else NotFound(hold_id)
            if now_ms + ttl_ms > h.expires_ms:
                h.expires_ms = now_ms + ttl_ms
                heapq.heappush(self._hold_heap, (h.expires_ms, h.id))
            return h

    # ------------------------------------------------------------------ sweep

    def sweep(self, now_ms: int, *, max_items: int = SWEEP_TURN_ITEMS) -> dict[str, int]:
        """One turn: expire holds, step grants and expire delegated budgets that are due, at
        most `max_items` of each. `more` (0/1) says whether anything due is left for another
        turn."""
        with self._lock:
            n_holds = n_scopes = 0
            while self._hold_heap and self._hold_heap[0][0] <= now_ms and n_holds < max_items:
                exp, hid = heapq.heappop(self._hold_heap)
                h = self.holds.get(hid)
                if h is None or h.expires_ms != exp:
                    continue
                self._release(h, 0, now_ms)
                self._close(h, HoldStatus.EXPIRED, now_ms)
                n_holds += 1
            before = self.seq
            self._advance_grants(now_ms, max_items)
            heap = self._scope_expiry_heap
            while heap and heap[0][0] <= now_ms and n_scopes < max_items:
                _, scope = heapq.heappop(heap)
                own = self.budgets.get(scope, {}).get(Period.TOTAL)
                if own is not None and not own.revoked:
                    n_scopes += len(self._revoke_tree(scope, now_ms))
            done = not self._hold_heap or self._hold_heap[0][0] > now_ms
            if done and now_ms > self.last_sweep_ms:
                self.last_sweep_ms = now_ms
                self.journal.meta_dirty = True
                self.seq += 1
            more = not done or self.grants_due(now_ms) or bool(heap and heap[0][0] <= now_ms)
            return {
                "holds_expired": n_holds,
                "grant_events": int(self.seq != before),
                "scopes_expired": n_scopes,
                "more": int(more),
            }

    # ------------------------------------------------------------------ reads

    def balance(self, account_id: int, now_ms: int) -> BalanceView:
        with self._lock:
            self._post_accrued_costs()
            acc = self.account(account_id)
            if self._grant_heap and self._grant_heap[0][0] <= now_ms:
                funding = self._payer(acc.id).funding if acc.kind in CUSTOMER_KINDS else (acc,)
                self._advance_accounts(funding, now_ms)
            chain_avail = (
                self._payer(account_id).available_nano()
                if acc.kind in CUSTOMER_KINDS
                else acc.available_nano
            )
            spent = {
                str(b.period): b.spent_nano for b in self._budgets_of(account_scope(acc.id), now_ms)
            }
            return BalanceView(
                account_id=acc.id,
                balance_nano=acc.balance_nano,
                held_nano=acc.held_nano,
                available_nano=acc.available_nano,
                chain_available_nano=chain_avail,
                spent_this_period_nano=spent,
            )

    def open_credit(self, account_id: int) -> tuple[list[Bucket], list[Grant]]:
        """Copies of the account's open buckets (in consumption order) and active grants,
        taken together, so held and remaining figures agree."""
        with self._lock:
            acc = self.account(account_id)
            buckets = [replace(self.buckets[i]) for i in acc.bucket_ids if i in self.buckets]
            ids = self._account_grants.get(account_id, ())
            grants = [replace(g) for i in ids if (g := self.grants[i]).active]
            return buckets, grants

    def chain_available(self, account_id: int) -> int:
        """What a hold on this account could draw now, parents included: the balance header's
        figure, without the rest of `balance()` (budgets, grant rolls) on the hot path."""
        with self._lock:
            return self._payer(account_id).available_nano()

    def spendable(self, account_id: int, key_scopes: Iterable[str], now_ms: int) -> int:
        """What a request paid by `account_id` under these key scopes may still spend: the
        chain's credit, capped by the tightest budget room a hold would be checked against
        (the balance header's figure: a key sees its own limit, not the organisation's)."""
        with self._lock:
            payer = self._payer(account_id)
            left = payer.available_nano()
            scopes = list(payer.scopes)
            for k in key_scopes:
                k = k if k.startswith("key:") else f"key:{k}"
                scopes += self._key_lineage(k) if k in self.scope_parent else [k]
            parents = {self.scope_parent[s] for s in scopes if s in self.scope_parent}
            for s in scopes:
                if s in self.budgets and s not in parents:
                    for b in self._budgets_of(s, now_ms):
                        left = min(left, b.room_nano)
            return max(0, left)

    def all_budgets(self, now_ms: int) -> list[Budget]:
        """Every budget, rolled to `now_ms` (for audits; O(budgets))."""
        with self._lock:
            return [self._roll(b, now_ms) for per in self.budgets.values() for b in per.values()]

    def budget_view(self, scope: str, now_ms: int) -> list[dict[str, Any]]:
        with self._lock:
            return [b.public() for b in self._budgets_of(scope, now_ms)]

    # ------------------------------------------------------------------ invariants

    def check(self, now_ms: int) -> list[str]:
        """Every in-memory invariant (`auditor.fact_violations`); empty means sound."""
        return auditor.fact_violations(self.facts(now_ms))

    def facts(self, now_ms: int) -> auditor.Facts:
        """A copy of what the invariants read (`auditor.facts`), consistent: under the lock."""
        with self._lock:
            self._post_accrued_costs()
            return auditor.facts(self, now_ms)
