"""Every endpoint of /openapi.json, fuzzed against a real gateway on 127.0.0.1 (schemathesis).

No input may get a 5xx, and the ledger must still be sound afterwards. Generation is
derandomized (the same cases every run) and bounded per endpoint so the whole test stays
within about a minute on a small machine. Cases are mixed with real model names, account ids
and key ids, or nearly every one would stop at a 404 before the code worth fuzzing.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.conftest import ADMIN_KEY, STORES, Gateway

# Per endpoint and store: positive cases (valid per the document) and negative ones (not).
# 21 endpoints x (14 + 6) cases x 2 stores is ~840 requests, ~25-50 s on 2 busy cores.
POSITIVE_EXAMPLES = 14
NEGATIVE_EXAMPLES = 6
MODELS = ["chat-fast", "chat-a-only", "embed"]
REQUEST_TIMEOUT_S = 30.0


def test_openapi_document_lists_every_api_route(gateway: Gateway) -> None:
    """The document is served without a key, and documents exactly the routes the app has."""
    response = httpx.get(f"{gateway.url}/openapi.json")
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["openapi"].startswith("3.1")
    served = {
        (method.lower(), route.path_format)
        for route in gateway.app.routes
        if route.path_format.startswith(("/v1/", "/admin/v1/"))
        for method in route.methods - {"HEAD"}
    }
    documented = {
        (method, path)
        for path, operations in document["paths"].items()
        for method in operations
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert documented == served


def _substitutions(gateway: Gateway) -> dict[str, list[Any]]:
    """Real ids for the fuzzer to use now and then: an account with credit, a key to revoke."""
    account_id, _ = gateway.funded_key(5_000_000_000, name="fuzz-victim")
    victim = gateway.create_key(name="victim", account=account_id)
    return {"account_id": [str(account_id), "1"], "key_id": [victim["id"]]}


def _fuzz_operation(
    gateway: Gateway,
    session: requests.Session,
    operation: Any,
    headers: dict[str, str],
    mode: GenerationMode,
    examples: int,
    real: dict[str, list[Any]],
) -> list[str]:
    """Run one operation's cases in one mode; return its 5xx answers as curl commands."""
    failures: list[str] = []

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        case=operation.as_strategy(generation_mode=mode),
        use_real=st.booleans(),
        pick=st.integers(min_value=0, max_value=len(MODELS) - 1),
    )
    def run(case: Any, use_real: bool, pick: int) -> None:
        if use_real:
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODELS[pick]
            for name, values in real.items():
                if case.path_parameters and name in case.path_parameters:
                    case.path_parameters[name] = values[pick % len(values)]
        response = case.call(
            base_url=gateway.url, session=session, headers=headers, timeout=REQUEST_TIMEOUT_S
        )
        if response.status_code >= 500:
            failures.append(
                f"{response.status_code} {operation.method.upper()} {operation.path} "
                f"({mode}): {response.text[:300]}\n  {case.as_curl_command(headers)}"
            )

    run()
    return failures


def _fuzz(gateway: Gateway, store: str) -> list[str]:
    """Every operation, positive and negative cases; the 5xx answers as curl commands."""
    _, consumer = gateway.funded_key(50_000_000_000, name=f"fuzz-{store}")
    real = _substitutions(gateway)
    schema = schemathesis.openapi.from_dict(httpx.get(f"{gateway.url}/openapi.json").json())
    session = requests.Session()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        secret = ADMIN_KEY if operation.path.startswith("/admin/") else consumer["key"]
        headers = {"Authorization": f"Bearer {secret}"}
        for mode, examples in (
            (GenerationMode.POSITIVE, POSITIVE_EXAMPLES),
            (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES),
        ):
            failures += _fuzz_operation(gateway, session, operation, headers, mode, examples, real)
    return failures


@pytest.mark.timeout(180)
@pytest.mark.parametrize("database", STORES, indirect=True)
def test_no_input_gets_a_5xx_and_the_ledger_stays_sound(gateway: Gateway, database: str) -> None:
    store = "postgres" if database.startswith("postgresql") else "sqlite"
    started_s = time.monotonic()
    failures = _fuzz(gateway, store)
    elapsed_s = time.monotonic() - started_s
    check = gateway.admin("GET", "/admin/v1/ledger/check")
    assert not failures, f"{len(failures)} 5xx answers ({elapsed_s:.0f} s):\n" + "\n".join(
        failures[:40]
    )
    assert check.status_code == 200, check.text
    assert check.json()["ok"] is True, check.text
    assert check.json()["store_compared"] is True, check.text
