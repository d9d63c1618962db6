"""`tokenworks serve` takes the ledger's loaded state out of the cyclic collector's sight."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from tests.conftest import gateway_config
from tokenworks.app import Gateway
from tokenworks.config import loads


def test_the_loaded_ledger_is_frozen_when_serving(tmp_path: Path) -> None:
    config = loads(
        gateway_config(
            tmp_path / "gw.db",
            {"a": "http://127.0.0.1:9"},
            "models:\n  - name: m\n    deployments: [{producer: a, model: m}]\n",
        ),
        "test.yaml",
    )
    gateway = Gateway(config)
    gateway.freeze_gc_after_start = True

    async def run() -> int:
        await gateway.start()
        try:
            assert gateway.ledger is not None
            return gc.get_freeze_count()
        finally:
            await gateway.close()

    gc.unfreeze()
    try:
        assert asyncio.run(run()) > 0
    finally:
        gc.unfreeze()
