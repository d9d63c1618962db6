"""The check's copy of the engine, taken in slices across event-loop turns (issue 13).

Copying every account and bucket at one instant costs about 0.5-1 us an object on the event
loop: 50-110 ms at 100,000 tenants, a stall of paying traffic. Instead `SlicedCopy` reads
`CHECK_SLICE_OBJECTS` objects a loop turn while the engine marks each account and bucket
whose checked figures change (`Engine.marks`: balances, held amounts, remaining credit, an
end, a creation, a removal). At the commit boundary the store snapshot is opened at (the
writer's cut) only the marked objects are read again, with the open holds and the budgets
(bounded by requests in flight, and copied whole as before). An object not marked has not
changed since the copy began, so its sliced figures are its figures at the cut. Merging the
two (O(objects)) runs on the check's thread.

Marking is bounded (`CHECK_MARKS_MAX`): past it the engine stops marking and the cut copies
everything at once, as before this module (a month boundary renewing every grant during a
check, say). A check that ends early (cancelled, timed out, failed) stops marking too.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Mapping
from itertools import compress
from operator import attrgetter
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from tokenworks.ledger import auditor
from tokenworks.ledger.domain import AccountKind, LedgerBusy, LedgerError

if TYPE_CHECKING:
    from tokenworks.ledger.domain import Account, Bucket
    from tokenworks.ledger.engine import Engine

# Accounts or buckets read in one loop turn: about 2.5 ms of the loop at ~0.5 us an object.
CHECK_SLICE_OBJECTS = 5_000
# Objects marked changed during one copy before the cut falls back to a whole copy: re-reading
# them at the cut costs about what slicing saved at this size (~10-20 ms), and the set stays
# bounded whatever happens to the check.
CHECK_MARKS_MAX = 20_000

T = TypeVar("T")
_ID, _BALANCE, _HELD, _KIND = (
    attrgetter("id"), attrgetter("balance_nano"), attrgetter("held_nano"), attrgetter("kind")
)  # fmt: skip
_ACCOUNT, _REMAINING, _ENDED, _EXPIRES = (
    attrgetter("account_id"), attrgetter("remaining_nano"), attrgetter("ended"),
    attrgetter("expires_ms"),
)  # fmt: skip


_COLUMNS = (
    "account_ids", "balances", "account_held", "kinds", "bucket_ids", "bucket_accounts",
    "remaining", "bucket_held", "ended", "expires_ms",
)  # fmt: skip


class Marks:
    """Ids of the accounts and buckets changed (created, removed) since a copy began."""

    __slots__ = ("accounts", "buckets", "limit", "overflowed")

    def __init__(self, limit: int) -> None:
        self.accounts: set[int] = set()
        self.buckets: set[int] = set()
        self.limit = limit
        self.overflowed = False

    def room(self) -> bool:
        """False once past the limit: the ids are dropped and the copy is whole at the cut."""
        if len(self.accounts) + len(self.buckets) <= self.limit:
            return True
        self.overflowed = True
        self.accounts.clear()
        self.buckets.clear()
        return False


AccountFact = tuple[int, int, AccountKind]  # balance, held, kind
BucketFact = tuple[int, int, int, bool, int | None]  # account, remaining, held, ended, expiry


class Taken(NamedTuple):
    """What the cut read on the loop: the marked objects' figures now (None: removed), the
    holds and budgets, or a whole copy (`whole`) when marking had stopped."""

    accounts: dict[int, AccountFact | None]
    buckets: dict[int, BucketFact | None]
    holds: list[auditor.HoldFact]
    budgets: list[auditor.BudgetFact]
    spends: list[tuple[str, str, int, int]]
    grants_due: bool
    last_sweep_ms: int
    now_ms: int
    whole: auditor.Cut | None


class SlicedCopy:
    """One check's copy: `copy` (slices, across loop turns), then `cut` at the commit
    boundary (O(changes)), then `assemble` on a thread. One at a time per engine; the check
    calls `abandon` when it ends, however it ends, so marking never outlives it."""

    def __init__(
        self,
        engine: Engine,
        *,
        slice_objects: int | None = None,
        marks_max: int | None = None,
    ) -> None:
        self.engine = engine
        self.slice_objects = slice_objects or CHECK_SLICE_OBJECTS
        self.abandoned = False
        self.account_ids: list[int] = []
        self.balances: list[int] = []
        self.account_held: list[int] = []
        self.kinds: list[AccountKind] = []
        self.bucket_ids: list[int] = []
        self.bucket_accounts: list[int] = []
        self.remaining: list[int] = []
        self.bucket_held: list[int] = []
        self.ended: list[bool] = []
        self.expires_ms: list[int | None] = []
        # A young list is walked whole by the collector's next pass (a cache miss per
        # element, the GIL held): 200,000 figures cost one pass 100-200 ms under load. Passed
        # to the oldest generation while empty, the columns are not walked as they grow.
        gc.collect(1)
        with engine._lock:
            if engine.marks is not None:
                raise LedgerBusy("another check is copying the ledger")
            self.marks = engine.marks = Marks(marks_max or CHECK_MARKS_MAX)
            # References only (a C copy, no figure read): the slices read them later, and
            # a change between marks the object.
            self._accounts: list[Account] = list(engine.accounts.values())
            self._buckets: list[Bucket] = list(engine.buckets.values())
        self.turns = 0  # loop turns the slices took
        self.recopied = 0  # objects read again at the cut
        self.whole = False  # whether the cut copied everything (marking had stopped)

    def stop(self) -> None:
        """Stop marking (if this copy still is)."""
        with self.engine._lock:
            if self.engine.marks is self.marks:
                self.engine.marks = None

    def abandon(self) -> None:
        """The check is over: stop marking, and a cut still queued copies nothing. The
        copied figures are let go (a check's result may keep its copy for its counts)."""
        self.abandoned = True
        self.stop()
        self._accounts, self._buckets = [], []
        self.marks.accounts, self.marks.buckets = set(), set()
        for name in _COLUMNS:
            setattr(self, name, [])

    def marking(self) -> bool:
        return self.engine.marks is self.marks

    async def copy(self) -> None:
        """Read every account and bucket that existed when the copy began, a slice a loop
        turn. Stops early once marking has stopped: the cut copies everything then."""
        n = self.slice_objects
        for start in range(0, len(self._accounts), n):
            if not await self._turn(self._read_accounts, self._accounts[start : start + n]):
                return
        for start in range(0, len(self._buckets), n):
            if not await self._turn(self._read_buckets, self._buckets[start : start + n]):
                return
        self._accounts, self._buckets = [], []

    async def _turn(self, read: Callable[[list[T]], None], objs: list[T]) -> bool:
        if not self.marking():
            return False
        with self.engine._lock:
            read(objs)
        self.turns += 1
        await asyncio.sleep(0)
        return True

    def _read_accounts(self, objs: list[Account]) -> None:
        self.account_ids += map(_ID, objs)
        self.balances += map(_BALANCE, objs)
        self.account_held += map(_HELD, objs)
        self.kinds += map(_KIND, objs)

    def _read_buckets(self, objs: list[Bucket]) -> None:
        self.bucket_ids += map(_ID, objs)
        self.bucket_accounts += map(_ACCOUNT, objs)
        self.remaining += map(_REMAINING, objs)
        self.bucket_held += map(_HELD, objs)
        self.ended += map(_ENDED, objs)
        self.expires_ms += map(_EXPIRES, objs)

    def cut(self, now_ms: int) -> Taken:
        """At the commit boundary (under the writer's cut): read again what changed since
        the copy began, and the holds and budgets. Ends marking."""
        if self.abandoned:  # its check is gone: copy nothing
            raise LedgerError("this check's copy was abandoned")
        e = self.engine
        with e._lock:
            e._post_accrued_costs()  # (none left at the writer's cut: the batch posted them)
            self.whole = not self.marking()  # past its bound, or a second cut
            self.stop()
            if self.whole:
                whole = auditor.capture(e, now_ms)
                return Taken({}, {}, [], [], [], False, 0, now_ms, whole)
            accounts, buckets = e.accounts, e.buckets
            acc_facts: dict[int, AccountFact | None] = {}
            for i in self.marks.accounts:
                a = accounts.get(i)
                acc_facts[i] = None if a is None else (a.balance_nano, a.held_nano, a.kind)
            bucket_facts: dict[int, BucketFact | None] = {}
            for i in self.marks.buckets:
                b = buckets.get(i)
                bucket_facts[i] = None if b is None else (
                    b.account_id, b.remaining_nano, b.held_nano, b.ended, b.expires_ms
                )  # fmt: skip
            self.recopied = len(acc_facts) + len(bucket_facts)
            return Taken(
                acc_facts,
                bucket_facts,
                auditor.hold_facts(e),
                auditor.budget_facts(e),
                auditor.budget_spends(e, now_ms),
                e.grants_due(now_ms),
                e.last_sweep_ms,
                now_ms,
                None,
            )

    def assemble(self, t: Taken) -> auditor.Cut:
        """The copy at the cut: the sliced figures, the changed ones replaced (O(objects);
        call on a thread)."""
        if t.whole is not None:
            return t.whole
        ids, balances, held, kinds = _patched(
            self.account_ids, [self.balances, self.account_held, self.kinds], t.accounts
        )
        bids, owners, remaining, bheld, ended, expires = _patched(
            self.bucket_ids,
            [self.bucket_accounts, self.remaining, self.bucket_held, self.ended, self.expires_ms],
            t.buckets,
        )
        facts = auditor.Facts(
            ids, balances, held, kinds, bids, owners, remaining, bheld, ended, expires,
            t.holds, t.budgets, t.grants_due, t.last_sweep_ms, t.now_ms,
        )  # fmt: skip
        return auditor.Cut(facts, t.spends, t.now_ms)


# Up to this many changed objects are patched into the copy in place (a C search each);
# more are merged by one pass. In place makes no new lists of every object: fresh big lists
# are what the collector's young passes walk, holding the GIL, while the check goes on.
PATCH_IN_PLACE_MAX = 256


def _patched(
    ids: list[int], cols: list[list[Any]], patch: Mapping[int, tuple[Any, ...] | None]
) -> list[list[Any]]:
    """`ids` and its columns with the patch applied: a patched id's figures replaced, or
    removed (None); ids not in the copy appended."""
    if not patch:
        return [ids, *cols]
    out = [ids, *cols]
    if len(patch) > PATCH_IN_PLACE_MAX:
        keep = [i not in patch for i in ids]
        out = [list(compress(col, keep)) for col in out]
        missing = dict(patch)
    else:
        missing, gone = {}, []
        for i, figures in patch.items():
            try:
                at = ids.index(i)
            except ValueError:  # made after the copy began
                missing[i] = figures
                continue
            if figures is None:
                gone.append(at)
            else:
                for col, v in zip(cols, figures, strict=True):
                    col[at] = v
        for at in sorted(gone, reverse=True):
            for col in out:
                del col[at]
    for i, figures in missing.items():
        if figures is not None:
            for col, v in zip(out, (i, *figures), strict=True):
                col.append(v)
    return out
