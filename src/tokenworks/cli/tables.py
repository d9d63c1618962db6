"""Terminal tables that read at a glance in 80 columns: human headers, amounts right-aligned
with one number of decimals per column and the currency in the header, ids never cut.

Ids are what the next command needs (`keys revoke`, `topup`), so an id column never shrinks;
free text (names, model lists) gives way first, with an ellipsis.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from rich import box
from rich.console import Console
from rich.table import Table

MIN_DECIMALS = 2  # cents, at least
MAX_DECIMALS = 6  # a micro-unit: one request's price still shows
MIN_TEXT_WIDTH = 6  # a text column cut narrower than this would say nothing
COLUMN_GAP = 3  # between columns: padding either side of the box's separator


@dataclass(frozen=True, slots=True)
class Col:
    header: str
    kind: str = "text"  # text | id | money | count
    optional: bool = False  # left out, last first, when the table would not fit otherwise


def money_column(values: Iterable[str | None]) -> list[str]:
    """Decimal strings with one number of places for the whole column (the fewest that show
    every value, between 2 and 6), so the points line up when right-aligned."""
    parsed: list[Decimal | None] = []
    for v in values:
        try:
            parsed.append(None if v in (None, "") else Decimal(str(v)))
        except InvalidOperation:
            parsed.append(None)
    places = MIN_DECIMALS
    for d in parsed:
        if d is not None:
            exponent = d.normalize().as_tuple().exponent
            if isinstance(exponent, int):
                places = max(places, min(MAX_DECIMALS, -exponent))
    quantum = Decimal(1).scaleb(-places)
    return ["-" if d is None else f"{d.quantize(quantum):,.{places}f}" for d in parsed]


def money(value: str | None) -> str:
    """One amount as the CLI shows it alone: at least cents, every digit it has."""
    return money_column([value])[0]


def count(value: object) -> str:
    return "-" if value is None else f"{int(str(value)):,}"


def when(value: object) -> str:
    """A timestamp to the second, UTC: ISO strings and unix seconds alike."""
    if value in (None, ""):
        return "-"
    if isinstance(value, int | float):
        moment = datetime.fromtimestamp(value, UTC)
    else:
        try:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return str(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def render(console: Console, cols: Sequence[Col], rows: Sequence[Sequence[str]]) -> None:
    """Print a borderless table; money and counts right-aligned, ids and numbers whole, text
    cut with an ellipsis to what the terminal leaves (widest text first)."""
    cells = [list(r) for r in rows]
    for i, col in enumerate(cols):
        if col.kind == "money":
            formatted = money_column(r[i] for r in cells)
            for r, f in zip(cells, formatted, strict=True):
                r[i] = f
    natural = [max([len(c.header), *(len(r[i]) for r in cells)]) for i, c in enumerate(cols)]
    keep = list(range(len(cols)))
    for i in reversed(range(len(cols))):
        if _min_width([cols[k] for k in keep], [natural[k] for k in keep]) <= console.width:
            break
        if cols[i].optional:
            keep.remove(i)
    cols = [cols[k] for k in keep]
    natural = [natural[k] for k in keep]
    cells = [[r[k] for k in keep] for r in cells]
    text = [i for i, c in enumerate(cols) if c.kind == "text"]
    fixed = sum(w for i, w in enumerate(natural) if i not in text)
    room = console.width - fixed - COLUMN_GAP * (len(cols) - 1)
    level = _water_level([natural[i] for i in text], room)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=False)
    for i, col in enumerate(cols):
        width = natural[i] if i not in text else max(min(natural[i], level), len(col.header))
        table.add_column(
            col.header,
            justify="right" if col.kind in ("money", "count") else "left",
            no_wrap=True,
            width=width,
            overflow="ellipsis" if i in text else "ignore",
        )
    for r in cells:
        table.add_row(*r)
    console.print(table, highlight=False)


def _min_width(cols: Sequence[Col], natural: Sequence[int]) -> int:
    """The narrowest the table can be: text columns at their least, the rest whole."""
    widths = [
        min(w, max(MIN_TEXT_WIDTH, len(c.header))) if c.kind == "text" else w
        for c, w in zip(cols, natural, strict=True)
    ]
    return sum(widths) + COLUMN_GAP * (len(cols) - 1)


def _water_level(widths: list[int], room: int) -> int:
    """The largest cap on text columns whose capped widths fit `room` (MIN_TEXT_WIDTH at
    least: past that the table may run wider rather than show nothing)."""
    if sum(widths) <= room:
        return max(widths, default=0)
    level = max(widths, default=0)
    while level > MIN_TEXT_WIDTH and sum(min(w, level) for w in widths) > room:
        level -= 1  # bounded by the widest cell
    return level
