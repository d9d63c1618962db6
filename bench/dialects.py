"""Added latency of a translated request over the same request passed through (issue 11).

One sim (chat completions), one gateway with two producers on it: `chat` speaks chat
completions only (so /v1/messages and /v1/responses are translated), `native` speaks all three
formats. Each round sends, at concurrency 1, the same conversation as /v1/chat/completions
(passed through: the baseline) and as /v1/messages and /v1/responses on the chat-only
producer (translated), interleaved so that machine noise falls on all alike. The upstream
does the same work for all three (the sim answers the same chat request), so the p50
difference is the gateway's translation: request, answer, stream events.

    .venv/bin/python bench/dialects.py [--requests 600] [--rounds 6] [--stream]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import loadgen
import run
import uvloop

MAX_REQUESTS = 20_000
CONFIG = """\
database: sqlite:///{db}
producers:
  - {{name: chat, base_url: "http://127.0.0.1:{sim_port}/v1", formats: [chat]}}
models:
  - name: bench
    deployments:
      - {{producer: chat, model: bench, cost: {{input_per_mtok: "0.27", output_per_mtok: "1.10"}}}}
"""
SYSTEM, USER = run.PROMPT[0]["content"], run.PROMPT[1]["content"]


def bodies(stream: bool) -> dict[str, tuple[str, bytes]]:
    """The same request in each dialect: path and body."""
    extra: dict[str, object] = {"stream": True} if stream else {}
    chat = {"model": "bench", "messages": run.PROMPT, "max_tokens": 16, **extra}
    if stream:
        chat["stream_options"] = {"include_usage": True}
    messages = {
        "model": "bench", "system": SYSTEM, "max_tokens": 16,
        "messages": [{"role": "user", "content": USER}], **extra,
    }  # fmt: skip
    responses = {
        "model": "bench", "instructions": SYSTEM, "input": USER, "max_output_tokens": 16, **extra
    }  # fmt: skip
    encode = json.dumps
    return {
        "chat (pass-through)": ("/v1/chat/completions", encode(chat).encode()),
        "messages (translated)": ("/v1/messages", encode(messages).encode()),
        "responses (translated)": ("/v1/responses", encode(responses).encode()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="per route, over all rounds")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    per_round = max(1, min(args.requests, MAX_REQUESTS) // args.rounds)
    work = Path(tempfile.mkdtemp(prefix="tokenworks-dialects-"))
    servers = run.Servers(work)
    try:
        sim_port, port = run.free_port(), run.free_port()
        servers.start(
            "sim",
            run.tokenworks_argv("upstream-sim", "--port", str(sim_port), "--profile", "instant"),
            None,
        )
        config = work / "gateway.yaml"
        config.write_text(CONFIG.format(db=work / "gateway.db", sim_port=sim_port))
        servers.start(
            "gateway",
            run.tokenworks_argv("serve", "--config", str(config), "--port", str(port)),
            None,
            env={"TOKENWORKS_ADMIN_KEY": run.ADMIN_KEY},
        )
        run.wait_http(f"http://127.0.0.1:{sim_port}/sim/stats", servers)
        run.wait_http(f"http://127.0.0.1:{port}/healthz", servers)
        admin = f"http://127.0.0.1:{port}/admin/v1/keys"
        key = str(run.post_json(admin, {"name": "bench"}, run.ADMIN_KEY)["key"])
        routes = {
            name: loadgen.build_request("127.0.0.1", port, path, body, key)
            for name, (path, body) in bodies(args.stream).items()
        }
        samples: dict[str, list[float]] = {name: [] for name in routes}
        load = {"stream": args.stream, "concurrency": 1, "duration_s": 120.0}
        for request in routes.values():  # warm up every path
            uvloop.run(loadgen.run("127.0.0.1", port, request, max_requests=100, **load))
        names = list(routes)
        for rnd in range(args.rounds):
            # Each round starts with another route, so no route always follows the same one.
            for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                request = routes[name]
                result = uvloop.run(
                    loadgen.run("127.0.0.1", port, request, max_requests=per_round, **load)
                )
                if result.errors:
                    raise RuntimeError(f"{name}: {result.errors} errors: {result.first_error}")
                samples[name] += result.latencies_s
        kind = "stream" if args.stream else "plain"
        print(f"{kind}, concurrency 1, {per_round * args.rounds} requests per route: p50 ms")
        base = loadgen.percentile(samples["chat (pass-through)"], 50) * 1000
        for name, values in samples.items():
            p50 = loadgen.percentile(values, 50) * 1000
            print(f"{name:<24}{p50:8.3f}  added {p50 - base:+.3f}")
    finally:
        servers.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
