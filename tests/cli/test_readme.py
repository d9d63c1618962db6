"""README.md's "Running it" commands, run as written: a newcomer's first hour must work.

The blocks marked `<!-- readme-test: servers -->` and `<!-- readme-test: commands -->` are
run by bash against a fresh database and an upstream-sim; only the ports (the README's fixed
8000 and 18080 become free ones) and the config's location (a copy in a temp folder, so its
relative database lands there) change.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenworks.cli.main import build_parser
from tokenworks.server import free_port

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 240


def readme_blocks(text: str) -> dict[str, str]:
    """The ```sh blocks that follow a `<!-- readme-test: NAME -->` marker, by name."""
    pattern = r"<!-- readme-test: (\w+) -->\s*```sh\n(.*?)```"
    return {m.group(1): m.group(2) for m in re.finditer(pattern, text, re.S)}


def command_lines(block: str) -> list[str]:
    """The block's commands, continuation lines joined, comments kept (bash ignores them)."""
    return block.replace("\\\n", " ").strip().splitlines()


def wait_healthy(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {START_TIMEOUT_S} s")


@pytest.fixture
def stage(tmp_path: Path) -> Iterator[dict[str, object]]:
    """The README's text with free ports and a private config copy, and its environment."""
    sim_port, gw_port = free_port(), free_port()
    config = tmp_path / "tokenworks.yaml"
    text = (ROOT / "examples" / "tokenworks.yaml").read_text()
    config.write_text(re.sub(r"127\.0\.0\.1:1808[01]", f"127.0.0.1:{sim_port}", text))
    readme = (ROOT / "README.md").read_text()
    readme = readme.replace("--port 18080", f"--port {sim_port}")
    readme = readme.replace("127.0.0.1:8000", f"127.0.0.1:{gw_port}")
    readme = readme.replace("--port 8000", f"--port {gw_port}")
    readme = readme.replace("examples/tokenworks.yaml", str(config))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        TOKENWORKS_URL=f"http://127.0.0.1:{gw_port}",
        COLUMNS="80",
    )
    env.pop("TOKENWORKS_ADMIN_KEY", None)  # the README's own `export` must set it
    procs: list[subprocess.Popen[str]] = []
    yield {
        "blocks": readme_blocks(readme),
        "env": env,
        "procs": procs,
        "config": config,
        "gw": f"http://127.0.0.1:{gw_port}",
        "sim": f"http://127.0.0.1:{sim_port}",
    }
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_the_readme_runs_as_written(stage: dict) -> None:
    blocks, env, procs = stage["blocks"], stage["env"], stage["procs"]
    assert set(blocks) == {"servers", "commands"}, "README lost its test markers"
    # The servers block: exports, one-shot commands, then `&`-backgrounded and blocking ones
    # (a person runs those in a terminal of their own; here each is a process).
    serve_err = None
    for line in command_lines(blocks["servers"]):
        command = line.split("#", 1)[0].strip()
        if command.startswith("export "):
            name, _, value = command.removeprefix("export ").partition("=")
            env[name] = value
            continue
        argv = shlex.split(command.rstrip("&"))
        if argv[1] in ("serve", "upstream-sim"):
            proc = subprocess.Popen(argv, env=env, cwd=ROOT, text=True, stderr=subprocess.PIPE)
            procs.append(proc)
            if argv[1] == "upstream-sim":
                wait_healthy(stage["sim"] + "/v1/models", proc)
            else:
                wait_healthy(stage["gw"] + "/healthz", proc)
                serve_err = proc
            continue
        done = subprocess.run(argv, env=env, cwd=ROOT, text=True, capture_output=True, timeout=60)
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
    assert serve_err is not None

    commands = blocks["commands"]
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", commands],
        env=env,
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    out = done.stdout
    assert re.search(r"account \d+ \(acme\)", out) and "(alice)" in out
    assert '"usage"' in out  # the curl request was served
    assert "revoked key key_" in out and "(alice-agent)" in out
    assert "ledger sound" in out
    assert "providers +30%" in out or "chat-fast" in out
    for line in out.splitlines():
        assert len(line) <= 80 or '"usage"' in line, f"wider than 80 columns: {line!r}\n{out}"

    # The relative sqlite:/// path landed next to the config, not in the working directory.
    assert (stage["config"].parent / "tokenworks.db").exists()
    assert not (ROOT / "tokenworks.db").exists()

    # A second gateway on the same database: one line that says what to do, no traceback.
    second = subprocess.run(
        [str(BIN / "tokenworks"), "serve", "--config", str(stage["config"]), "--port", "1"],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert second.stderr.count("\n") == 1, second.stderr
    assert "in use by another `tokenworks serve`" in second.stderr


def test_serve_says_where_it_listens_and_which_keys_are_missing(stage: dict) -> None:
    env, procs = stage["env"], stage["procs"]
    env["TOKENWORKS_ADMIN_KEY"] = "x"
    port = stage["gw"].rsplit(":", 1)[1]
    proc = subprocess.Popen(
        [str(BIN / "tokenworks"), "serve", "--config", str(stage["config"]), "--port", port],
        env=env,
        text=True,
        stderr=subprocess.PIPE,
    )
    procs.append(proc)
    wait_healthy(stage["gw"] + "/healthz", proc)
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    procs.remove(proc)
    assert f"serving http://127.0.0.1:{port}/v1" in err
    assert f"database:  sqlite:///{stage['config'].parent / 'tokenworks.db'}" in err
    assert "producer:  openai https://api.openai.com/v1 ($OPENAI_API_KEY UNSET)" in err
    assert "warning: $DEEPSEEK_API_KEY is unset" in err
    assert "model:     chat-fast -> local/canned-1, backup/canned-1" in err
    assert "Traceback" not in err


def test_serve_access_log_logs_each_request(stage: dict) -> None:
    env, procs = stage["env"], stage["procs"]
    env["TOKENWORKS_ADMIN_KEY"] = "x"
    port = stage["gw"].rsplit(":", 1)[1]
    argv = [str(BIN / "tokenworks"), "serve", "--config", str(stage["config"]), "--port", port]
    proc = subprocess.Popen(
        [*argv, "--access-log"], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    procs.append(proc)
    wait_healthy(stage["gw"] + "/healthz", proc)
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    procs.remove(proc)
    assert '"GET /healthz HTTP/1.1" 200' in out, out


def test_every_command_in_the_docs_exists() -> None:
    """Each `tokenworks ...` line in README.md and docs/*.md names a command that exists
    (its words up to the first argument or option answer `--help`)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    seen: set[tuple[str, ...]] = set()
    for page in pages:
        in_code = False
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
                continue
            if in_code:
                words = line.split("#", 1)[0].split()
                if words[:1] == ["tokenworks"]:
                    path = tuple(w for w in words[1:3] if re.fullmatch(r"[a-z][a-z-]*", w))
                    seen.add(path[:1] if path and path[0] not in _GROUPS else path)
    assert ("keys", "create") in seen and ("statement",) in seen
    # The parser `tokenworks` runs, in this process: a process a command cost 1.4 s each
    # (the README command tests start the real executable).
    parser = build_parser()
    for path in sorted(seen):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            parser.parse_args([*path, "--help"])
        assert exited.value.code == 0, f"tokenworks {' '.join(path)}: {exited.value}"
        assert "usage: tokenworks" in out.getvalue(), path


_GROUPS = {"keys", "accounts", "grants", "budgets", "ledger", "config"}
