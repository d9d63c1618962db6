"""A request to a model whose producer has no key names the producer and the variable."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.conftest import ADMIN_KEY, TEST_COST, running_gateway


def test_an_unset_key_variable_is_named_in_the_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TW_TEST_UNSET_KEY", raising=False)
    db = tmp_path / "gw.db"
    text = f"""\
database: sqlite:///{db}
admin_key: {ADMIN_KEY}
producers:
  - {{name: hosted, base_url: "http://127.0.0.1:1/v1", api_key_env: TW_TEST_UNSET_KEY}}
models:
  - name: m
    deployments:
      - {{producer: hosted, model: x, cost: {TEST_COST}}}
"""
    with running_gateway(text, db) as gw:
        key = gw.create_key()
        c = openai.OpenAI(base_url=gw.v1, api_key=key["key"], max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 503
    message = err.value.body["message"]
    assert "producer 'hosted' unreachable" in message, message
    assert "$TW_TEST_UNSET_KEY is unset" in message
