"""Where the ledger's cost goes: the gateway's CPU per request, ledger on and off, by thread,
with Python's cyclic GC on and off.

Starts the sim (CPU 1) and four gateways pinned to CPU 0, as bench/run.py does: ledger off (a
key without an account) and on (a key paying from a funded account), each once as shipped and
once with `gc.disable()` before the server starts (a diagnostic, not a setting to ship). For
each workload at c64 it measures each gateway in turn for a fixed time and reads the
process's CPU time from /proc: total, the event loop's thread, and the other threads (the
ledger's SQLite writer, the usage writer). Bounded: 0.5 s warm-up + `--seconds` per cell.

    .venv/bin/python bench/ledger_cpu.py [--seconds 2.5] [--concurrency 64] [--rounds 3]
        [--pg [URL]] [--no-nogc]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
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


def context_switches(pid: int) -> int:
    """Context switches of all the process's threads so far: on one core, each hand-over of
    the GIL between the event loop and a writer thread is one or two of them."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


def postgres_cpu_s() -> float:
    """CPU seconds used so far by every PostgreSQL process on this machine (server, backends,
    WAL writer): the database's share of the two cores, which the gateway's own figures miss."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                head, _, rest = f.read().rpartition(")")
        except OSError:
            continue
        if head.split("(", 1)[1].startswith("postgres"):
            fields = rest.split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--pg",
        nargs="?",
        const=run.DEFAULT_PG,
        help="add `on-pg`: the ledger on, its database on PostgreSQL (a fresh schema; the "
        "server pinned to the load's CPU for the run)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (medians)")
    parser.add_argument("--no-nogc", action="store_true", help="skip the GC-off gateways")
    args = parser.parse_args()
    gateways = [g for g in GATEWAYS if not (args.no_nogc and g.endswith("nogc"))]
    if args.pg:
        gateways.append("on-pg")
    schema = f"tw_cpu_{uuid.uuid4().hex[:10]}"
    gw_cpus, lg_cpus = run.pick_cpus(None)
    work = Path(tempfile.mkdtemp(prefix="tokenworks-ledger-cpu-"))
    servers = run.Servers(work)
    ports = {n: run.free_port() for n in ("sim", *gateways)}
    cleanup = contextlib.ExitStack()
    cleanup.enter_context(run.postgres_on(lg_cpus if args.pg else None))
    try:
        servers.start(
            "sim",
            run.tokenworks_argv(
                "upstream-sim", "--port", str(ports["sim"]), "--profile", "instant"
            ),
            lg_cpus,
        )
        procs = {}
        for name in gateways:
            config = work / f"{name}.yaml"
            template = run.GATEWAY_CONFIG
            if name == "on-pg":
                assert args.pg is not None
                template = template.replace("sqlite:///{db}", run.pg_database(args.pg, schema))
            config.write_text(template.format(db=work / f"{name}.db", sim_port=ports["sim"]))
            argv = nogc_argv if name.endswith("nogc") else run.tokenworks_argv
            procs[name] = servers.start(
                name,
                argv("serve", "--config", str(config), "--port", str(ports[name])),
                gw_cpus,
                env={"TOKENWORKS_ADMIN_KEY": run.ADMIN_KEY},
            )
        run.wait_http(f"http://127.0.0.1:{ports['sim']}/sim/stats", servers)
        keys = {}
        for name in gateways:
            run.wait_http(f"http://127.0.0.1:{ports[name]}/healthz", servers)
            if name.startswith("on"):
                keys[name] = run.funded_key(ports[name])[0]
            else:
                url = f"http://127.0.0.1:{ports[name]}/admin/v1/keys"
                keys[name] = str(run.post_json(url, {"name": "bench"}, run.ADMIN_KEY)["key"])
        if lg_cpus:
            os.sched_setaffinity(0, lg_cpus)
        print(
            "round workload     gateway     req/s   p50 ms  CPU %  us/req  loop us  others us"
            "  postgres us  switches"
        )
        rps: dict[tuple[str, str], list[float]] = {}
        cpu_us: dict[tuple[str, str], list[float]] = {}
        for round_no in range(args.rounds):
            # Rotate which gateway goes first, so drift in the machine's load spreads evenly.
            order = gateways[round_no % len(gateways) :] + gateways[: round_no % len(gateways)]
            for workload, stream in (("chat", False), ("chat-stream", True)):
                for name in order:
                    port = ports[name]
                    body = run.request_body(stream)
                    request = loadgen.build_request(
                        "127.0.0.1", port, "/v1/chat/completions", body, keys[name]
                    )
                    load = {
                        "stream": stream,
                        "concurrency": args.concurrency,
                        "max_requests": 10**6,
                    }
                    uvloop.run(loadgen.run("127.0.0.1", port, request, duration_s=0.5, **load))
                    m0, o0 = cpu_by_thread(procs[name].pid)
                    cs0 = context_switches(procs[name].pid)
                    pg0 = postgres_cpu_s()
                    t0 = time.monotonic()
                    r = uvloop.run(
                        loadgen.run("127.0.0.1", port, request, duration_s=args.seconds, **load)
                    )
                    elapsed = time.monotonic() - t0
                    m1, o1 = cpu_by_thread(procs[name].pid)
                    switches = (context_switches(procs[name].pid) - cs0) / max(r.requests, 1)
                    pg_us = (postgres_cpu_s() - pg0) / max(r.requests, 1) * 1e6
                    n = max(r.requests, 1)
                    used = m1 - m0 + o1 - o0
                    rps.setdefault((workload, name), []).append(r.rps)
                    cpu_us.setdefault((workload, name), []).append(used / n * 1e6)
                    print(
                        f"{round_no + 1:>5} {workload:<12} {name:<9} {r.rps:7.0f} "
                        f"{r.latency_ms(50):8.1f} {used / elapsed * 100:6.1f} "
                        f"{used / n * 1e6:7.0f} {(m1 - m0) / n * 1e6:8.0f} "
                        f"{(o1 - o0) / n * 1e6:10.0f} {pg_us:12.0f} {switches:9.2f}"
                        + (f"  errors {r.errors}: {r.first_error}" if r.errors else ""),
                        flush=True,
                    )
        print(
            "\nmedians over rounds; on/off: the ledger's throughput ratio and CPU per request,"
            " of the medians and (in brackets) the median of each round's own ratio"
        )
        print("workload     gateway     req/s  us/req    req/s on/off     CPU/req on/off")
        for workload in ("chat", "chat-stream"):
            base_rps, base_us = rps[(workload, "off")], cpu_us[(workload, "off")]
            for name in gateways:
                m_rps, m_us = rps[(workload, name)], cpu_us[(workload, name)]
                rps_ratio = statistics.median(a / b for a, b in zip(m_rps, base_rps, strict=True))
                us_ratio = statistics.median(a / b for a, b in zip(m_us, base_us, strict=True))
                print(
                    f"{workload:<12} {name:<9} {statistics.median(m_rps):7.0f} "
                    f"{statistics.median(m_us):7.0f} "
                    f"{statistics.median(m_rps) / statistics.median(base_rps):7.2f} "
                    f"({rps_ratio:.2f}) "
                    f"{statistics.median(m_us) / statistics.median(base_us):10.2f} ({us_ratio:.2f})"
                )
    finally:
        servers.close()
        cleanup.close()
        if args.pg:
            run.drop_pg_schema(args.pg, schema)
    return 0


if __name__ == "__main__":
    sys.exit(main())
