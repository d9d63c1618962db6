"""Statements: what happened to one account over a period, from its transfers.

Opening and closing balances are sums of the account's transfers before each end, so a
statement is reproducible from the store alone and its lines add up by construction
(asserted: opening + in - out == closing).
"""

from __future__ import annotations

import csv
import io
from typing import Any

from tokenworks.ledger.periods import from_ms
from tokenworks.money import format_nano

IN_LINES = {"top_up": "top_ups", "grant": "grants", "refill": "grants", "transfer": "transfers_in"}
OUT_LINES = {"transfer": "transfers_out", "expire": "expired", "spend": "spend"}


def build_statement(
    account: dict[str, Any],
    since_ms: int,
    until_ms: int,
    opening_nano: int,
    closing_nano: int,
    movements: list[tuple[str, int, str | None, int, str | None]],
) -> dict[str, Any]:
    lines = {
        k: 0 for k in ("top_ups", "grants", "transfers_in", "transfers_out", "expired", "spend")
    }
    other_in = other_out = 0
    by_model: dict[str, dict[str, Any]] = {}
    holds_by_model: dict[str, set[str]] = {}
    total_in = total_out = 0
    for kind, incoming, model, amount, hold_id in movements:
        if incoming:
            total_in += amount
            line = IN_LINES.get(kind)
            if line:
                lines[line] += amount
            else:
                other_in += amount
            continue
        total_out += amount
        line = OUT_LINES.get(kind)
        if line:
            lines[line] += amount
        else:
            other_out += amount
        if kind == "spend":
            name = model or "unknown"
            m = by_model.setdefault(name, {"spend_nano": 0, "requests": 0})
            m["spend_nano"] += amount
            if hold_id is not None:
                holds_by_model.setdefault(name, set()).add(hold_id)
    for name, ids in holds_by_model.items():
        by_model[name]["requests"] = len(ids)
    assert opening_nano + total_in - total_out == closing_nano, "statement does not add up"
    out: dict[str, Any] = {
        "account": account,
        "since": from_ms(since_ms).isoformat(),
        "until": from_ms(until_ms).isoformat(),
        "opening_nano": opening_nano,
        **{f"{k}_nano": v for k, v in lines.items()},
        "other_in_nano": other_in,
        "other_out_nano": other_out,
        "closing_nano": closing_nano,
        "spend_by_model": dict(sorted(by_model.items())),
    }
    out["display"] = {
        k.removesuffix("_nano"): format_nano(v) for k, v in out.items() if k.endswith("_nano")
    }
    return out


def statement_csv(statement: dict[str, Any]) -> str:
    """One row per line of the statement: line, model, amount_nano, amount, requests."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["line", "model", "amount_nano", "amount", "requests"])
    for key, value in statement.items():
        if key.endswith("_nano"):
            w.writerow([key.removesuffix("_nano"), "", value, format_nano(value), ""])
    for model, m in statement["spend_by_model"].items():
        w.writerow(["spend", model, m["spend_nano"], format_nano(m["spend_nano"]), m["requests"]])
    return buf.getvalue()
