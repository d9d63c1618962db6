"""Ledger subcommands: accounts, credits, transfers, budgets, statements and the check.

Like the other admin subcommands they talk to a running gateway over HTTP (the gateway is
the ledger's one writer). Every write sends an idempotency key: `--idempotency-key` when
given, else a fresh one, which is printed when the outcome is unknown so that the very
same command can be retried safely with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

from rich.console import Console
from rich.table import Table

from tokenworks.cli.admin import (
    DEFAULT_URL,
    URL_ENV,
    AdminError,
    add_rate_limit_options,
    admin_key_from_env,
    list_all,
    rate_limits_of,
    request,
    request_bytes,
)

COMMANDS = ("accounts", "grants", "topup", "transfer", "budgets", "statement", "ledger")


def add_subcommands(sub: Any, handler: Any) -> None:
    def common(parser: argparse.ArgumentParser, *, write: bool = False) -> None:
        parser.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL))
        parser.add_argument("--json", action="store_true", help="print raw JSON")
        if write:
            parser.add_argument(
                "--idempotency-key",
                default=None,
                help="reuse to retry this exact operation safely (default: a fresh one)",
            )
        parser.set_defaults(func=handler)

    accounts = sub.add_parser("accounts", help="ledger accounts: organisations, teams, users")
    acc_sub = accounts.add_subparsers(dest="accounts_command", required=True)
    create = acc_sub.add_parser("create", help="open an account")
    create.add_argument("name")
    create.add_argument("--parent", type=int, default=None, help="parent account id")
    create.add_argument("--kind", default=None, help="organisation, team, user or agent")
    create.add_argument(
        "--no-draw",
        action="store_true",
        help="do not let this account's spending draw on its parents' credit",
    )
    add_rate_limit_options(create)
    common(create, write=True)
    limits = acc_sub.add_parser(
        "rate-limits", help="replace an account's rate limits (an option left out: unlimited)"
    )
    limits.add_argument("account", type=int)
    add_rate_limit_options(limits)
    common(limits, write=True)
    listing = acc_sub.add_parser("list", help="accounts with their balances")
    listing.add_argument("--parent", type=int, default=None)
    listing.add_argument("--include-operator", action="store_true")
    common(listing)
    show = acc_sub.add_parser("show", help="one account: balance, credit buckets, budgets")
    show.add_argument("account", type=int)
    common(show)

    grants = sub.add_parser("grants", help="allowances: one-off or recurring")
    grants_sub = grants.add_subparsers(dest="grants_command", required=True)
    add = grants_sub.add_parser("add", help="grant credit to an account")
    add.add_argument("account", type=int)
    add.add_argument("amount", help='decimal, e.g. "10.00"')
    add.add_argument("--expires-at", default=None, help="ISO 8601 or unix seconds")
    add.add_argument("--effective-at", default=None, help="ISO 8601 or unix seconds")
    add.add_argument("--every", choices=("day", "week", "month"), default=None, help="recur")
    add.add_argument("--tz", default="UTC", help="time zone of the recurrence")
    add.add_argument("--rollover", default=None, help='"expire", "all" or a cap like "5.00"')
    add.add_argument("--priority", type=int, default=0, help="lower is spent first")
    common(add, write=True)

    topup = sub.add_parser("topup", help="paid credit into an account")
    topup.add_argument("account", type=int)
    topup.add_argument("amount")
    common(topup, write=True)

    transfer = sub.add_parser("transfer", help="move cash between accounts of one organisation")
    transfer.add_argument("source", type=int, metavar="FROM")
    transfer.add_argument("destination", type=int, metavar="TO")
    transfer.add_argument("amount")
    transfer.add_argument("--actor", default="operator", help='"operator" or "account:<id>"')
    common(transfer, write=True)

    budgets = sub.add_parser("budgets", help="spending limits per account and period")
    budgets_sub = budgets.add_subparsers(dest="budgets_command", required=True)
    set_ = budgets_sub.add_parser("set", help="set an account's limit for a period")
    set_.add_argument("account", type=int)
    set_.add_argument("amount")
    set_.add_argument("--period", choices=("day", "week", "month", "total"), default="month")
    set_.add_argument("--tz", default="UTC")
    common(set_, write=True)
    blist = budgets_sub.add_parser("list", help="an account's budgets")
    blist.add_argument("account", type=int)
    common(blist)

    statement = sub.add_parser("statement", help="an account's statement for a period")
    statement.add_argument("account", type=int)
    statement.add_argument("--since", default=None, help="default: start of this month (UTC)")
    statement.add_argument("--until", default=None, help="default: now")
    statement.add_argument("--csv", action="store_true", help="print CSV")
    common(statement)

    ledger = sub.add_parser("ledger", help="the ledger itself")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    check = ledger_sub.add_parser("check", help="verify every invariant; exit 1 if one fails")
    common(check)


def dispatch(args: argparse.Namespace) -> int:
    admin_key = admin_key_from_env()
    if admin_key is None:
        return 2
    call = _Call(args.url, admin_key, args.json, getattr(args, "idempotency_key", None))
    try:
        return _COMMANDS[args.command](args, call)
    except AdminError as exc:
        print(f"tokenworks: {exc}", file=sys.stderr)
        if call.sent_key is not None and _outcome_unknown(exc):
            print(
                f"tokenworks: to retry safely, rerun with --idempotency-key {call.sent_key}",
                file=sys.stderr,
            )
        return 1
    except OSError as exc:  # a timeout: the write may or may not have been applied
        print(f"tokenworks: {exc or type(exc).__name__}", file=sys.stderr)
        if call.sent_key is not None:
            print(
                f"tokenworks: to retry safely, rerun with --idempotency-key {call.sent_key}",
                file=sys.stderr,
            )
        return 1


def _outcome_unknown(exc: AdminError) -> bool:
    """A 4xx means the gateway refused the write; anything else may have applied it."""
    code = str(exc).partition(":")[0]
    return not (code.isdigit() and 400 <= int(code) < 500)


class _Call:
    def __init__(self, url: str, admin_key: str, raw: bool, key: str | None) -> None:
        self.url = url
        self.admin_key = admin_key
        self.raw = raw
        self.key = key
        self.sent_key: str | None = None
        self.console = Console()

    def get(self, path: str) -> Any:
        return request("GET", path, url=self.url, admin_key=self.admin_key)

    def write(self, path: str, body: dict[str, Any]) -> Any:
        self.sent_key = self.key or str(uuid.uuid4())
        body = {**body, "idempotency_key": self.sent_key}
        return request("POST", path, body, url=self.url, admin_key=self.admin_key)

    def get_text(self, path: str) -> str:
        return request_bytes("GET", path, url=self.url, admin_key=self.admin_key).decode()

    def show(self, result: Any, text: str) -> int:
        if self.raw:
            print(json.dumps(result))
        else:
            self.console.print(text, highlight=False)
        return 0


def _accounts(args: argparse.Namespace, call: _Call) -> int:
    if args.accounts_command == "create":
        body: dict[str, Any] = {"name": args.name, "parent": args.parent}
        if args.kind:
            body["kind"] = args.kind
        if args.no_draw:
            body["draws_on_parent"] = False
        rate_limits = rate_limits_of(args)
        if any(v is not None for v in rate_limits.values()):
            body["rate_limits"] = rate_limits
        r = call.write("/admin/v1/accounts", body)
        parent = f" under {r['parent_id']}" if r["parent_id"] is not None else ""
        return call.show(r, f"account {r['id']}: {r['kind']} {r['name']!r}{parent}")
    if args.accounts_command == "rate-limits":
        r = call.write(f"/admin/v1/accounts/{args.account}/rate_limits", rate_limits_of(args))
        shown = ", ".join(f"{k} {v}" for k, v in rate_limits_of(args).items() if v is not None)
        return call.show(r, f"account {r['account_id']}: {shown or 'no rate limits'}")
    if args.accounts_command == "list":
        query: dict[str, str] = {}
        if args.parent is not None:
            query["parent"] = str(args.parent)
        if args.include_operator:
            query["include_operator"] = "true"
        data = list_all("/admin/v1/accounts", {"url": call.url, "admin_key": call.admin_key}, query)
        r = {"object": "list", "data": data}
        if call.raw:
            return call.show(r, "")
        table = Table("id", "name", "kind", "parent", "available", "held", "spent this period")
        for a in r["data"]:
            b = a["balance"]
            spent = ", ".join(f"{p}: {v}" for p, v in b["spent_by_period"].items())
            table.add_row(
                str(a["id"]),
                a["name"],
                a["kind"],
                "" if a["parent_id"] is None else str(a["parent_id"]),
                b["available"],
                b["held"],
                spent,
            )
        call.console.print(table)
        return 0
    r = call.get(f"/admin/v1/accounts/{args.account}")
    if call.raw:
        return call.show(r, "")
    b = r["balance"]
    lines = [
        f"account {r['id']}: {r['kind']} {r['name']!r}"
        + (f" under {r['parent_id']}" if r["parent_id"] is not None else ""),
        f"available {b['available']}  held {b['held']}  total {b['total']}"
        f"  (with parents: {b['chain_available']})",
    ]
    for bucket in r["buckets"]:
        expiry = f", expires {bucket['expires_at']}" if bucket["expires_at"] else ""
        source = "cash" if bucket["source"] == "cash" else f"grant {bucket['grant_id']}"
        lines.append(f"  {source}: {bucket['remaining']} (held {bucket['held']}){expiry}")
    for budget in r["budgets"]:
        lines.append(
            f"  budget {budget['period']} ({budget['tz']}): limit {budget['limit']}, "
            f"spent {budget['spent']}, room {budget['room']}"
        )
    call.console.print("\n".join(lines), highlight=False)
    return 0


def _grants(args: argparse.Namespace, call: _Call) -> int:
    body: dict[str, Any] = {"amount": args.amount, "priority": args.priority}
    if args.expires_at:
        body["expires_at"] = args.expires_at
    if args.effective_at:
        body["effective_at"] = args.effective_at
    if args.every:
        body["recurring"] = {"period": args.every, "tz": args.tz}
    if args.rollover:
        body["rollover"] = args.rollover
    r = call.write(f"/admin/v1/accounts/{args.account}/grants", body)
    every = f" every {r['recurring']['period']} ({r['recurring']['tz']})" if r["recurring"] else ""
    expiry = f", expires {r['expires_at']}" if r["expires_at"] else ""
    return call.show(
        r, f"grant {r['id']}: {r['amount']} to account {r['account_id']}{every}{expiry}"
    )


def _topup(args: argparse.Namespace, call: _Call) -> int:
    r = call.write(f"/admin/v1/accounts/{args.account}/topups", {"amount": args.amount})
    return call.show(r, f"topped up account {r['account_id']} with {r['amount']}")


def _transfer(args: argparse.Namespace, call: _Call) -> int:
    body = {
        "from": args.source,
        "to": args.destination,
        "amount": args.amount,
        "actor": args.actor,
    }
    r = call.write("/admin/v1/transfers", body)
    return call.show(r, f"moved {r['amount']} from account {r['from']} to account {r['to']}")


def _budgets(args: argparse.Namespace, call: _Call) -> int:
    if args.budgets_command == "set":
        body = {"amount": args.amount, "period": args.period, "tz": args.tz}
        r = call.write(f"/admin/v1/accounts/{args.account}/budgets", body)
        return call.show(r, f"{r['scope']}: {r['limit']} per {r['period']} ({r['tz']})")
    r = call.get(f"/admin/v1/accounts/{args.account}/budgets")
    if call.raw:
        return call.show(r, "")
    table = Table("period", "tz", "limit", "spent", "held", "room", "period ends")
    for b in r["data"]:
        table.add_row(
            b["period"],
            b["tz"],
            b["limit"],
            b["spent"],
            b["held"],
            b["room"],
            b["period_end"] or "",
        )
    call.console.print(table)
    return 0


def _statement(args: argparse.Namespace, call: _Call) -> int:
    query = {k: v for k, v in (("since", args.since), ("until", args.until)) if v}
    path = f"/admin/v1/accounts/{args.account}/statement"
    if args.csv:
        query["format"] = "csv"
        sys.stdout.write(call.get_text(path + "?" + urllib.parse.urlencode(query)))
        return 0
    r = call.get(path + "?" + urllib.parse.urlencode(query))
    if call.raw:
        return call.show(r, "")
    d = r["display"]
    table = Table("line", "amount", title=f"account {args.account}: {r['since']} .. {r['until']}")
    for line in ("opening", "top_ups", "grants", "transfers_in", "transfers_out"):
        table.add_row(line, d[line])
    table.add_row("expired", d["expired"])
    for model, m in r["spend_by_model"].items():
        table.add_row(f"spend {model} ({m['requests']} requests)", m["spend"])
    table.add_row("spend", d["spend"])
    if r["other_in_nano"] or r["other_out_nano"]:
        table.add_row("other in", d["other_in"])
        table.add_row("other out", d["other_out"])
    table.add_row("closing", d["closing"])
    call.console.print(table)
    return 0


def _ledger(args: argparse.Namespace, call: _Call) -> int:
    # An unsound ledger answers 500 with the violations in its message: AdminError, exit 1.
    r = call.get("/admin/v1/ledger/check")
    return call.show(r, f"ledger sound ({r['checked_at']}): every invariant holds")


_COMMANDS = {
    "accounts": _accounts,
    "grants": _grants,
    "topup": _topup,
    "transfer": _transfer,
    "budgets": _budgets,
    "statement": _statement,
    "ledger": _ledger,
}
