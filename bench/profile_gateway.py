"""Where the gateway's time goes under the benchmark's load: py-spy on the pinned gateway.

Starts the sim and the gateway as bench/run.py does (gateway on CPU 0; sim, load generator and
py-spy on CPU 1), then for each workload drives it at the given concurrency while
`py-spy record --gil --nonblocking` samples the gateway (only the thread holding the
GIL, i.e. where its one core's Python time goes), and prints the top functions by own time
(leaf samples) and by inclusive time, and the share of each package.

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile_gateway.py [--seconds 8] [--concurrency 64] [--ledger]

`--ledger` profiles the ledger on: the key pays from a funded account (hold, durable settle);
`--pg [URL]` puts the gateway's database (usage and ledger) on PostgreSQL.

Raw stacks (py-spy's collapsed format) are left in the log folder it prints.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import loadgen
import run
import uvloop

# Where a frame's file lives -> the part of the system it stands for.
PACKAGE_PATTERNS = (
    ("tokenworks/dispatch/relay.py", "tokenworks.relay"),
    ("tokenworks/dispatch/billing.py", "tokenworks.relay"),
    ("tokenworks/dispatch/stream.py", "tokenworks.relay"),
    ("tokenworks/dispatch/recording.py", "tokenworks.relay"),
    ("tokenworks/wire/openai.py", "tokenworks.relay"),
    ("tokenworks/api/", "tokenworks.api"),
    ("tokenworks/keys/store.py", "tokenworks.keys.store"),
    ("tokenworks/metering/", "tokenworks.metering"),
    ("tokenworks/ledger/", "tokenworks.ledger"),
    ("tokenworks/pricing/", "tokenworks.pricing"),
    ("tokenworks/producers/", "tokenworks.producers"),
    ("tokenworks/", "tokenworks.other"),
    ("starlette/", "starlette"),
    ("aiohttp/", "aiohttp"),
    ("uvicorn/", "uvicorn"),
    ("prometheus_client/", "prometheus_client"),
    ("msgspec/", "msgspec"),
    ("multidict/", "multidict/yarl"),
    ("yarl/", "multidict/yarl"),
    ("asyncio/", "asyncio"),
    ("sqlite3/", "sqlite3"),
)
# Outer frames that every sample of the event loop shares; they say nothing about the work.
ROOT_FRAMES = frozenset(
    {"<module>", "main", "_serve", "serve", "run", "Server.run", "asyncio_run", "Runner.run"}
)
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def package_of(path: str) -> str:
    for pattern, name in PACKAGE_PATTERNS:
        if pattern in path:
            return name
    return "other: " + Path(path).name


def short(path: str) -> str:
    for marker in ("site-packages/", "src/", "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def summarize(raw: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        threads[frames[0].rsplit(" ", 1)[-1]] += count
        parsed = [m for f in frames[1:] if (m := FRAME.match(f))]
        if not parsed:
            continue
        total += count
        seen: set[str] = set()
        for m in parsed:
            if m["func"] in ROOT_FRAMES:
                continue
            name = f"{m['func']} ({short(m['file'])})"
            if name not in seen:
                seen.add(name)
                inclusive[name] += count
        leaf = parsed[-1]
        own[f"{leaf['func']} ({short(leaf['file'])})"] += count
        packages[package_of(leaf["file"])] += count
    if not total:
        return "no samples"

    def table(counter: collections.Counter[str], n: int) -> list[str]:
        return [f"  {100 * c / total:5.1f}%  {name}" for name, c in counter.most_common(n)]

    return "\n".join(
        [
            f"{total} samples; by thread: "
            + ", ".join(f"{t} {100 * c / total:.1f}%" for t, c in threads.most_common()),
            "own time by package (leaf frame):",
            *table(packages, 20),
            f"top {top} functions by own time:",
            *table(own, top),
            f"top {top} functions by inclusive time (event-loop root frames left out):",
            *table(inclusive, top),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--ledger", action="store_true", help="a key that pays: the ledger on")
    parser.add_argument(
        "--pg",
        nargs="?",
        const=run.DEFAULT_PG,
        help="the gateway's database on PostgreSQL (a fresh schema, dropped at the end)",
    )
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("profile_gateway: py-spy is missing: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    gw_cpus, lg_cpus = run.pick_cpus(None)
    work = Path(tempfile.mkdtemp(prefix="tokenworks-profile-"))
    servers = run.Servers(work)
    sim_port, gw_port = run.free_port(), run.free_port()
    schema = f"tw_profile_{uuid.uuid4().hex[:10]}"
    database = run.pg_database(args.pg, schema) if args.pg else "sqlite:///{db}"
    try:
        servers.start(
            "sim",
            run.tokenworks_argv("upstream-sim", "--port", str(sim_port), "--profile", "instant"),
            lg_cpus,
        )
        config = work / "gateway.yaml"
        config.write_text(
            run.GATEWAY_CONFIG.replace("sqlite:///{db}", database).format(
                db=work / "usage.db", sim_port=sim_port
            )
        )
        gateway = servers.start(
            "gateway",
            run.tokenworks_argv("serve", "--config", str(config), "--port", str(gw_port)),
            gw_cpus,
            env={"TOKENWORKS_ADMIN_KEY": run.ADMIN_KEY},
        )
        run.wait_http(f"http://127.0.0.1:{sim_port}/sim/stats", servers)
        run.wait_http(f"http://127.0.0.1:{gw_port}/healthz", servers)
        if args.ledger:
            key = run.funded_key(gw_port)[0]
        else:
            key = str(
                run.post_json(
                    f"http://127.0.0.1:{gw_port}/admin/v1/keys", {"name": "bench"}, run.ADMIN_KEY
                )["key"]
            )
        if lg_cpus:
            os.sched_setaffinity(0, lg_cpus)
        for name, stream in (("chat", False), ("chat-stream", True)):
            request = loadgen.build_request(
                "127.0.0.1", gw_port, "/v1/chat/completions", run.request_body(stream), key
            )
            load = {"stream": stream, "concurrency": args.concurrency, "max_requests": 10**7}
            uvloop.run(loadgen.run("127.0.0.1", gw_port, request, duration_s=1.0, **load))
            raw = work / f"{name}-c{args.concurrency}.txt"
            spy = subprocess.Popen(
                [py_spy, "record", "--pid", str(gateway.pid), "--duration",
                 str(int(args.seconds)), "--rate", str(args.rate), "--format", "raw",
                 "--gil", "--nonblocking", "--threads", "--output", str(raw)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(0.3)
            result = uvloop.run(
                loadgen.run("127.0.0.1", gw_port, request, duration_s=args.seconds - 0.5, **load)
            )
            spy.wait(timeout=args.seconds + 30)
            print(
                f"\n== {name} c{args.concurrency}: {result.rps:,.0f} req/s under py-spy, "
                f"p50 {result.latency_ms(50):.2f} ms, errors {result.errors}"
            )
            print(summarize(raw, args.top) if raw.exists() else "py-spy wrote nothing")
    finally:
        servers.close()
        if args.pg:
            run.drop_pg_schema(args.pg, schema)
        print(f"\nprofile_gateway: raw stacks and logs in {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
