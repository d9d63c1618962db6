"""The `tokenworks` command: one subcommand per operation; each imports only what it needs."""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    from tokenworks.server import serve

    return serve(config_path=args.config, host=args.host, port=args.port)


def _upstream_sim(args: argparse.Namespace) -> int:
    from tokenworks.producers.sim import serve

    return serve(host=args.host, port=args.port, profile=args.profile)


def _demo(args: argparse.Namespace) -> int:
    from tokenworks.demo import run

    return run(duration_s=args.duration)


def _admin(args: argparse.Namespace) -> int:
    from tokenworks import admin_cli

    return admin_cli.dispatch(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenworks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=None, help="config file (or $TOKENWORKS_CONFIG)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_serve)

    sim = sub.add_parser("upstream-sim", help="run a simulated OpenAI-compatible token factory")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=18080)
    sim.add_argument("--profile", default="fast")
    sim.set_defaults(func=_upstream_sim)

    demo = sub.add_parser("demo", help="the whole system on the embedded default")
    demo.add_argument("--duration", type=float, default=None, help="seconds, then report and exit")
    demo.set_defaults(func=_demo)

    from tokenworks.admin_cli import add_subcommands

    add_subcommands(sub, _admin)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    sys.exit(args.func(args))
