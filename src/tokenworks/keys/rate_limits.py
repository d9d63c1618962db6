"""A consumer's rate limits (requests and tokens per minute, concurrent requests): the value
a key or an account carries and the stores keep. Enforcing them is `dispatch/ratelimit.py`'s."""

from __future__ import annotations

from dataclasses import dataclass, fields

# Far beyond any real limit, and inside int64 (the column type) with room to add.
MAX_RATE_LIMIT = 10**12
FIELDS = ("rpm", "tpm", "max_concurrency")


@dataclass(frozen=True, slots=True)
class RateLimits:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None

    def no_looser_than(self, parent: RateLimits) -> bool:
        """A child key's limits may only narrow its parent's (each unset one inherits)."""
        return not self.looser_fields(parent)

    def looser_fields(self, parent: RateLimits) -> list[str]:
        """The fields where this is looser than `parent` (unset counts as unlimited)."""
        out = []
        for f in FIELDS:
            mine, theirs = getattr(self, f), getattr(parent, f)
            if theirs is not None and (mine is None or mine > theirs):
                out.append(f)
        return out

    def inherit(self, parent: RateLimits) -> RateLimits:
        """Each field this leaves unset takes the parent's value."""
        mine = [getattr(self, f) for f in FIELDS]
        theirs = [getattr(parent, f) for f in FIELDS]
        return RateLimits(*(m if m is not None else t for m, t in zip(mine, theirs, strict=True)))

    @property
    def empty(self) -> bool:
        return self.rpm is None and self.tpm is None and self.max_concurrency is None

    def public(self) -> dict[str, int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
