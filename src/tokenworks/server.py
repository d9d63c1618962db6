"""Run the gateway under uvicorn: `tokenworks serve`, the HTTP protocol with bounds on request
heads, the server config both use, and a background-thread server for tests, the demo and
benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import re
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tokenworks.api.errors import error_body
from tokenworks.config import CONFIG_ENV, Config, ConfigError, Http, load

START_TIMEOUT_S = 15.0
GC_GEN0_THRESHOLD = 20_000  # objects; CPython's default of 700 collects every few requests
# What opening the stores raises when the database is unreachable or unusable.
DATABASE_ERRORS = (psycopg.Error, sqlite3.Error, OSError)


class HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a head that was refused."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with what it lacks: a bound on a request head's size
    (431) and on the time a client takes to send it (slowloris, 408 or a plain close).

    A head that completes within the chunks received is measured once, at its end (the URL
    and the headers as parsed). One still incomplete after a chunk counts that chunk's bytes,
    so a huge header is refused before it has all arrived, with at most one read beyond the
    bound buffered. The clock is lazy: a request only notes when its head began (its first
    byte; a new connection's opening); one timer per connection checks, armed again only
    while a head is in progress, so a request costs no timer of its own.
    """

    max_header_bytes = 16 * 1024
    header_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._partial_head_bytes = 0
        self._head_started_s = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_started_s = self.loop.time()
        self._arm_head_timer(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    # The per-request overrides call the base class directly (no super() object): they run
    # on every request, and the bound must cost next to nothing.
    def data_received(self, data: bytes) -> None:
        HttpToolsProtocol.data_received(self, data)
        if self._in_head:  # this whole chunk is part of a head still open
            self._partial_head_bytes += len(data)
            if self._partial_head_bytes > self.max_header_bytes:
                self._refuse_too_large()

    def on_message_begin(self) -> None:
        HttpToolsProtocol.on_message_begin(self)
        self._in_head = True
        self._partial_head_bytes = 0
        self._head_started_s = self.loop.time()
        if self._head_timer is None:
            self._arm_head_timer(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._in_head = False
        size = len(self.url)
        for name, value in self.headers:
            size += len(name) + len(value)
        if size > self.max_header_bytes:
            self._refuse_too_large()
            raise HeadRefused  # stops the parser: no request is started, its body ignored
        HttpToolsProtocol.on_headers_complete(self)

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # the parser error that HeadRefused raises is already answered
            HttpToolsProtocol.send_400_response(self, msg)

    def _refuse_too_large(self) -> None:
        self._refuse(431, f"request headers exceed {self.max_header_bytes} bytes")

    def _arm_head_timer(self, delay_s: float) -> None:
        self._head_timer = self.loop.call_later(delay_s, self._head_timer_fired)

    def _head_timer_fired(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return  # no head in progress: the next one arms the timer again
        left_s = self._head_started_s + self.header_timeout_s - self.loop.time()
        if left_s > 0:
            self._arm_head_timer(left_s)
        elif self._partial_head_bytes:
            self._refuse(408, f"request headers not received within {self.header_timeout_s:g} s")
        else:
            self.transport.close()  # connected and never said a word: nobody to answer

    def _refuse(self, status: int, message: str) -> None:
        if self._refused:
            return
        self._refused = True
        self._in_head = False
        body = error_body(status, message, code="bad_request_head")
        phrase = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, phrase, len(body), body)
        )
        self.transport.close()


def bounded_protocol(http: Http) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for uvicorn, carrying the config's bounds."""
    return type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {"max_header_bytes": http.max_header_bytes, "header_timeout_s": http.header_timeout_s},
    )


def uvicorn_config(app: Any, **kwargs: Any) -> uvicorn.Config:
    """How every tokenworks server runs: uvloop, httptools with bounded heads (the app's
    own bounds when it is a gateway, `app.state.http`, else the defaults), quiet logs."""
    http = getattr(getattr(app, "state", None), "http", None) or Http()
    return uvicorn.Config(
        app,
        loop="uvloop",
        http=bounded_protocol(http),
        log_level="warning",
        **{"access_log": False, **kwargs},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `app` until the block exits; yields its base URL (`http://127.0.0.1:PORT`).

    The socket is bound here and handed to uvicorn, so a port picked by the OS cannot be
    taken by someone else between choosing and listening.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port or 0))
    port = int(sock.getsockname()[1])
    config = uvicorn_config(app, lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {host}:{port} did not start")
            time.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def serve(config_path: str | None, host: str, port: int, access_log: bool = False) -> int:
    path = config_path or os.environ.get(CONFIG_ENV)
    if not path:
        print(f"tokenworks: no config; pass --config FILE or set {CONFIG_ENV}", file=sys.stderr)
        return 2
    try:
        config = load(path)
    except ConfigError as exc:
        print(f"tokenworks: {exc}", file=sys.stderr)
        return 2
    busy = database_in_use(config.database)
    if busy is not None:
        print(f"tokenworks: {busy}", file=sys.stderr)
        return 1
    from tokenworks.app import build_app

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
    app.state.gateway.freeze_gc_after_start = True  # and the ledger's state, once loaded
    for line in startup_summary(config, path, host, port):
        print(line, file=sys.stderr)
    uv_config = uvicorn_config(
        app, host=host, port=port, timeout_graceful_shutdown=10, access_log=access_log
    )
    if access_log:  # uvicorn's access lines are INFO; everything else of its stays quiet
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    server = uvicorn.Server(uv_config)
    server.run()
    # uvicorn returns (rather than raising) when the app's startup fails, e.g. a database
    # that went away between opening the stores and opening the ledger.
    return 0 if server.started else 1


def database_in_use(url: str) -> str | None:
    """Why this SQLite database cannot be served (another `serve` holds its lock), with the
    fix; None when it is free. Checked before anything opens, so the answer is one line
    rather than a failed startup's traceback."""
    from tokenworks.db import backend, sqlite_path

    if backend(url) != "sqlite" or sqlite_path(url) == ":memory:":
        return None
    lock = sqlite_path(url) + ".lock"
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return None  # no lock file yet: nobody has served it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return (
            f"the database {sqlite_path(url)} is in use by another `tokenworks serve` "
            f"(it holds {lock}): stop that one, or point this config's `database:` elsewhere"
        )
    finally:
        os.close(fd)  # closing drops the lock, if taken
    return None


def startup_summary(config: Config, path: str, host: str, port: int) -> list[str]:
    """What `serve` says before it listens: where, on which database, with which producers
    (and whether their keys are set), serving which models."""
    import tokenworks

    shown_host = f"[{host}]" if ":" in host else host
    lines = [
        f"tokenworks {tokenworks.__version__}: serving http://{shown_host}:{port}/v1 "
        f"(admin API at /admin/v1, metrics at /metrics)",
        f"  config:    {os.path.abspath(path)}",
        f"  database:  {redacted(config.database)}",
    ]
    for p in config.producers:
        if not p.api_key_env:
            key = "no key"
        elif os.environ.get(p.api_key_env):
            key = f"key from ${p.api_key_env}"
        else:
            key = f"${p.api_key_env} UNSET"
        lines.append(f"  producer:  {p.name} {p.base_url} ({key})")
    for m in config.models:
        via = ", ".join(f"{d.producer}/{d.model}" for d in m.deployments)
        lines.append(f"  model:     {m.name} -> {via}")
    for p in config.producers:
        if p.api_key_env and not os.environ.get(p.api_key_env):
            lines.append(
                f"warning: ${p.api_key_env} is unset: producer {p.name!r} is sent no key "
                "(fine for a local server; a hosted provider refuses), export it and restart"
            )
    if not config.resolved_admin_key():
        lines.append(
            "warning: no admin key set; the admin API is disabled (export TOKENWORKS_ADMIN_KEY)"
        )
    return lines


def redacted(url: str) -> str:
    """A database URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (psycopg's span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
