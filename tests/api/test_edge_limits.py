"""The HTTP edge: a client's mistakes and abuses are 4xx in the API's shape (or a closed
connection), never a 5xx, a redirect or a held socket; the config refuses non-finite numbers;
`tokenworks serve` on a database it cannot open says so in one line. Real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import ADMIN_KEY, MODELS, Gateway, Sim, both_stores
from tokenworks.api.openai import MAX_JSON_DEPTH, nested_deeper_than
from tokenworks.app import build_app
from tokenworks.config import ConfigError, loads
from tokenworks.server import free_port

CHAT = [{"role": "user", "content": "hi"}]
# Short enough for a test, long enough that a loaded machine's event loop does not trip it
# on a prompt client.
SLOW = "http: {header_timeout_s: 1.0}\n"


def connect(url: str) -> socket.socket:
    where = urlsplit(url)
    return socket.create_connection((where.hostname, where.port), timeout=5)


def read_until_closed(sock: socket.socket, limit_bytes: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    data = b""
    try:
        while len(data) < limit_bytes:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data


def error_of(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


@pytest.fixture
def slow_gateway(make_gateway, sims: tuple[Sim, Sim]) -> Iterator[Gateway]:
    a, b = sims
    with make_gateway({"a": a.url, "b": b.url}, MODELS, SLOW) as gw:
        yield gw


# ---------------------------------------------------------------- request heads


def test_a_huge_header_is_431_in_the_api_shape(gateway: Gateway) -> None:
    sock = connect(gateway.url)
    with sock:
        # The finding: a 1 MB Authorization header was read whole and answered (401).
        sock.sendall(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + b"a" * 20_000
            + b"\r\n\r\n"
        )
        status, error = error_of(read_until_closed(sock))
    assert status == 431 and error["type"] == "invalid_request_error"
    sock = connect(gateway.url)
    with sock:  # with a body behind it in the same packet: no request is started for it
        body = b'{"name": "never made"}'
        sock.sendall(
            b"POST /admin/v1/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + ADMIN_KEY.encode()
            + b"\r\nX-Padding: "
            + b"p" * 20_000
            + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert error_of(read_until_closed(sock))[0] == 431
    assert "never made" not in [
        k["name"] for k in gateway.admin("GET", "/admin/v1/keys").json()["data"]
    ]
    # A megabyte, sent piece by piece: refused as soon as the bound is crossed, long before
    # it has all arrived (the server hangs up while we are still sending).
    sock = connect(gateway.url)
    sent = 0
    refused = b""
    with sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ")
        sock.settimeout(0.05)
        try:
            while sent < 1_000_000:  # bounded: 1,000 pieces at most
                sock.sendall(b"a" * 1000)
                sent += 1000
                try:
                    refused = sock.recv(65536)
                    break
                except TimeoutError:
                    continue
        except OSError:
            pass  # reset while sending: refused, the answer lost with the connection
    assert sent < 1_000_000
    assert refused == b"" or refused.startswith(b"HTTP/1.1 431")


def test_headers_under_the_bound_are_served(gateway: Gateway) -> None:
    r = httpx.get(f"{gateway.url}/healthz", headers={"X-Padding": "p" * 12_000})
    assert r.status_code == 200


def test_a_slow_head_is_cut_off(slow_gateway: Gateway) -> None:
    """Slowloris: a header line every 0.1 s kept the connection (and its memory) for good."""
    sock = connect(slow_gateway.url)
    with sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.1)
        answer = None
        for _ in range(80):  # 8 s at most, 8 times the configured timeout
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                answer = sock.recv(65536)
                break
            except TimeoutError:
                continue
            except OSError:
                answer = b""
                break
    assert answer is not None, "the server kept a slow head open"
    if answer:
        status, error = error_of(answer)
        assert status == 408 and error["code"] == "bad_request_head"


def test_a_kept_alive_connection_gets_the_same_bound_on_its_next_head(
    slow_gateway: Gateway,
) -> None:
    for _ in range(3):  # a new connection the loaded server was too slow to hear is retried
        sock = connect(slow_gateway.url)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        if first:
            break
        sock.close()
    with sock:
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never finishes the head
        sock.settimeout(8)
        answer = read_until_closed(sock)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408")


def test_a_connection_that_never_speaks_is_closed(slow_gateway: Gateway) -> None:
    sock = connect(slow_gateway.url)
    with sock:
        sock.settimeout(8)
        assert read_until_closed(sock) == b""


# ---------------------------------------------------------------- routes and bodies


def test_a_trailing_slash_is_a_404_not_a_redirect(gateway: Gateway) -> None:
    key = gateway.create_key()
    for method, path in (("POST", "/v1/chat/completions/"), ("GET", "/healthz/")):
        r = httpx.request(
            method,
            f"{gateway.url}{path}",
            headers={"Authorization": f"Bearer {key['key']}", "Host": "evil.example"},
            json={"model": "chat-fast", "messages": CHAT},
        )
        assert r.status_code == 404 and "location" not in r.headers
        assert r.json()["error"]["code"] == "unknown_url"


def nested(depth: int) -> dict:
    value: object = "leaf"
    for _ in range(depth):
        value = {"n": value}
    return value  # type: ignore[return-value]


def test_json_nested_too_deep_is_a_400(gateway: Gateway) -> None:
    _, key = gateway.funded_key(10**9)
    headers = {"Authorization": f"Bearer {key['key']}"}
    ok = {"model": "chat-fast", "messages": CHAT, "max_tokens": 3, "x_extra": nested(40)}
    r = httpx.post(f"{gateway.v1}/chat/completions", headers=headers, json=ok, timeout=30)
    assert r.status_code == 200, r.text
    for body in (
        {"model": "chat-fast", "messages": CHAT, "x_extra": nested(MAX_JSON_DEPTH + 1)},
        b'{"model": "chat-fast", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        b'{"model": "chat-fast", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ):
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(f"{gateway.v1}/chat/completions", headers=headers, timeout=30, **kwargs)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_json"
    r = gateway.admin("POST", "/admin/v1/keys", content=b"[" * 1000 + b"]" * 1000)
    assert r.status_code == 400


def test_nesting_depth_counts_levels() -> None:
    assert not nested_deeper_than(nested(MAX_JSON_DEPTH), MAX_JSON_DEPTH)
    assert nested_deeper_than(nested(MAX_JSON_DEPTH + 1), MAX_JSON_DEPTH)
    assert not nested_deeper_than({"a": [1, {"b": []}]}, 4)
    assert nested_deeper_than({"a": [1, {"b": []}]}, 3)


def test_counts_beyond_any_hold_are_a_400_not_a_503(gateway: Gateway) -> None:
    _, key = gateway.funded_key(10**9)
    headers = {"Authorization": f"Bearer {key['key']}"}
    for extra in ({"max_tokens": 10**30}, {"max_completion_tokens": 2**40}, {"n": 10**20}):
        body = {"model": "chat-fast", "messages": CHAT, **extra}
        r = httpx.post(f"{gateway.v1}/chat/completions", headers=headers, json=body, timeout=30)
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == next(iter(extra))


def test_a_non_ascii_bearer_token_is_a_401(gateway: Gateway) -> None:
    token = "Bearer clé-ü".encode()
    r = httpx.get(f"{gateway.url}/admin/v1/keys", headers={"Authorization": token})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"
    r = httpx.get(f"{gateway.v1}/models", headers={"Authorization": token})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@both_stores
def test_usage_times_beyond_the_store_are_a_400(gateway: Gateway) -> None:
    for value in ("99999999999999999999", "9" * 400, "253402300800", "10000-01-01"):
        for name in ("since", "until"):
            r = gateway.admin("GET", "/admin/v1/usage", params={name: value})
            assert r.status_code == 400, (name, value, r.text)
            assert r.json()["error"]["param"] == name
    r = gateway.admin("GET", "/admin/v1/usage", params={"since": "0", "until": "9999-12-31"})
    assert r.status_code == 200


# ---------------------------------------------------------------- /metrics


def test_metrics_can_require_a_bearer_token(make_gateway, sim_a: Sim, monkeypatch) -> None:
    monkeypatch.setenv("TW_TEST_METRICS_TOKEN", "scrape-me")
    extra = "metrics: {bearer_token_env: TW_TEST_METRICS_TOKEN}\n"
    with make_gateway({"a": sim_a.url, "b": sim_a.url}, MODELS, extra) as gw:
        assert httpx.get(f"{gw.url}/metrics").status_code == 401
        for token in ("wrong", ADMIN_KEY, "scrape-mé"):
            auth = f"Bearer {token}".encode()
            r = httpx.get(f"{gw.url}/metrics", headers={"Authorization": auth})
            assert r.status_code == 401
        r = httpx.get(f"{gw.url}/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert r.status_code == 200 and "tokenworks_requests" in r.text
        assert httpx.get(f"{gw.url}/healthz").status_code == 200


def test_metrics_protection_asked_for_but_unset_refuses_to_start(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("TW_TEST_METRICS_UNSET", raising=False)
    config = loads(
        f"database: sqlite:///{tmp_path / 'gw.db'}\n"
        "metrics: {bearer_token_env: TW_TEST_METRICS_UNSET}\n",
        "t.yaml",
    )
    with pytest.raises(ConfigError, match="TW_TEST_METRICS_UNSET"):
        build_app(config)


# ---------------------------------------------------------------- the config


@pytest.mark.parametrize(
    ("setting", "line"),
    [
        ("    timeout_s: .nan", 5),
        ("    connect_timeout_s: .inf", 5),
        ("    timeout_s: -.inf", 5),
        ("    timeout_s: 1e300", 5),
    ],
)
def test_non_finite_or_absurd_config_numbers_name_their_line(setting: str, line: int) -> None:
    text = "database: sqlite:///x.db\nproducers:\n  - name: a\n    base_url: http://x/v1\n"
    with pytest.raises(ConfigError) as caught:
        loads(text + setting + "\n", "t.yaml", check_prices=False)
    field = setting.strip().split(":")[0]
    assert str(caught.value).startswith(f"t.yaml:{line}: producers[0].{field}: ")


@pytest.mark.parametrize(
    "section",
    [
        "keys: {mint_rate_per_s: .nan}",
        "keys: {mint_rate_per_s: 0}",
        "keys: {max_children_per_key: -1}",
        "http: {header_timeout_s: .inf}",
        "http: {max_header_bytes: 10}",
    ],
)
def test_the_new_sections_are_bounded_too(section: str) -> None:
    with pytest.raises(ConfigError, match=r"^t\.yaml:2: (keys|http)\."):
        loads(f"database: sqlite:///x.db\n{section}\n", "t.yaml", check_prices=False)


# ---------------------------------------------------------------- tokenworks serve


def serve_once(tmp_path: Path, database: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "tokenworks.yaml"
    config.write_text(textwrap.dedent(f"database: {database}\nadmin_key: k\n"))
    port = str(free_port())
    return subprocess.run(
        [sys.executable, "-m", "tokenworks", "serve", "--config", str(config), "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_serve_on_a_database_it_cannot_open_says_so_in_one_line(tmp_path: Path, kind: str) -> None:
    if kind == "postgres":  # nothing listens on port 1; the password must not be printed
        database, named = "postgresql://tw:hunter2@127.0.0.1:1/tokenworks", "127.0.0.1:1"
    else:  # a path below a regular file can never be created
        (tmp_path / "a-file").write_text("")
        database = f"sqlite:///{tmp_path / 'a-file' / 'gw.db'}"
        named = str(tmp_path / "a-file")
    done = serve_once(tmp_path, database)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("tokenworks: cannot open the database") and named in lines[0]
    assert "hunter2" not in done.stderr
