"""`tokenworks serve`: load the config, build the app, run it under uvicorn."""

from __future__ import annotations

import gc
import os
import sys

import uvicorn

from tokenworks.config import CONFIG_ENV, ConfigError, load

GC_GEN0_THRESHOLD = 20_000  # objects; CPython's default of 700 collects every few requests


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

    try:
        app = build_app(config)
    except ValueError as exc:
        print(f"tokenworks: {exc}", file=sys.stderr)
        return 2
    # Everything built so far (the price book's dataset, modules, the config) lives as long as
    # the process: move it out of the cyclic collector's sight, so that collections scan only
    # what requests allocate. Per-request garbage is acyclic and freed by refcounting; a
    # larger young generation lets the collector run less often over what survives.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
    if not config.resolved_admin_key():
        print("tokenworks: no admin key set; the admin API is disabled", file=sys.stderr)
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0
