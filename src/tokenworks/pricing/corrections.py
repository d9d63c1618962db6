"""Fixes to the genai-prices dataset that our reader applies, each with its reason.

The dataset is a seed, not the truth (docs/pricing.md). A fix here is a small, named rewrite of
one provider's cards; each one has a test that shows the dataset's answer and ours.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from tokenworks.pricing.schedule import Card
from tokenworks.pricing.windows import Window

_BEIJING = ZoneInfo("Asia/Shanghai")
_WEEKDAYS = frozenset(range(5))
# DeepSeek V4 peak pricing began on this day (genai-prices comment on deepseek-v4-pro).
_DEEPSEEK_V4_PEAK_FROM = datetime(2026, 8, 17, tzinfo=UTC)
_DEEPSEEK_PEAK_MODELS = frozenset({"deepseek-v4-flash", "deepseek-v4-pro", "deepseek-flash"})


def deepseek_peak_weekdays(provider_id: str, model_id: str, cards: list[Card]) -> list[Card]:
    """DeepSeek V4 peak hours are Beijing weekday hours from 2026-08-17.

    genai-prices stores them as daily UTC windows with no date (its constraint is a date *or* a
    window), so it bills weekends at peak and applies today's peak rate to requests made before
    peak pricing existed; its own comments say so (pydantic/genai-prices#582). We re-express
    each window in Asia/Shanghai, Monday to Friday, from the day peak pricing started. Chinese
    public holidays (also off-peak) are still billed at peak: an upper bound.
    """
    if provider_id != "deepseek" or model_id not in _DEEPSEEK_PEAK_MODELS:
        return cards
    fixed: list[Card] = []
    for card in cards:
        window = card.window
        if window is not None and window.days == frozenset(range(7)):
            # Beijing has no DST: a UTC window is the same window 8 hours later, same weekday
            # for the V4 windows (01:00-04:00 and 06:00-10:00 UTC).
            shift = 8 * 60
            start = (window.start_min + shift) % 1440
            end = (window.end_min + shift) % 1440 or 1440
            assert start < end, "a DeepSeek peak window that crosses Beijing midnight"
            card = replace(
                card,
                window=Window(_BEIJING, start, end, _WEEKDAYS),
                effective_from=max(
                    card.effective_from or _DEEPSEEK_V4_PEAK_FROM, _DEEPSEEK_V4_PEAK_FROM
                ),
            )
        fixed.append(card)
    return fixed


CARD_FIXES = (deepseek_peak_weekdays,)


def apply(provider_id: str, model_id: str, cards: list[Card]) -> list[Card]:
    for fix in CARD_FIXES:
        cards = fix(provider_id, model_id, cards)
    return cards
