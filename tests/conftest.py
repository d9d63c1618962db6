"""Shared fixtures: simulated producers and gateways on 127.0.0.1, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import subprocess
import textwrap
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tokenworks.app import build_app
from tokenworks.config import loads
from tokenworks.server import serve_in_thread

ADMIN_KEY = "test-admin-key"
_CLI_LOCK = threading.Lock()  # the CLI reads os.environ and writes sys.stdout: one at a time


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m tokenworks ARGS` with `env` set, run in this process: the same parser and
    commands, exit status, stdout and stderr, without the 1.4 s a Python process takes to
    start (the README tests run the installed executable itself)."""
    from tokenworks.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with _CLI_LOCK:
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    main(list(args))
                    code = 0
                except SystemExit as exc:  # as the interpreter turns one into a status
                    if exc.code is None or isinstance(exc.code, int):
                        code = exc.code or 0
                    else:
                        print(exc.code, file=err)
                        code = 1
                except Exception:
                    traceback.print_exc(file=err)
                    code = 1
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return subprocess.CompletedProcess(["tokenworks", *args], code, out.getvalue(), err.getvalue())


# The PostgreSQL server the `database` fixture's postgres variant makes its schemas in.
PG_URL = os.environ.get("TOKENWORKS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
STORES = ["sqlite", "postgres"]
# Run a test once per store: `@both_stores` on a test, or `pytestmark = both_stores`.
both_stores = pytest.mark.parametrize("database", STORES, indirect=True)


@dataclass
class Sim:
    url: str  # base URL, without /v1

    def fault(self, kind: str, count: int = 1) -> None:
        r = httpx.post(f"{self.url}/sim/faults", json={"kind": kind, "count": count})
        r.raise_for_status()

    def clear_faults(self) -> None:
        httpx.delete(f"{self.url}/sim/faults").raise_for_status()

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/sim/stats").json()

    def reset(self) -> None:
        httpx.post(f"{self.url}/sim/reset").raise_for_status()
        self.clear_faults()


@contextlib.contextmanager
def running_sim(profile: str = "instant") -> Iterator[Sim]:
    from tokenworks.sim import build_app as build_sim

    with serve_in_thread(build_sim(profile)) as url:
        yield Sim(url)


@dataclass
class Gateway:
    url: str
    app: object
    database: str | Path  # the database URL (a bare Path means a SQLite file)

    @property
    def database_url(self) -> str:
        return self.database if isinstance(self.database, str) else f"sqlite:///{self.database}"

    @property
    def db_path(self) -> Path:
        """The SQLite file; only for tests that read it directly."""
        if isinstance(self.database, Path):
            return self.database
        assert self.database.startswith("sqlite:///"), f"not a SQLite gateway: {self.database}"
        return Path(self.database.removeprefix("sqlite:///"))

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def admin(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}", **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kwargs)

    def create_key(self, name: str = "test", models: list[str] | None = None, **extra) -> dict:
        r = self.admin("POST", "/admin/v1/keys", json={"name": name, "models": models, **extra})
        assert r.status_code == 201, r.text
        return r.json()

    def usage(self, **params: str) -> list[dict]:
        r = self.admin("GET", "/admin/v1/usage", params=params)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def ledger(self, use: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run `use(ledger)` on the gateway's own event loop (the ledger is loop-bound)."""
        gateway = self.app.state.gateway
        return asyncio.run_coroutine_threadsafe(use(gateway.ledger), gateway.loop).result(30)

    def funded_key(self, amount_nano: int, name: str = "payer", **key: Any) -> tuple[int, dict]:
        """A fresh account holding `amount_nano` of credit, and a key that pays from it."""

        async def setup(ledger: Any) -> int:
            account = await ledger.create_account(
                name, None, "organisation", idempotency_key=f"acct:{name}"
            )
            if amount_nano:
                await ledger.top_up(account.id, amount_nano, idempotency_key=f"topup:{name}")
            return account.id

        account_id = self.ledger(setup)
        return account_id, self.create_key(name=name, account=account_id, **key)

    def records(self, expect: int = 1, timeout_s: float = 5.0) -> list:
        """Usage records, waiting (bounded) for at least `expect` of them: a stream's record
        is written just after its last byte, so a fast client can look before it lands."""
        store = self.app.state.gateway.store
        deadline = time.monotonic() + timeout_s
        while True:
            store.flush()
            records = store.records()
            if len(records) >= expect or time.monotonic() > deadline:
                return records
            time.sleep(0.02)


def gateway_config(
    database: str | Path,
    producers: dict[str, str | tuple[str, float]],
    models: str,
    extra: str = "",
) -> str:
    """A config for producers given as `name: url` or `name: (url, timeout_s)`, on a database
    URL (or a SQLite file path)."""
    url = database if isinstance(database, str) else f"sqlite:///{database}"
    lines = [f"database: {url}", f"admin_key: {ADMIN_KEY}", "producers:"]
    for name, where in producers.items():
        url, timeout_s = where if isinstance(where, tuple) else (where, 5.0)
        lines += [f"  - name: {name}", f"    base_url: {url}/v1", f"    timeout_s: {timeout_s}"]
    return "\n".join(lines) + "\n" + with_prices(textwrap.dedent(models)) + textwrap.dedent(extra)


# Test deployments cost 1.00 input / 2.00 output per million tokens unless they say otherwise:
# the gateway refuses a deployment with no known cost.
TEST_COST = '{input_per_mtok: "1.00", output_per_mtok: "2.00"}'


def with_prices(models: str) -> str:
    return re.sub(r"(\{producer: [^{}]*?)\}", rf"\1, cost: {TEST_COST}}}", models)


@contextlib.contextmanager
def running_gateway(config_text: str, database: str | Path) -> Iterator[Gateway]:
    app = build_app(loads(config_text, "test.yaml"))
    with serve_in_thread(app) as url:
        yield Gateway(url, app, database)


# ---------------------------------------------------------------------- databases

_pg_reachable: bool | None = None


def require_postgres() -> None:
    """Skip, loudly, when PostgreSQL does not answer at PG_URL; fail instead when CI=true."""
    global _pg_reachable
    if _pg_reachable is None:
        import psycopg

        try:
            psycopg.connect(PG_URL, connect_timeout=3).close()
            _pg_reachable = True
        except psycopg.Error:
            _pg_reachable = False
    if not _pg_reachable:
        reason = (
            f"POSTGRESQL NOT REACHABLE AT {PG_URL}: THE POSTGRES STORE TESTS DID NOT RUN "
            "(set TOKENWORKS_TEST_PG)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true requires it)")
        warnings.warn(reason, stacklevel=2)
        pytest.skip(reason)


def drop_pg_schemas(prefix: str) -> None:
    """Drop the schema `prefix` and every `prefix_*` schema (make_gateway's named ones)."""
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=5) as c:
        c.execute("SET lock_timeout = '10s'")
        names = c.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname = %s OR nspname LIKE %s",
            (prefix, prefix.replace("_", "\\_") + "\\_%"),
        ).fetchall()
        for (name,) in names:
            c.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def database_named(database: str, name: str) -> str:
    """A second database next to `database` for make_gateway(name=...); "gw" is itself."""
    if name == "gw":
        return database
    if database.startswith("sqlite:///"):
        path = Path(database.removeprefix("sqlite:///"))
        return f"sqlite:///{path.with_name(f'{name}.db')}"
    return f"{database}_{name}"


@pytest.fixture
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database URL: SQLite in tmp_path by default; parametrize it indirectly over
    STORES (`both_stores`) for a fresh PostgreSQL schema per test, dropped afterwards."""
    kind = getattr(request, "param", "sqlite")
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'gw.db'}"
        return
    assert kind == "postgres", kind
    require_postgres()
    schema = f"tw_{uuid.uuid4().hex[:12]}"
    try:
        yield f"{PG_URL}?schema={schema}"
    finally:
        drop_pg_schemas(schema)


@pytest.fixture(scope="session")
def sim_a() -> Iterator[Sim]:
    with running_sim("instant") as sim:
        yield sim


@pytest.fixture(scope="session")
def sim_b() -> Iterator[Sim]:
    with running_sim("instant") as sim:
        yield sim


@pytest.fixture
def sims(sim_a: Sim, sim_b: Sim) -> Iterator[tuple[Sim, Sim]]:
    sim_a.reset()
    sim_b.reset()
    yield sim_a, sim_b
    sim_a.clear_faults()
    sim_b.clear_faults()


MODELS = """\
models:
  - name: chat-fast
    deployments:
      - {producer: a, model: sim-small}
      - {producer: b, model: sim-small}
  - name: chat-a-only
    deployments:
      - {producer: a, model: sim-large}
  - name: embed
    deployments:
      - {producer: a, model: sim-embed}
"""


@pytest.fixture
def gateway(sims: tuple[Sim, Sim], database: str) -> Iterator[Gateway]:
    a, b = sims
    text = gateway_config(database, {"a": a.url, "b": b.url}, MODELS)
    with running_gateway(text, database) as gw:
        yield gw


@pytest.fixture
def make_gateway(database: str) -> Iterator[Callable[..., contextlib.AbstractContextManager]]:
    def make(
        producers: dict[str, str | tuple[str, float]],
        models: str,
        extra: str = "",
        name: str = "gw",
    ):
        db = database_named(database, name)
        return running_gateway(gateway_config(db, producers, models, extra), db)

    yield make


def pytest_report_header(config: pytest.Config) -> str:
    return f"CI={os.environ.get('CI', '')}"
