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
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from rich.console import Console

from tokenworks.cli import resolve
from tokenworks.cli.admin import (
    DEFAULT_URL,
    SINCE_HELP,
    UNTIL_HELP,
    URL_ENV,
    URL_HELP,
    add_rate_limit_options,
    admin_key_from_env,
    currency,
    list_all,
    rate_limits_of,
    relative_time,
    request,
    request_bytes,
)
from tokenworks.cli.errors import AdminError
from tokenworks.cli.tables import Col, money, render, when

ACCOUNT_HELP = "account name or id"

COMMANDS = ("accounts", "grants", "topup", "transfer", "budgets", "statement", "ledger")


def add_subcommands(sub: Any, handler: Any) -> None:
    def common(parser: argparse.ArgumentParser, *, write: bool = False) -> None:
        parser.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL), help=URL_HELP)
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
    create.add_argument("--parent", default=None, help=f"parent account: {ACCOUNT_HELP}")
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
    limits.add_argument("account", help=ACCOUNT_HELP)
    add_rate_limit_options(limits)
    common(limits, write=True)
    listing = acc_sub.add_parser("list", help="accounts with their balances")
    listing.add_argument("--parent", default=None, help=f"only children of: {ACCOUNT_HELP}")
    listing.add_argument("--include-operator", action="store_true")
    common(listing)
    show = acc_sub.add_parser("show", help="one account: balance, credit buckets, budgets")
    show.add_argument("account", help=ACCOUNT_HELP)
    common(show)

    grants = sub.add_parser("grants", help="allowances: one-off or recurring")
    grants_sub = grants.add_subparsers(dest="grants_command", required=True)
    add = grants_sub.add_parser("add", help="grant credit to an account")
    add.add_argument("account", help=ACCOUNT_HELP)
    add.add_argument("amount", help='decimal, e.g. "10.00"')
    add.add_argument("--expires-at", default=None, help="ISO 8601 or unix seconds")
    add.add_argument("--effective-at", default=None, help="ISO 8601 or unix seconds")
    add.add_argument("--every", choices=("day", "week", "month"), default=None, help="recur")
    add.add_argument("--tz", default="UTC", help="time zone of the recurrence")
    add.add_argument("--rollover", default=None, help='"expire", "all" or a cap like "5.00"')
    add.add_argument("--priority", type=int, default=0, help="lower is spent first")
    common(add, write=True)
    glist = grants_sub.add_parser("list", help="an account's active grants")
    glist.add_argument("account", help=ACCOUNT_HELP)
    common(glist)
    grevoke = grants_sub.add_parser(
        "revoke", help="end a grant now: no more issues, its unspent credit expires"
    )
    grevoke.add_argument("account", help=ACCOUNT_HELP)
    grevoke.add_argument("grant", type=int, metavar="GRANT", help="grant id (grants list)")
    common(grevoke)

    topup = sub.add_parser("topup", help="paid credit into an account")
    topup.add_argument("account", help=ACCOUNT_HELP)
    topup.add_argument("amount")
    common(topup, write=True)

    transfer = sub.add_parser("transfer", help="move cash between accounts of one organisation")
    transfer.add_argument("source", metavar="FROM", help=ACCOUNT_HELP)
    transfer.add_argument("destination", metavar="TO", help=ACCOUNT_HELP)
    transfer.add_argument("amount")
    transfer.add_argument("--actor", default="operator", help='"operator" or "account:<id>"')
    common(transfer, write=True)

    budgets = sub.add_parser("budgets", help="spending limits per account and period")
    budgets_sub = budgets.add_subparsers(dest="budgets_command", required=True)
    set_ = budgets_sub.add_parser("set", help="set an account's limit for a period")
    set_.add_argument("account", help=ACCOUNT_HELP)
    set_.add_argument("amount")
    set_.add_argument("--period", choices=("day", "week", "month", "total"), default="month")
    set_.add_argument("--tz", default="UTC")
    common(set_, write=True)
    blist = budgets_sub.add_parser("list", help="an account's budgets")
    blist.add_argument("account", help=ACCOUNT_HELP)
    common(blist)

    statement = sub.add_parser("statement", help="an account's statement for a period")
    statement.add_argument("account", help=ACCOUNT_HELP)
    statement.add_argument(
        "--since", default=None, help=f"{SINCE_HELP}; default: start of this month (UTC)"
    )
    statement.add_argument("--until", default=None, help=UNTIL_HELP)
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

    def delete(self, path: str) -> Any:
        return request("DELETE", path, url=self.url, admin_key=self.admin_key)

    def get_text(self, path: str) -> str:
        return request_bytes("GET", path, url=self.url, admin_key=self.admin_key).decode()

    def show(self, result: Any, text: str) -> int:
        if self.raw:
            print(json.dumps(result))
        else:
            self.console.print(text, highlight=False)
        return 0


def _account(call: _Call, ref: str) -> dict[str, Any]:
    return resolve.account(call.get, ref)


def _label(account: dict[str, Any]) -> str:
    return f"account {resolve.account_label(account)}"


def _month_start_s() -> int:
    now = datetime.now(UTC)
    return int(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())


def _accounts(args: argparse.Namespace, call: _Call) -> int:
    if args.accounts_command == "create":
        body: dict[str, Any] = {"name": args.name}
        parent = None if args.parent is None else _account(call, args.parent)
        body["parent"] = None if parent is None else parent["id"]
        if args.kind:
            body["kind"] = args.kind
        if args.no_draw:
            body["draws_on_parent"] = False
        rate_limits = rate_limits_of(args)
        if any(v is not None for v in rate_limits.values()):
            body["rate_limits"] = rate_limits
        r = call.write("/admin/v1/accounts", body)
        under = "" if parent is None else f" under {_label(parent)}"
        return call.show(r, f"created {r['kind']} {_label(r)}{under}")
    if args.accounts_command == "rate-limits":
        account = _account(call, args.account)
        limits = rate_limits_of(args)
        r = call.write(f"/admin/v1/accounts/{account['id']}/rate_limits", limits)
        shown = ", ".join(f"{k} {v}" for k, v in limits.items() if v is not None)
        return call.show(r, f"{_label(account)}: {shown or 'no rate limits'}")
    if args.accounts_command == "list":
        return _account_list(args, call)
    r = _account(call, args.account)
    r = call.get(f"/admin/v1/accounts/{r['id']}")
    if call.raw:
        return call.show(r, "")
    unit = currency(call.get)
    b = r["balance"]
    parent = ""
    if r["parent_id"] is not None:
        parent = f" under {_label(_account(call, str(r['parent_id'])))}"
    lines = [
        f"{r['kind']} {_label(r)}{parent}",
        f"available {money(b['available'])} {unit}, held {money(b['held'])}, "
        f"balance {money(b['total'])}",
        f"available with what its parents lend: {money(b['chain_available'])} {unit}",
    ]
    for bucket in r["buckets"]:
        expiry = f", expires {when(bucket['expires_at'])}" if bucket["expires_at"] else ""
        source = "cash" if bucket["source"] == "cash" else f"grant {bucket['grant_id']}"
        lines.append(
            f"  {source}: {money(bucket['remaining'])} (held {money(bucket['held'])}){expiry}"
        )
    for budget in r["budgets"]:
        lines.append(
            f"  budget per {budget['period']} ({budget['tz']}): limit {money(budget['limit'])}, "
            f"spent {money(budget['spent'])}, room {money(budget['room'])}"
        )
    call.console.print("\n".join(lines), highlight=False)
    return 0


def _account_list(args: argparse.Namespace, call: _Call) -> int:
    query: dict[str, str] = {}
    if args.parent is not None:
        query["parent"] = str(_account(call, args.parent)["id"])
    if args.include_operator:
        query["include_operator"] = "true"
    data = list_all("/admin/v1/accounts", {"url": call.url, "admin_key": call.admin_key}, query)
    if call.raw:
        return call.show({"object": "list", "data": data}, "")
    unit = currency(call.get)
    spent = _spent_this_month(call, data)
    names = {a["id"]: a["name"] for a in data}
    rows = []
    for a in data:
        b = a["balance"]
        parent = a["parent_id"]
        rows.append(
            [
                str(a["id"]),
                a["name"],
                a["kind"],
                "-" if parent is None else names.get(parent, str(parent)),
                b["available"],
                b["held"],
                spent.get(a["id"], "0"),
            ]
        )
    cols = [Col("ID", "id"), Col("NAME"), Col("KIND"), Col("PARENT")]
    cols += [Col(f"AVAILABLE ({unit})", "money"), Col("HELD", "money")]
    cols += [Col("SPENT THIS MONTH", "money")]
    render(call.console, cols, rows)
    return 0


def _spent_this_month(call: _Call, accounts: list[dict[str, Any]]) -> dict[int, str]:
    """What each account and everything below it was charged since the month began (UTC),
    from metered usage: a parent's spend includes its children's."""
    query = {"group_by": "account", "since": str(_month_start_s())}
    usage = resolve.usage(call.get, query)["data"]
    parents = {a["id"]: a["parent_id"] for a in accounts}
    totals: dict[int, Decimal] = {}
    for row in usage:
        if row["account"] is None or not str(row["account"]).isdigit():
            continue
        current: int | None = int(row["account"])
        for _ in range(resolve.LIST_LIMIT):  # bounded walk up the tree
            if current is None:
                break
            totals[current] = totals.get(current, Decimal(0)) + Decimal(row["price"])
            current = parents.get(current)
    return {k: str(v) for k, v in totals.items()}


def _grants(args: argparse.Namespace, call: _Call) -> int:
    account = _account(call, args.account)
    if args.grants_command == "revoke":
        r = call.delete(f"/admin/v1/accounts/{account['id']}/grants/{args.grant}")
        unit = currency(call.get)
        expired = f"; {money(r['expired'])} {unit} of unspent credit expired"
        return call.show(r, f"revoked grant {r['id']} of {_label(account)}{expired}")
    if args.grants_command == "list":
        r = call.get(f"/admin/v1/accounts/{account['id']}")
        if call.raw:
            return call.show(r["grants"], "")
        unit = currency(call.get)
        rows = [
            [
                str(g["id"]),
                g["amount"],
                g["recurring"]["period"] if g["recurring"] else "once",
                g["rollover"] if g["rollover"] in ("expire", "all") else f"up to {g['rollover']}",
                when(g["next_due_at"]) if g["recurring"] else when(g["expires_at"]),
            ]
            for g in r["grants"]
        ]
        cols = [Col("ID", "id"), Col(f"AMOUNT ({unit})", "money"), Col("EVERY")]
        cols += [Col("ROLLOVER"), Col("NEXT / EXPIRES (UTC)")]
        render(call.console, cols, rows)
        return 0
    body: dict[str, Any] = {"amount": args.amount, "priority": args.priority}
    if args.expires_at:
        body["expires_at"] = args.expires_at
    if args.effective_at:
        body["effective_at"] = args.effective_at
    if args.every:
        body["recurring"] = {"period": args.every, "tz": args.tz}
    if args.rollover:
        body["rollover"] = args.rollover
    r = call.write(f"/admin/v1/accounts/{account['id']}/grants", body)
    every = f" every {r['recurring']['period']} ({r['recurring']['tz']})" if r["recurring"] else ""
    expiry = f", expires {when(r['expires_at'])}" if r["expires_at"] else ""
    unit = currency(call.get)
    return call.show(
        r, f"grant {r['id']}: {money(r['amount'])} {unit} to {_label(account)}{every}{expiry}"
    )


def _topup(args: argparse.Namespace, call: _Call) -> int:
    account = _account(call, args.account)
    r = call.write(f"/admin/v1/accounts/{account['id']}/topups", {"amount": args.amount})
    unit = currency(call.get)
    return call.show(r, f"topped up {_label(account)} with {money(r['amount'])} {unit}")


def _transfer(args: argparse.Namespace, call: _Call) -> int:
    source, destination = _account(call, args.source), _account(call, args.destination)
    body = {
        "from": source["id"],
        "to": destination["id"],
        "amount": args.amount,
        "actor": args.actor,
    }
    r = call.write("/admin/v1/transfers", body)
    unit = currency(call.get)
    return call.show(
        r, f"moved {money(r['amount'])} {unit} from {_label(source)} to {_label(destination)}"
    )


def _budgets(args: argparse.Namespace, call: _Call) -> int:
    account = _account(call, args.account)
    if args.budgets_command == "set":
        body = {"amount": args.amount, "period": args.period, "tz": args.tz}
        r = call.write(f"/admin/v1/accounts/{account['id']}/budgets", body)
        limit = money(r["limit"])
        return call.show(r, f"{_label(account)}: budget {limit} per {r['period']} ({r['tz']})")
    r = call.get(f"/admin/v1/accounts/{account['id']}/budgets")
    if call.raw:
        return call.show(r, "")
    unit = currency(call.get)
    rows = [
        [b["period"], b["tz"], b["limit"], b["spent"], b["held"], b["room"], when(b["period_end"])]
        for b in r["data"]
    ]
    cols = [Col("PERIOD"), Col("TZ"), Col(f"LIMIT ({unit})", "money"), Col("SPENT", "money")]
    cols += [Col("HELD", "money"), Col("ROOM", "money"), Col("RESETS (UTC)")]
    render(call.console, cols, rows)
    return 0


_STATEMENT_LINES = (
    ("opening", "Opening balance"),
    ("top_ups", "Top-ups"),
    ("grants", "Grants"),
    ("transfers_in", "Transfers in"),
    ("transfers_out", "Transfers out"),
    ("expired", "Expired credit"),
)


def _statement(args: argparse.Namespace, call: _Call) -> int:
    account = _account(call, args.account)
    query = {k: relative_time(v) for k, v in (("since", args.since), ("until", args.until)) if v}
    path = f"/admin/v1/accounts/{account['id']}/statement"
    if args.csv:
        query["format"] = "csv"
        sys.stdout.write(call.get_text(path + "?" + urllib.parse.urlencode(query)))
        return 0
    r = call.get(path + "?" + urllib.parse.urlencode(query))
    if call.raw:
        return call.show(r, "")
    unit = currency(call.get)
    d = r["display"]
    rows = [[label, d[line]] for line, label in _STATEMENT_LINES]
    for model, m in r["spend_by_model"].items():
        n = m["requests"]
        rows.append([f"  Spend on {model} ({n:,} request{'s' if n != 1 else ''})", m["spend"]])
    rows.append(["Spend", d["spend"]])
    if r["other_in_nano"] or r["other_out_nano"]:
        rows.append(["Other in", d["other_in"]])
        rows.append(["Other out", d["other_out"]])
    rows.append(["Closing balance", d["closing"]])
    call.console.print(
        f"{_label(account)}, {when(r['since'])} to {when(r['until'])} UTC", highlight=False
    )
    render(call.console, [Col(""), Col(f"AMOUNT ({unit})", "money")], rows)
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
