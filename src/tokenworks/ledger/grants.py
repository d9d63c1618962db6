"""Grant arithmetic: which credit a spend consumes, and what a period's end carries over.

Pure functions over buckets, so the order (priority, earliest expiry, oldest) and the
rollover rule are property-tested on their own.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from tokenworks.ledger.domain import Bucket


def insert_in_order(bucket_ids: list[int], bucket: Bucket, buckets: dict[int, Bucket]) -> None:
    """Keep an account's bucket list sorted by consumption order."""
    keys = [buckets[b].order_key for b in bucket_ids]
    bucket_ids.insert(bisect.bisect_right(keys, bucket.order_key), bucket.id)


def allocate(ordered: Iterable[Bucket], amount_nano: int) -> list[tuple[Bucket, int]]:
    """Take `amount_nano` from the free part of buckets, in the order given.

    Returns (bucket, amount) pairs; their sum is min(amount, total free). Ended buckets have
    no free part (their credit was already expired or carried), so they are skipped.
    """
    assert amount_nano >= 0
    taken: list[tuple[Bucket, int]] = []
    left = amount_nano
    for b in ordered:
        if left == 0:
            break
        if b.ended:
            continue
        free = b.remaining_nano - b.held_nano
        if free <= 0:
            continue
        take = min(free, left)
        taken.append((b, take))
        left -= take
    return taken


def rollover_split(free_nano: int, cap_nano: int | None) -> tuple[int, int]:
    """Split a period's unspent credit into (carried, expired) under the rollover cap."""
    assert free_nano >= 0
    carry = free_nano if cap_nano is None else min(free_nano, max(0, cap_nano))
    return carry, free_nano - carry
