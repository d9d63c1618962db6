"""Admin subcommands: the admin API from a terminal.

They talk to a running gateway over HTTP rather than to its database, so that a revocation
takes effect in the gateway's key cache at once and the server stays the one writer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

from rich.console import Console

from tokenworks.cli import resolve
from tokenworks.cli.errors import AdminError
from tokenworks.cli.tables import Col, count, money, render
from tokenworks.config import ADMIN_KEY_ENV

URL_ENV = "TOKENWORKS_URL"
DEFAULT_URL = "http://127.0.0.1:8000"
REQUEST_TIMEOUT_S = 30


def request(method: str, path: str, body: Any = None, *, url: str, admin_key: str) -> Any:
    """An admin API call; its JSON answer, or AdminError with the API's own message."""
    return json.loads(request_bytes(method, path, body, url=url, admin_key=admin_key) or b"null")


def request_bytes(method: str, path: str, body: Any = None, *, url: str, admin_key: str) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise AdminError(f"{exc.code}: {message}") from exc
    except urllib.error.URLError as exc:
        raise AdminError(
            f"cannot reach the gateway at {url}: {exc.reason}; is `tokenworks serve` running"
            f" there? (set --url or ${URL_ENV})"
        ) from exc


URL_HELP = f"the gateway's base URL (default: ${URL_ENV} or {DEFAULT_URL})"
SINCE_HELP = "from this time: 7d, 24h or 30m ago, a date (2026-11-01), ISO 8601, or unix seconds"
UNTIL_HELP = "up to this time (exclusive), same forms as --since; default: now"


MAX_PAGES = 100_000  # a bound on the pages a listing follows (10^8 rows at 1,000 a page)


def list_all(path: str, call: dict[str, str], query: dict[str, str] | None = None) -> list[Any]:
    """Every item of a paged listing: pages of 1,000, each `after` the last id of the one
    before, until `has_more` is false."""
    items: list[Any] = []
    params = {**(query or {}), "limit": "1000"}
    for _ in range(MAX_PAGES):
        sep = "&" if "?" in path else "?"
        page = request("GET", path + sep + urllib.parse.urlencode(params), **call)
        items += page["data"]
        if not page.get("has_more") or not page["data"]:
            return items
        params["after"] = str(page["data"][-1]["id"])
    raise SystemExit(f"{path}: more than {MAX_PAGES} pages")


def add_subcommands(sub: Any, handler: Any) -> None:
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL), help=URL_HELP)
        parser.add_argument("--json", action="store_true", help="print raw JSON")
        parser.set_defaults(func=handler)

    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="mint a key (the secret is shown once)")
    create.add_argument("name")
    create.add_argument("--model", action="append", dest="models", help="allow only this model")
    create.add_argument("--account", default=None, help="the account that pays: name or id")
    create.add_argument("--ttl-s", type=float, default=None, help="expire after this many seconds")
    create.add_argument("--limit", default=None, help='spending limit, e.g. "5.00"')
    create.add_argument("--period", default="month", choices=("day", "week", "month", "total"))
    add_rate_limit_options(create)
    create.add_argument(
        "--idempotency-key",
        default=None,
        help="reuse to retry safely: the retry shows the same key and secret (default: fresh)",
    )
    create.add_argument(
        "-q", "--quiet", action="store_true", help="print only the secret (for $(...) in scripts)"
    )
    common(create)
    listing = keys_sub.add_parser("list", help="list keys")
    common(listing)
    revoke = keys_sub.add_parser("revoke", help="revoke a key and every key minted under it")
    revoke.add_argument("key", metavar="KEY", help="key id or name")
    common(revoke)

    usage = sub.add_parser("usage", help="token usage, grouped")
    usage.add_argument(
        "--group-by",
        default="model",
        help="comma-separated: key, model, producer, account, team, org, upstream_model, "
        "status, day, week, month (default: model)",
    )
    usage.add_argument("--since", default=None, help=SINCE_HELP)
    usage.add_argument("--until", default=None, help=UNTIL_HELP)
    usage.add_argument("--wide", action="store_true", help="every token column")
    common(usage)


def add_rate_limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpm", type=int, default=None, help="requests per minute")
    parser.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests at once")


def rate_limits_of(args: argparse.Namespace) -> dict[str, int | None]:
    return {"rpm": args.rpm, "tpm": args.tpm, "max_concurrency": args.max_concurrency}


def admin_key_from_env() -> str | None:
    """The admin key, or None after telling the user how to set it."""
    admin_key = os.environ.get(ADMIN_KEY_ENV, "")
    if not admin_key:
        print(f"tokenworks: set {ADMIN_KEY_ENV} to the gateway's admin key", file=sys.stderr)
        return None
    return admin_key


def dispatch(args: argparse.Namespace) -> int:
    admin_key = admin_key_from_env()
    if admin_key is None:
        return 2
    console = Console()
    try:
        if args.command == "keys":
            return _keys(args, admin_key, console)
        if args.command == "usage":
            return _usage(args, admin_key, console)
    except AdminError as exc:
        print(f"tokenworks: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {args.command}")


def getter(url: str, admin_key: str) -> Any:
    return lambda path: request("GET", path, url=url, admin_key=admin_key)


def currency(get: Any) -> str:
    """The ledger currency, for table headers."""
    return str(get("/admin/v1/info")["currency"])


def account_names(get: Any) -> dict[str, str]:
    """Account id (as a string) to name, operator accounts included."""
    rows = resolve.every(get, "/admin/v1/accounts", {"include_operator": "true"})
    return {str(a["id"]): a["name"] for a in rows}


def _keys(args: argparse.Namespace, admin_key: str, console: Console) -> int:
    call = {"url": args.url, "admin_key": admin_key}
    get = getter(args.url, admin_key)
    if args.keys_command == "create":
        account = None if args.account is None else resolve.account(get, args.account)
        body: dict[str, Any] = {
            "name": args.name,
            "models": args.models,
            "account": None if account is None else account["id"],
        }
        if args.ttl_s is not None:
            body["ttl_s"] = args.ttl_s
        if args.limit is not None:
            body["limit"] = {"amount": args.limit, "period": args.period}
        rate_limits = rate_limits_of(args)
        if any(v is not None for v in rate_limits.values()):
            body["rate_limits"] = rate_limits
        body["idempotency_key"] = args.idempotency_key or f"cli-{uuid.uuid4()}"
        result = request("POST", "/admin/v1/keys", body, **call)
        if args.json:
            print(json.dumps(result))
            return 0
        if args.quiet:
            print(result["key"])
            return 0
        lines = [f"created key {resolve.key_label(result)}"]
        if account is not None:
            lines.append(f"paid by:  account {resolve.account_label(account)}")
        limit = result.get("limit")
        if limit:
            lines.append(f"limit:    {money(limit['amount'])} per {limit['period']}")
        lines.append(f"secret:   {result['key']}")
        lines.append("          (shown once: store it now)")
        console.print(
            "\n".join(lines),
            highlight=False,
            soft_wrap=True,
        )
        return 0
    if args.keys_command == "list":
        result = {"object": "list", "data": list_all("/admin/v1/keys", call)}
        if args.json:
            print(json.dumps(result))
            return 0
        names = account_names(get) if any(k["account"] for k in result["data"]) else {}
        rows = []
        for key in result["data"]:
            models = ",".join(key["models"]) if key["models"] is not None else "any"
            rows.append(
                [
                    key["id"],
                    key["name"],
                    names.get(str(key["account"]), str(key["account"] or "-")),
                    models,
                    _status(key),
                ]
            )
        cols = [Col("ID", "id"), Col("NAME"), Col("ACCOUNT"), Col("MODELS"), Col("STATUS")]
        render(console, cols, rows)
        return 0
    key = resolve.key(get, args.key)
    result = request("DELETE", f"/admin/v1/keys/{urllib.parse.quote(key['id'])}", **call)
    if args.json:
        print(json.dumps(result))
    elif result["revoked"]:
        others = len(result["revoked"]) - 1
        below = f" and {others} key{'s' if others != 1 else ''} minted under it" if others else ""
        console.print(f"revoked key {resolve.key_label(key)}{below}", highlight=False)
    else:
        console.print(f"key {resolve.key_label(key)} was already revoked", highlight=False)
    return 0


def _status(key: dict[str, Any]) -> str:
    if key["revoked_at"]:
        return "revoked"
    if key["expires_at"] and key["expires_at"] <= time.time():
        return "expired"
    return "active"


# Columns of `usage`: the token counts that fit 80 columns, then every one with --wide.
_TOKENS = [("input_tokens", "INPUT"), ("output_tokens", "OUTPUT")]
_WIDE_TOKENS = [
    ("input_tokens", "INPUT"),
    ("cached_input_tokens", "CACHED"),
    ("output_tokens", "OUTPUT"),
    ("reasoning_tokens", "REASONING"),
    ("total_tokens", "TOTAL"),
]
_PERIOD_GROUPS = {"day", "week", "month"}
_ACCOUNT_GROUPS = {"account", "team", "org", "organisation"}


def _usage(args: argparse.Namespace, admin_key: str, console: Console) -> int:
    query = {"group_by": args.group_by}
    if args.since:
        query["since"] = str(relative_time(args.since))
    if args.until:
        query["until"] = str(relative_time(args.until))
    get = getter(args.url, admin_key)
    result = resolve.usage(get, query)
    if args.json:
        print(json.dumps(result))
        return 0
    groups: list[str] = result["group_by"]
    names: dict[str, str] = {}
    if "key" in groups:
        names.update({k["id"]: k["name"] for k in resolve.every(get, "/admin/v1/keys", {})})
    if _ACCOUNT_GROUPS & set(groups):
        names.update(account_names(get))
    unit = currency(get)
    tokens = _WIDE_TOKENS if args.wide else _TOKENS
    cols = [Col(g.upper(), "id" if g in _PERIOD_GROUPS else "text") for g in groups]
    cols += [Col("REQUESTS", "count"), *(Col(h, "count", optional=True) for _, h in tokens)]
    cols += [Col(f"PRICE ({unit})", "money"), Col(f"COST ({unit})", "money", optional=True)]
    rows = []
    for row in result["data"]:
        cells = [_group_cell(g, row.get(g), names) for g in groups]
        cells += [count(row["requests"]), *(count(row.get(c)) for c, _ in tokens)]
        cells += [row["price"], row["cost"]]
        rows.append(cells)
    render(console, cols, rows)
    return 0


def _group_cell(group: str, value: Any, names: dict[str, str]) -> str:
    """A key or an account by name, its id after it when the name is not unique enough to
    type; anything else as it is."""
    if value is None:
        return "(none)" if group in _ACCOUNT_GROUPS else "-"
    if group == "key" or group in _ACCOUNT_GROUPS:
        name = names.get(str(value))
        return f"{name} ({value})" if name is not None and group != "key" else name or str(value)
    return str(value)


_RELATIVE = re.compile(r"^(\d{1,6})([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def relative_time(value: str, now_s: float | None = None) -> str:
    """`7d`, `24h`, `30m`, `2w`, `90s` ago as unix seconds; anything else as given (the API
    parses dates, ISO 8601 and unix seconds itself)."""
    match = _RELATIVE.match(value.strip())
    if match is None:
        return value
    now_s = time.time() if now_s is None else now_s
    return str(int(now_s - int(match.group(1)) * _UNIT_S[match.group(2)]))
