"""The `tokenworks` command: one subcommand per operation; each imports only what it needs."""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    from tokenworks.server import serve

    return serve(config_path=args.config, host=args.host, port=args.port)


def _upstream_sim(args: argparse.Namespace) -> int:
    from tokenworks.sim import serve

    return serve(host=args.host, port=args.port, profile=args.profile)


def _demo(args: argparse.Namespace) -> int:
    from tokenworks.cli.demo import run

    return run(duration_s=args.duration)


def _reprice(args: argparse.Namespace) -> int:
    """What recorded usage would have cost and been billed under a changed price book."""
    import json
    import os

    from tokenworks.api.admin import parse_time_ms
    from tokenworks.api.errors import ApiError
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
        since_ms = parse_time_ms(args.since, "since")
        until_ms = parse_time_ms(args.until, "until")
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
    else:
        print(format_table(result))
    return 0


def _export(args: argparse.Namespace) -> int:
    from tokenworks.cli import export

    return export.run(args)


def _admin(args: argparse.Namespace) -> int:
    from tokenworks.cli import admin as admin_cli

    return admin_cli.dispatch(args)


def _ledger_admin(args: argparse.Namespace) -> int:
    from tokenworks.cli import ledger as ledger_cli

    return ledger_cli.dispatch(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenworks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=None, help="config file (or $TOKENWORKS_CONFIG)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_serve)

    from tokenworks.sim.profile import fault_help_text

    sim = sub.add_parser(
        "upstream-sim",
        help="run a simulated OpenAI-compatible token factory",
        epilog=fault_help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=18080)
    sim.add_argument("--profile", default="fast")
    sim.set_defaults(func=_upstream_sim)

    demo = sub.add_parser("demo", help="the whole system on the embedded default")
    demo.add_argument("--duration", type=float, default=None, help="seconds, then report and exit")
    demo.set_defaults(func=_demo)

    what_if = sub.add_parser("reprice", help="re-price recorded usage under a scenario")
    what_if.add_argument("--config", default=None, help="config file (or $TOKENWORKS_CONFIG)")
    what_if.add_argument("--scenario", required=True, help="scenario file (docs/pricing.md)")
    what_if.add_argument("--since", default=None)
    what_if.add_argument("--until", default=None)
    what_if.add_argument("--json", action="store_true")
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
