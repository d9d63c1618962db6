"""Instructions per request of the gateway, ledger off and on, counted by callgrind.

On a shared machine, time per request moves by 10-20 % between runs; instructions executed
do not (the same figure to within about 1 % run to run). This starts the sim, then for each
target a gateway under `valgrind --tool=callgrind` with instrumentation off while it starts
and warms up, switches counting on for `--requests` requests (all of the gateway's threads:
the event loop and the SQLite writers), dumps, and divides. PostgreSQL's own work happens in
its processes and is not counted: with `--pg`, the figure is what the ledger costs the
gateway's core.

    .venv/bin/python bench/instructions.py [--requests 1000] [--concurrency 16] [--pg [URL]]
        [--stream] [--routes chat,messages,responses,messages-translated,...]

`--routes` compares the dialects instead (ledger off): `chat`, `messages` and `responses`
passed through to a producer that speaks all three, and `messages-translated` and
`responses-translated` on a producer that speaks chat completions only.

Under valgrind the gateway runs about 50 times slower, so a commit carries more requests
than at full speed (SQLite lingers 2 ms for more): read the ratios, not the absolute figures,
as the ledger's cost. Bounded: each load is limited in requests and in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import loadgen
import run
import uvloop

MAX_REQUESTS = 20_000
START_TIMEOUT_S = 300.0


SYSTEM, USER = run.PROMPT[0]["content"], run.PROMPT[1]["content"]


def route_request(route: str, stream: bool) -> tuple[str, bytes]:
    """The bench conversation as `route` (chat, messages, responses) asks it: path and body."""
    if route == "chat":
        return "/v1/chat/completions", run.request_body(stream)
    extra: dict[str, object] = {"stream": True} if stream else {}
    if route == "messages":
        body: dict[str, object] = {
            "model": "bench", "system": SYSTEM, "max_tokens": 16,
            "messages": [{"role": "user", "content": USER}], **extra,
        }  # fmt: skip
    else:
        body = {"model": "bench", "instructions": SYSTEM, "input": USER, "max_output_tokens": 16}
        body.update(extra)
    return f"/v1/{route}", json.dumps(body, separators=(",", ":")).encode()


def count(target: str, args: argparse.Namespace, work: Path, sim_port: int) -> tuple[int, float]:
    """(requests measured, instructions per request) of one gateway."""
    servers = run.Servers(work / target)
    (work / target).mkdir()
    port = run.free_port()
    schema = f"tw_instr_{uuid.uuid4().hex[:10]}"
    template = run.GATEWAY_CONFIG
    route, _, translated = target.partition("-")
    if args.routes:  # the producer speaks every format, or (translated) chat completions only
        formats = "[chat]" if translated else "[chat, messages, responses]"
        template = template.replace(
            "    kind: openai\n", f"    kind: openai\n    formats: {formats}\n"
        )
    if target == "on-pg":
        template = template.replace("sqlite:///{db}", run.pg_database(args.pg, schema))
    config = work / target / "gateway.yaml"
    config.write_text(template.format(db=work / target / "gateway.db", sim_port=sim_port))
    out = work / target / "callgrind.out"
    argv = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        *run.tokenworks_argv("serve", "--config", str(config), "--port", str(port)),
    ]  # fmt: skip
    try:
        gateway = servers.start("gateway", argv, None, env={"TOKENWORKS_ADMIN_KEY": run.ADMIN_KEY})
        run.wait_http(f"http://127.0.0.1:{port}/healthz", servers)
        if target == "off" or args.routes:
            admin = f"http://127.0.0.1:{port}/admin/v1/keys"
            key = str(run.post_json(admin, {"name": "bench"}, run.ADMIN_KEY)["key"])
        else:
            key = run.funded_key(port)[0]
        path, body = route_request(route if args.routes else "chat", args.stream)
        request = loadgen.build_request("127.0.0.1", port, path, body, key)
        load = {"stream": args.stream, "concurrency": args.concurrency, "duration_s": 300.0}
        uvloop.run(loadgen.run("127.0.0.1", port, request, max_requests=200, **load))  # warm
        control = ["callgrind_control", "--instr=on", str(gateway.pid)]
        subprocess.run(control, check=True, capture_output=True, timeout=60)
        result = uvloop.run(
            loadgen.run("127.0.0.1", port, request, max_requests=args.requests, **load)
        )
        control[1] = "--instr=off"
        subprocess.run(control, check=True, capture_output=True, timeout=60)
        subprocess.run(
            ["callgrind_control", "--dump", str(gateway.pid)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        dumps = sorted(out.parent.glob("callgrind.out.*"))
        assert dumps, "callgrind wrote no dump"
        text = dumps[-1].read_text(errors="replace")
        # A dump holds one part per thread context; each ends with its totals.
        totals = [int(n) for n in re.findall(r"^totals:\s+(\d+)", text, re.M)]
        assert totals, f"no totals in {dumps[-1]}"
        if result.errors:
            raise RuntimeError(f"{target}: {result.errors} errors: {result.first_error}")
        return result.requests, sum(totals) / max(result.requests, 1)
    finally:
        servers.close()
        if target == "on-pg":
            with contextlib.suppress(OSError):
                run.drop_pg_schema(args.pg, schema)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--pg", nargs="?", const=run.DEFAULT_PG)
    parser.add_argument("--routes", type=lambda v: [r for r in v.split(",") if r])
    args = parser.parse_args()
    args.requests = min(args.requests, MAX_REQUESTS)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("instructions: valgrind is missing (Debian: apt-get install valgrind)")
        return 2
    run.START_TIMEOUT_S = START_TIMEOUT_S  # startup under valgrind is slow
    work = Path(tempfile.mkdtemp(prefix="tokenworks-instructions-"))
    sims = run.Servers(work)
    sim_port = run.free_port()
    targets = args.routes or ["off", "on", *(["on-pg"] if args.pg else [])]
    figures: dict[str, float] = {}
    try:
        sims.start(
            "sim",
            run.tokenworks_argv("upstream-sim", "--port", str(sim_port), "--profile", "instant"),
            None,
        )
        run.wait_http(f"http://127.0.0.1:{sim_port}/sim/stats", sims)
        workload = "chat-stream" if args.stream else "chat"
        print(f"{workload}, c{args.concurrency}: k instructions per request (all gateway threads)")
        for target in targets:
            n, per_request = count(target, args, work, sim_port)
            figures[target] = per_request
            ratio = per_request / figures[targets[0]]
            print(f"{target:<6} {per_request / 1e3:9.1f}  x{ratio:.3f}  ({n} requests)", flush=True)
    finally:
        sims.close()
        print(f"instructions: logs and callgrind dumps in {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
