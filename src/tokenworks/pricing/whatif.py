"""What-if: re-price recorded usage under a changed price book and show the difference.

Both sides are re-priced from the same records: the baseline with today's book, the scenario with
today's book plus the scenario's changes, so the difference is the scenario alone (recorded
amounts may carry older prices). Token counts are kept as recorded, also for a request moved to
another model: a different model would have used a different number of tokens, which no price
book can know.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from functools import partial
from pathlib import Path

import msgspec
import yaml

from tokenworks.metering.usage import UsageRecord
from tokenworks.money import format_nano, parse_factor
from tokenworks.pricing.quote import DeploymentKey, Pricer, PricingError
from tokenworks.pricing.spec import (
    Move,
    ScaleCost,
    ScenarioSpec,
    SetCost,
    SetTariff,
    check_time,
    check_zone,
)

TOTAL = "TOTAL"


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the place."""


def load_scenario(path: str | Path) -> ScenarioSpec:
    path = Path(path)
    return loads_scenario(path.read_text(), source=str(path))


def loads_scenario(text: str, source: str = "<scenario>") -> ScenarioSpec:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{source}: invalid YAML: {exc}") from exc
    try:
        return msgspec.convert(raw, ScenarioSpec, strict=False)
    except msgspec.ValidationError as exc:
        raise ScenarioError(f"{source}: {exc}") from exc


def _matches(change: ScaleCost | Move, key: DeploymentKey) -> bool:
    model, producer, upstream = key
    return (
        (change.model is None or change.model == model)
        and (change.producer is None or change.producer == producer)
        and (change.upstream_model is None or change.upstream_model == upstream)
    )


def apply_scenario(pricer: Pricer, scenario: ScenarioSpec) -> Pricer:
    """Today's pricer with the scenario's changes applied in order."""
    for change in scenario.changes:
        if isinstance(change, ScaleCost):
            factor = parse_factor(change.factor)
            pricer = pricer.with_cost_factor(factor, partial(_matches, change))
        elif isinstance(change, Move):
            for key in pricer.deployment_keys():
                if not _matches(change, key):
                    continue
                target = (key[0], change.to_producer, change.to_model)
                if change.cost is not None or target not in pricer.deployment_keys():
                    pricer = pricer.with_deployment(*target, change.cost)
        elif isinstance(change, SetCost):
            pricer = pricer.with_cost(change.producer, change.upstream_model, change.cost)
        elif isinstance(change, SetTariff):
            pricer = pricer.with_tariff(change.name, change.tariff)
    return pricer


def _record_time(record: UsageRecord) -> datetime:
    seconds, ms = divmod(record.ts_ms, 1000)
    return datetime.fromtimestamp(seconds, UTC) + timedelta(milliseconds=ms)


def _moved(
    scenario: ScenarioSpec, key: DeploymentKey, at: datetime
) -> tuple[DeploymentKey, datetime]:
    for change in scenario.changes:
        if isinstance(change, Move) and _matches(change, key):
            key = (key[0], change.to_producer, change.to_model)
            if change.at_local_time is not None:
                minutes = check_time(change.at_local_time)
                local = at.astimezone(check_zone(change.tz))
                at = datetime.combine(local.date(), time(minutes // 60, minutes % 60), local.tzinfo)
    return key, at


@dataclass(slots=True)
class WhatIfRow:
    account_id: str
    public_model: str
    requests: int = 0
    base_cost_nano: int = 0
    new_cost_nano: int = 0
    base_price_nano: int = 0
    new_price_nano: int = 0

    @property
    def delta_cost_nano(self) -> int:
        return self.new_cost_nano - self.base_cost_nano

    @property
    def delta_price_nano(self) -> int:
        return self.new_price_nano - self.base_price_nano

    def add(self, other: WhatIfRow) -> None:
        self.requests += other.requests
        self.base_cost_nano += other.base_cost_nano
        self.new_cost_nano += other.new_cost_nano
        self.base_price_nano += other.base_price_nano
        self.new_price_nano += other.new_price_nano


@dataclass(slots=True)
class WhatIf:
    """Per (account, public model) rows, their total, and the records that could not be priced."""

    scenario: str
    currency: str
    rows: list[WhatIfRow]
    total: WhatIfRow
    skipped: list[tuple[str, str]] = field(default_factory=list)


def reprice(
    records: Iterable[UsageRecord],
    pricer: Pricer,
    scenario: ScenarioSpec,
    *,
    tariff_for: Callable[[str | None], str] | None = None,
) -> WhatIf:
    """Re-price `records` with today's `pricer` and with the scenario; sum by account and model."""
    changed = apply_scenario(pricer, scenario)
    tariff_of = tariff_for or pricer.tariff_for
    rows: dict[tuple[str, str], WhatIfRow] = {}
    skipped: list[tuple[str, str]] = []
    for record in records:
        if record.producer is None or record.upstream_model is None:
            skipped.append((record.request_id, "not dispatched to a producer"))
            continue
        key = (record.public_model, record.producer, record.upstream_model)
        at = _record_time(record)
        tariff = tariff_of(record.account_id)
        new_key, new_at = _moved(scenario, key, at)
        try:
            base = pricer.quote(
                *key, record.usage, at=at, service_tier=record.service_tier, tariff=tariff
            )
            new = changed.quote(
                *new_key, record.usage, at=new_at, service_tier=record.service_tier, tariff=tariff
            )
        except PricingError as exc:
            skipped.append((record.request_id, str(exc)))
            continue
        account = record.account_id or "-"
        row = rows.setdefault(
            (account, record.public_model), WhatIfRow(account, record.public_model)
        )
        row.add(WhatIfRow(account, record.public_model, 1, base.cost_nano, new.cost_nano,
                          base.price_nano, new.price_nano))  # fmt: skip
    ordered = [rows[k] for k in sorted(rows)]
    total = WhatIfRow(TOTAL, "")
    for row in ordered:
        total.add(row)
    return WhatIf(scenario.name, pricer.currency, ordered, total, skipped)


def _percent(delta: int, base: int) -> str:
    """delta/base as a signed percentage with one decimal, from integers (no float)."""
    if base == 0:
        return "n/a" if delta else "0.0%"
    tenths = (abs(delta) * 1000 * 2 + base) // (2 * base)
    sign = "-" if delta < 0 else "+"
    return f"{sign}{tenths // 10}.{tenths % 10}%"


def format_table(result: WhatIf) -> str:
    """The result as a fixed-width text table, amounts as exact decimal strings."""
    head = ("account", "model", "requests", "cost", "new cost", "Δ cost", "price", "new price",
            "Δ price", "Δ price %")  # fmt: skip

    def cells(row: WhatIfRow) -> tuple[str, ...]:
        return (
            row.account_id,
            row.public_model,
            str(row.requests),
            format_nano(row.base_cost_nano),
            format_nano(row.new_cost_nano),
            _signed(row.delta_cost_nano),
            format_nano(row.base_price_nano),
            format_nano(row.new_price_nano),
            _signed(row.delta_price_nano),
            _percent(row.delta_price_nano, row.base_price_nano),
        )

    body = [cells(r) for r in result.rows]
    total = cells(result.total)
    widths = [max(len(c[i]) for c in [head, *body, total]) for i in range(len(head))]

    def line(c: tuple[str, ...]) -> str:
        left = 2  # account and model are text, the rest numbers
        return "  ".join(
            v.ljust(w) if i < left else v.rjust(w)
            for i, (v, w) in enumerate(zip(c, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [f"scenario: {result.scenario}  (amounts in {result.currency})", line(head), rule]
    out += [line(c) for c in body]
    out += [rule, line(total)]
    if result.skipped:
        out.append(f"skipped {len(result.skipped)} record(s); first: {result.skipped[0][1]}")
    return "\n".join(out) + "\n"


def _signed(amount_nano: int) -> str:
    return ("+" if amount_nano > 0 else "") + format_nano(amount_nano)
