"""A simulated OpenAI-compatible token factory: `tokenworks upstream-sim`.

It stands in for a real provider in the gateway's tests, the demo and the load benchmarks: it
speaks the OpenAI wire format, produces deterministic one-token words (so usage is exact), has a
capacity model (tokens/s shared by streams, slots, a bounded queue, time to first token, peak
hours) and serves faults on demand. Control endpoints under /sim/ expose what it did.

Public API: `SimProfile`, `PROFILES`, `FAULT_KINDS`, `build_app`, `get_profile`, `serve`,
`running_sim`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from tokenworks.server import serve_in_thread
from tokenworks.sim.app import SimApp, install_log_filter
from tokenworks.sim.profile import FAULT_KINDS, PROFILES, SimProfile

__all__ = [
    "FAULT_KINDS",
    "PROFILES",
    "SimApp",
    "SimProfile",
    "build_app",
    "get_profile",
    "running_sim",
    "serve",
]

GRACEFUL_SHUTDOWN_S = 2  # in-flight hung requests are cut after this on shutdown


def get_profile(profile: str | SimProfile) -> SimProfile:
    if isinstance(profile, SimProfile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown sim profile {profile!r}; known: {known}") from None


def build_app(profile: str | SimProfile = "instant") -> SimApp:
    """The raw ASGI app of one simulated producer; its state (stats, faults) lives on it."""
    install_log_filter()
    return SimApp(get_profile(profile))


def _config(app: SimApp, log_level: str, **kwargs: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        loop="auto",
        http="auto",
        lifespan="on",
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        **kwargs,
    )


def serve(host: str, port: int, profile: str) -> int:
    """Run the sim until interrupted (blocking); the CLI's `upstream-sim`. Returns an exit code."""
    try:
        app = build_app(profile)
    except ValueError as exc:
        print(f"tokenworks upstream-sim: {exc}", file=sys.stderr)
        return 2
    print(
        f"tokenworks upstream-sim: profile {app.profile.name!r} on http://{host}:{port}/v1 "
        "(control: /sim/stats, /sim/faults, /sim/reset)",
        file=sys.stderr,
    )
    uvicorn.Server(_config(app, "info", host=host, port=port)).run()
    return 0


@contextmanager
def running_sim(profile: str | SimProfile = "instant") -> Iterator[str]:
    """Run a sim on a free 127.0.0.1 port in a background thread; yield its base URL.

    The URL has no path: clients use f"{url}/v1" as the OpenAI base URL and f"{url}/sim/..."
    for control. The server is stopped, and its thread joined, on exit.
    """
    with serve_in_thread(build_app(profile)) as url:
        yield url
