"""Admin subcommands: the admin API from a terminal.

They talk to a running gateway over HTTP rather than to its database, so that a revocation
takes effect in the gateway's key cache at once and the server stays the one writer.
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

from tokenworks.config import ADMIN_KEY_ENV

URL_ENV = "TOKENWORKS_URL"
DEFAULT_URL = "http://127.0.0.1:8000"
REQUEST_TIMEOUT_S = 30


class AdminError(Exception):
    pass


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
        raise AdminError(f"cannot reach the gateway at {url}: {exc.reason}") from exc


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
        parser.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL))
        parser.add_argument("--json", action="store_true", help="print raw JSON")
        parser.set_defaults(func=handler)

    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="mint a key (the secret is shown once)")
    create.add_argument("name")
    create.add_argument("--model", action="append", dest="models", help="allow only this model")
    create.add_argument("--account", default=None)
    create.add_argument("--ttl-s", type=float, default=None)
    create.add_argument("--limit", default=None, help='spending limit, e.g. "5.00"')
    create.add_argument("--period", default="month", choices=("day", "week", "month", "total"))
    add_rate_limit_options(create)
    create.add_argument(
        "--idempotency-key",
        default=None,
        help="reuse to retry safely: the retry shows the same key and secret (default: fresh)",
    )
    common(create)
    listing = keys_sub.add_parser("list", help="list keys")
    common(listing)
    revoke = keys_sub.add_parser("revoke", help="revoke a key and every key minted under it")
    revoke.add_argument("key_id")
    common(revoke)

    usage = sub.add_parser("usage", help="token usage, grouped")
    usage.add_argument("--group-by", default="model", help="key,model,producer,day,...")
    usage.add_argument("--since", default=None)
    usage.add_argument("--until", default=None)
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


def _keys(args: argparse.Namespace, admin_key: str, console: Console) -> int:
    call = {"url": args.url, "admin_key": admin_key}
    if args.keys_command == "create":
        body: dict[str, Any] = {"name": args.name, "models": args.models, "account": args.account}
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
        else:
            console.print(f"id:  {result['id']}\nkey: {result['key']}  (shown once)")
        return 0
    if args.keys_command == "list":
        result = {"object": "list", "data": list_all("/admin/v1/keys", call)}
        if args.json:
            print(json.dumps(result))
            return 0
        table = Table("id", "name", "hint", "models", "account", "revoked")
        for key in result["data"]:
            models = ",".join(key["models"]) if key["models"] is not None else "*"
            table.add_row(
                key["id"],
                key["name"],
                key["hint"],
                models,
                key["account"] or "",
                "yes" if key["revoked_at"] else "",
            )
        console.print(table)
        return 0
    result = request("DELETE", f"/admin/v1/keys/{urllib.parse.quote(args.key_id)}", **call)
    if args.json:
        print(json.dumps(result))
    else:
        console.print(f"revoked: {', '.join(result['revoked']) or 'nothing (already revoked)'}")
    return 0


def _usage(args: argparse.Namespace, admin_key: str, console: Console) -> int:
    query = {"group_by": args.group_by}
    if args.since:
        query["since"] = args.since
    if args.until:
        query["until"] = args.until
    path = "/admin/v1/usage?" + urllib.parse.urlencode(query)
    result = request("GET", path, url=args.url, admin_key=admin_key)
    if args.json:
        print(json.dumps(result))
        return 0
    columns = [*result["group_by"], "requests", "input_tokens", "cached_input_tokens"]
    columns += ["output_tokens", "reasoning_tokens", "total_tokens", "cost", "price"]
    table = Table(*columns)
    for row in result["data"]:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
