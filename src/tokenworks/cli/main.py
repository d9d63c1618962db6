"""The `tokenworks` command: one subcommand per operation; each imports only what it needs."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from tokenworks.cli.admin import SINCE_HELP, UNTIL_HELP

if TYPE_CHECKING:
    from tokenworks.pricing.whatif import WhatIf, WhatIfRow


def _serve(args: argparse.Namespace) -> int:
    from tokenworks.server import serve

    return serve(
        config_path=args.config, host=args.host, port=args.port, access_log=args.access_log
    )


def _config_check(args: argparse.Namespace) -> int:
    """Validate a config as `serve` would, without opening a database or a port."""
    from tokenworks.config import ConfigError, load

    try:
        config = load(args.file)
    except ConfigError as exc:
        print(f"tokenworks: {exc}", file=sys.stderr)
        return 2
    unset = [
        f"{p.name} (${p.api_key_env})"
        for p in config.producers
        if p.api_key_env and not os.environ.get(p.api_key_env)
    ]
    print(
        f"{args.file}: ok: {len(config.producers)} producers, {len(config.models)} models, "
        f"database {config.database}"
    )
    if unset:
        print(f"note: key variables unset for {', '.join(unset)}", file=sys.stderr)
    return 0


def _upstream_sim(args: argparse.Namespace) -> int:
    from tokenworks.sim import serve

    return serve(host=args.host, port=args.port, profile=args.profile)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import tokenworks

    try:
        return version("tokenworks")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return tokenworks.__version__


def _demo(args: argparse.Namespace) -> int:
    from tokenworks.cli.demo import run

    return run(duration_s=args.duration)


def _reprice(args: argparse.Namespace) -> int:
    """What recorded usage would have cost and been billed under a changed price book."""
    import json

    from tokenworks.api.admin import parse_time_ms
    from tokenworks.api.errors import ApiError
    from tokenworks.cli.admin import relative_time
    from tokenworks.config import CONFIG_ENV, ConfigError, load
    from tokenworks.metering.store import UsageStore
    from tokenworks.money import format_nano
    from tokenworks.pricing.quote import Pricer
    from tokenworks.pricing.whatif import ScenarioError, format_table, load_scenario, reprice

    path = args.config or os.environ.get(CONFIG_ENV)
    if not path:
        print(f"tokenworks: pass --config FILE or set {CONFIG_ENV}", file=sys.stderr)
        return 2
    try:
        config = load(path)
        scenario = load_scenario(args.scenario)
        since_ms = parse_time_ms(relative_time(args.since) if args.since else None, "since")
        until_ms = parse_time_ms(relative_time(args.until) if args.until else None, "until")
    except (ConfigError, ScenarioError, OSError) as exc:
        print(f"tokenworks: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"tokenworks: {exc.message}", file=sys.stderr)
        return 2
    store = UsageStore(config.database)
    try:
        # Every record in range, streamed a page at a time: memory holds one page and the sums.
        records = store.iter_records(since_ms=since_ms, until_ms=until_ms)
        result = reprice(records, Pricer.from_config(config), scenario)
    except ScenarioError as exc:
        print(f"tokenworks: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    if args.json:
        rows = [*result.rows, result.total]
        print(
            json.dumps(
                {
                    "scenario": result.scenario,
                    "currency": result.currency,
                    "rows": [
                        {
                            "account": r.account_id,
                            "model": r.public_model,
                            "requests": r.requests,
                            "cost": format_nano(r.base_cost_nano),
                            "new_cost": format_nano(r.new_cost_nano),
                            "price": format_nano(r.base_price_nano),
                            "new_price": format_nano(r.new_price_nano),
                        }
                        for r in rows
                    ],
                    "skipped": len(result.skipped),
                }
            )
        )
    elif args.wide:
        print(format_table(result))
    else:
        print_whatif(result)
    return 0


def _export(args: argparse.Namespace) -> int:
    from tokenworks.cli import export

    return export.run(args)


def print_whatif(result: WhatIf) -> None:
    """The scenario's effect in 80 columns: cost and price before and after, and the change
    in price; `--wide` prints every column."""
    from rich.console import Console

    from tokenworks.cli.tables import Col, render
    from tokenworks.money import format_nano

    def cells(r: WhatIfRow) -> list[str]:
        change = "-"
        if r.base_price_nano:
            change = f"{(r.new_price_nano - r.base_price_nano) * 100 / r.base_price_nano:+.1f}%"
        return [
            r.account_id,
            r.public_model,
            f"{r.requests:,}",
            format_nano(r.base_cost_nano),
            format_nano(r.new_cost_nano),
            format_nano(r.base_price_nano),
            format_nano(r.new_price_nano),
            change,
        ]

    console = Console()
    console.print(f"scenario: {result.scenario} (amounts in {result.currency})", highlight=False)
    cols = [Col("ACCOUNT"), Col("MODEL"), Col("REQUESTS", "count")]
    cols += [Col("COST", "money"), Col("NEW COST", "money")]
    cols += [Col("PRICE", "money"), Col("NEW PRICE", "money"), Col("CHANGE", "count")]
    total = cells(result.total)
    total[0] = "TOTAL"
    render(console, cols, [*(cells(r) for r in result.rows), total])
    if result.skipped:
        print(f"skipped {len(result.skipped)} record(s); first: {result.skipped[0][1]}")


def _admin(args: argparse.Namespace) -> int:
    from tokenworks.cli import admin as admin_cli

    return admin_cli.dispatch(args)


def _ledger_admin(args: argparse.Namespace) -> int:
    from tokenworks.cli import ledger as ledger_cli

    return ledger_cli.dispatch(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenworks",
        description="A token utility: dispatch, meter, price and settle LLM tokens. "
        "`tokenworks COMMAND --help` says what a command takes.",
        epilog="Admin commands talk to a running gateway: set TOKENWORKS_ADMIN_KEY, and "
        "TOKENWORKS_URL or --url when it is not on http://127.0.0.1:8000.",
    )
    parser.add_argument("--version", action="version", version=f"tokenworks {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=None, help="config file (or $TOKENWORKS_CONFIG)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; "
        "0.0.0.0 for every interface)"
    )  # fmt: skip
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    serve.add_argument(
        "--access-log", action="store_true", help="log one line per request (to stdout)"
    )
    serve.set_defaults(func=_serve)

    config = sub.add_parser("config", help="check a config file")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check", help="validate FILE as `serve` would, without serving; exit 2 if it is wrong"
    )
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=_config_check)

    from tokenworks.sim.profile import PROFILES, fault_help_text

    sim = sub.add_parser(
        "upstream-sim",
        help="run a simulated OpenAI-compatible token factory",
        epilog=fault_help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sim.add_argument("--port", type=int, default=18080, help="TCP port (default: 18080)")
    sim.add_argument(
        "--profile",
        default="fast",
        choices=sorted(PROFILES),
        help="the producer's character: instant (no delays), fast, cheap (halved capacity "
        "9-18h), slow, flaky (1 in 10 fails); default: fast",
    )
    sim.set_defaults(func=_upstream_sim)

    demo = sub.add_parser("demo", help="the whole system on the embedded default")
    demo.add_argument("--duration", type=float, default=None, help="seconds, then report and exit")
    demo.set_defaults(func=_demo)

    what_if = sub.add_parser("reprice", help="re-price recorded usage under a scenario")
    what_if.add_argument("--config", default=None, help="config file (or $TOKENWORKS_CONFIG)")
    what_if.add_argument("--scenario", required=True, help="scenario file (docs/pricing.md)")
    what_if.add_argument("--since", default=None, help=SINCE_HELP)
    what_if.add_argument("--until", default=None, help=UNTIL_HELP)
    what_if.add_argument("--json", action="store_true", help="print raw JSON")
    what_if.add_argument("--wide", action="store_true", help="every column, exact amounts")
    what_if.set_defaults(func=_reprice)

    from tokenworks.cli.export import add_subcommand as add_export

    add_export(sub, _export)
    from tokenworks.cli.admin import add_subcommands

    add_subcommands(sub, _admin)
    from tokenworks.cli import ledger as ledger_cli

    ledger_cli.add_subcommands(sub, _ledger_admin)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    sys.exit(args.func(args))
