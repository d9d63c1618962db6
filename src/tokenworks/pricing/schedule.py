"""A producer's price schedule for one model: which rate table applies when, and in which variant.

Prices change by date (a new list price from a start date), by time of day (DeepSeek peak and
off-peak), and by request variant (service tier, batch). A schedule is everything known up front,
so choosing a table per request is a few comparisons, not a dataset lookup.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from tokenworks.pricing.rates import RateTable
from tokenworks.pricing.windows import Window

# (upstream service tier or None for standard, batch processing?)
Variant = tuple[str | None, bool]
STANDARD: Variant = (None, False)


@dataclass(frozen=True, slots=True)
class Card:
    """A rate table and when it applies; among active cards the last one wins (genai-prices)."""

    table: RateTable
    effective_from: datetime | None = None
    window: Window | None = None

    def __post_init__(self) -> None:
        assert self.effective_from is None or self.effective_from.tzinfo is not None

    def active(self, at: datetime) -> bool:
        if self.effective_from is not None and at < self.effective_from:
            return False
        return self.window is None or self.window.contains(at)


@dataclass(frozen=True, slots=True)
class Epoch:
    """The cards in force from `start` (when a variant's prices began) until the next epoch."""

    start: datetime | None
    cards: tuple[Card, ...]

    def __post_init__(self) -> None:
        assert self.cards, "an epoch needs at least one card"

    def table_at(self, at: datetime) -> RateTable:
        for card in reversed(self.cards):
            if card.active(at):
                return card.table
        # Before every constraint holds, the first card applies (as in genai-prices).
        return self.cards[0].table


@dataclass(frozen=True, slots=True)
class CostSchedule:
    """All rate tables of one (producer, upstream model), in the producer's currency."""

    currency: str
    source: str
    variants: Mapping[Variant, tuple[Epoch, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert STANDARD in self.variants, "a schedule needs standard prices"
        for epochs in self.variants.values():
            assert epochs and epochs[0].start is None, "the first epoch must be open-ended"
            starts = [e.start for e in epochs[1:] if e.start is not None]
            assert len(starts) == len(epochs) - 1 and starts == sorted(starts)

    def table_at(
        self, at: datetime, service_tier: str | None = None, batch: bool = False
    ) -> RateTable:
        """The table for a request started at `at`; an unknown variant falls back to standard."""
        epochs = (
            self.variants.get((service_tier, batch))
            or self.variants.get((None, batch))
            or self.variants[STANDARD]
        )
        epoch = epochs[0]
        for later in epochs[1:]:
            if at >= later.start:  # type: ignore[operator]  # set on all but the first
                epoch = later
        return epoch.table_at(at)

    def service_tiers(self) -> set[str]:
        return {tier for tier, _ in self.variants if tier is not None}

    def tables(self) -> Iterator[RateTable]:
        for epochs in self.variants.values():
            for epoch in epochs:
                for card in epoch.cards:
                    yield card.table
