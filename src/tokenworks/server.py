"""`tokenworks serve`: load the config, build the app, run it under uvicorn."""

from __future__ import annotations

import gc
import os
import re
import sqlite3
import sys

import psycopg
import uvicorn

from tokenworks.config import CONFIG_ENV, ConfigError, load

GC_GEN0_THRESHOLD = 20_000  # objects; CPython's default of 700 collects every few requests

# What opening the stores raises when the database is unreachable or unusable.
DATABASE_ERRORS = (psycopg.Error, sqlite3.Error, OSError)


def serve(config_path: str | None, host: str, port: int) -> int:
    path = config_path or os.environ.get(CONFIG_ENV)
    if not path:
        print(f"tokenworks: no config; pass --config FILE or set {CONFIG_ENV}", file=sys.stderr)
        return 2
    try:
        config = load(path)
    except ConfigError as exc:
        print(f"tokenworks: {exc}", file=sys.stderr)
        return 2
    from tokenworks.app import build_app
    from tokenworks.serving import uvicorn_config

    try:
        app = build_app(config)
    except (ValueError, ConfigError) as exc:
        print(f"tokenworks: {exc}", file=sys.stderr)
        return 2
    except DATABASE_ERRORS as exc:
        print(
            f"tokenworks: cannot open the database {redacted(config.database)}: {one_line(exc)}",
            file=sys.stderr,
        )
        return 1
    # Everything built so far (the price book's dataset, modules, the config) lives as long as
    # the process: move it out of the cyclic collector's sight, so that collections scan only
    # what requests allocate. Per-request garbage is acyclic and freed by refcounting; a
    # larger young generation lets the collector run less often over what survives.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
    if not config.resolved_admin_key():
        print("tokenworks: no admin key set; the admin API is disabled", file=sys.stderr)
    server = uvicorn.Server(uvicorn_config(app, host=host, port=port, timeout_graceful_shutdown=10))
    server.run()
    # uvicorn returns (rather than raising) when the app's startup fails, e.g. a database
    # that went away between opening the stores and opening the ledger.
    return 0 if server.started else 1


def redacted(url: str) -> str:
    """A database URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (psycopg's span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
