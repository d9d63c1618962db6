"""Where the ledger's cost goes: the gateway's CPU per request, ledger on and off, by thread,
with Python's cyclic GC on and off.

Starts the sim (CPU 1) and four gateways pinned to CPU 0, as bench/run.py does: ledger off (a
key without an account) and on (a key paying from a funded account), each once as shipped and
once with `gc.disable()` before the server starts (a diagnostic, not a setting to ship). For
each workload at c64 it measures each gateway in turn for a fixed time and reads the
process's CPU time from /proc: total, the event loop's thread, and the other threads (the
ledger's SQLite writer, the usage writer). Bounded: 0.5 s warm-up + `--seconds` per cell.

    .venv/bin/python bench/ledger_cpu.py [--seconds 2.5] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import loadgen
import run
import uvloop

GATEWAYS = ("off", "on", "off-nogc", "on-nogc")


def nogc_argv(*args: str) -> list[str]:
    code = "import gc; gc.disable(); from tokenworks.cli import main; main()"
    return [sys.executable, "-c", code, *args]


def cpu_by_thread(pid: int) -> tuple[float, float]:
    """(event loop thread, all other threads) CPU seconds of a process so far."""
    tick = os.sysconf("SC_CLK_TCK")
    main_s = other_s = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        used = (int(fields[11]) + int(fields[12])) / tick
        if int(tid) == pid:
            main_s += used
        else:
            other_s += used
    return main_s, other_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.5)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    gw_cpus, lg_cpus = run.pick_cpus(None)
    work = Path(tempfile.mkdtemp(prefix="tokenworks-ledger-cpu-"))
    servers = run.Servers(work)
    ports = {n: run.free_port() for n in ("sim", *GATEWAYS)}
    try:
        servers.start(
            "sim",
            run.tokenworks_argv(
                "upstream-sim", "--port", str(ports["sim"]), "--profile", "instant"
            ),
            lg_cpus,
        )
        procs = {}
        for name in GATEWAYS:
            config = work / f"{name}.yaml"
            config.write_text(
                run.GATEWAY_CONFIG.format(db=work / f"{name}.db", sim_port=ports["sim"])
            )
            argv = nogc_argv if name.endswith("nogc") else run.tokenworks_argv
            procs[name] = servers.start(
                name,
                argv("serve", "--config", str(config), "--port", str(ports[name])),
                gw_cpus,
                env={"TOKENWORKS_ADMIN_KEY": run.ADMIN_KEY},
            )
        run.wait_http(f"http://127.0.0.1:{ports['sim']}/sim/stats", servers)
        keys = {}
        for name in GATEWAYS:
            run.wait_http(f"http://127.0.0.1:{ports[name]}/healthz", servers)
            if name.startswith("on"):
                keys[name] = run.funded_key(ports[name])[0]
            else:
                url = f"http://127.0.0.1:{ports[name]}/admin/v1/keys"
                keys[name] = str(run.post_json(url, {"name": "bench"}, run.ADMIN_KEY)["key"])
        if lg_cpus:
            os.sched_setaffinity(0, lg_cpus)
        print("workload     gateway     req/s   p50 ms  CPU %  us/req  loop us  others us")
        for workload, stream in (("chat", False), ("chat-stream", True)):
            for name in GATEWAYS:
                port = ports[name]
                body = run.request_body(stream)
                request = loadgen.build_request(
                    "127.0.0.1", port, "/v1/chat/completions", body, keys[name]
                )
                load = {"stream": stream, "concurrency": args.concurrency, "max_requests": 10**6}
                uvloop.run(loadgen.run("127.0.0.1", port, request, duration_s=0.5, **load))
                m0, o0 = cpu_by_thread(procs[name].pid)
                t0 = time.monotonic()
                r = uvloop.run(
                    loadgen.run("127.0.0.1", port, request, duration_s=args.seconds, **load)
                )
                elapsed = time.monotonic() - t0
                m1, o1 = cpu_by_thread(procs[name].pid)
                n = max(r.requests, 1)
                used = m1 - m0 + o1 - o0
                print(
                    f"{workload:<12} {name:<9} {r.rps:7.0f} {r.latency_ms(50):8.1f} "
                    f"{used / elapsed * 100:6.1f} {used / n * 1e6:7.0f} "
                    f"{(m1 - m0) / n * 1e6:8.0f} {(o1 - o0) / n * 1e6:10.0f}"
                    + (f"  errors {r.errors}: {r.first_error}" if r.errors else ""),
                    flush=True,
                )
    finally:
        servers.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
