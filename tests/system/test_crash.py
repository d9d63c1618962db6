"""kill -9 the gateway under load, restart it, and audit: every answer a client received in
full is charged exactly once at the price it was shown, nothing is charged twice, and no hold
strands credit."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import httpx

from tests.conftest import ADMIN_KEY, running_sim
from tokenworks.server import free_port

CHAT = [{"role": "user", "content": "Write the incident report."}]
CREDIT_NANO = 10_000_000_000  # 10.00
LOAD_WORKERS = 12
MAX_REQUESTS_PER_WORKER = 40
LOAD_TIME_S = 8.0


def nano(text: str) -> int:
    return int(Decimal(text) * 1_000_000_000)


def start_gateway(config: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenworks", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TOKENWORKS_ADMIN_KEY": ADMIN_KEY},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("gateway did not start")


def test_kill_9_under_load_charges_every_finished_answer_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    with running_sim("fast") as sim:
        config = tmp_path / "gw.yaml"
        config.write_text(
            f"database: sqlite:///{db}\n"
            f"producers:\n  - {{name: s, base_url: '{sim.url}/v1', timeout_s: 10}}\n"
            "models:\n  - name: m\n    deployments:\n"
            "      - {producer: s, model: sim-small, cost: {input_per_mtok: '1', output_per_mtok: '2'}}\n"
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        proc = start_gateway(config, port)
        try:
            r = httpx.post(
                f"{url}/admin/v1/accounts",
                headers=admin,
                json={"name": "org", "parent": None, "idempotency_key": "org-1"},
            )
            assert r.status_code == 201, r.text
            account = r.json()["id"]
            r = httpx.post(
                f"{url}/admin/v1/accounts/{account}/topups",
                headers=admin,
                json={"amount": "10.00", "idempotency_key": "topup-1"},
            )
            assert r.status_code in (200, 201), r.text
            r = httpx.post(
                f"{url}/admin/v1/keys", headers=admin, json={"name": "agent", "account": account}
            )
            secret = r.json()["key"]

            finished: dict[str, int] = {}  # request id -> price the client was shown
            lock = threading.Lock()
            stop = threading.Event()

            def worker(index: int) -> None:
                headers = {"Authorization": f"Bearer {secret}"}
                for i in range(MAX_REQUESTS_PER_WORKER):
                    if stop.is_set():
                        return
                    stream = (index + i) % 2 == 0
                    body = {"model": "m", "messages": CHAT, "max_tokens": 30, "stream": stream}
                    if stream:
                        body["stream_options"] = {"include_usage": True}
                    try:
                        if stream:
                            with httpx.stream(
                                "POST", f"{url}/v1/chat/completions", headers=headers,
                                json=body, timeout=10,
                            ) as r:  # fmt: skip
                                request_id = r.headers.get("x-request-id")
                                text = r.read().decode()
                            if r.status_code != 200 or not text.rstrip().endswith("data: [DONE]"):
                                continue
                            usage = [e for e in text.split("\n\n") if '"usage":{' in e]
                            price = nano(json.loads(usage[-1][6:])["usage"]["cost"])
                        else:
                            r = httpx.post(
                                f"{url}/v1/chat/completions", headers=headers, json=body, timeout=10
                            )
                            if r.status_code != 200:
                                continue
                            request_id = r.headers["x-request-id"]
                            price = nano(r.headers["x-tokenworks-price"])
                    except (httpx.HTTPError, ValueError):
                        continue  # the server died under us: not a finished answer
                    with lock:
                        finished[request_id] = price

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(LOAD_WORKERS)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + LOAD_TIME_S
            while time.monotonic() < deadline and len(finished) < 30:
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            stop.set()
            for t in threads:
                t.join(timeout=15)
            assert len(finished) >= 10, "the load did not get going before the kill"
        finally:
            if proc.poll() is None:
                proc.kill()

        # The dead process's ledger as it was left on disk.
        with sqlite3.connect(db) as conn:
            holds = {
                row[0]: (row[1], row[2])
                for row in conn.execute("SELECT id, status, price_nano FROM ledger_holds")
            }
            usage = {
                row[0]: row[1] for row in conn.execute("SELECT request_id, price_nano FROM usage")
            }
        for request_id, price in finished.items():
            status, charged = holds.get(request_id, (None, None))
            assert status == "settled", (request_id, status)
            assert charged == price, (request_id, charged, price)
            # The usage row was committed in the settlement's transaction: none is lost.
            assert usage.get(request_id) == price, (request_id, usage.get(request_id), price)

        proc = start_gateway(config, port)
        try:
            r = httpx.get(f"{url}/admin/v1/ledger/check", headers=admin, timeout=60)
            assert r.status_code == 200 and r.json()["ok"], r.text
            r = httpx.get(f"{url}/admin/v1/accounts/{account}", headers=admin)
            balance = r.json()["balance"]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT status, price_nano FROM ledger_holds").fetchall()
        per_hold = conn.execute(
            "SELECT COUNT(*) FROM ledger_holds WHERE status = 'open'"
        ).fetchone()[0]
    assert per_hold == 0, "a hold was left open after restart"
    settled = sum(price for status, price in rows if status == "settled")
    # Charged exactly what was settled, once: nothing held, nothing charged twice.
    assert nano(balance["held"]) == 0
    assert nano(balance["available"]) == CREDIT_NANO - settled
    assert settled >= sum(finished.values())
