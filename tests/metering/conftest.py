"""Fixtures the usage store's tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tokenworks.metering.retention import UsageRetention
from tokenworks.metering.store import UsageStore, open_usage_store


@pytest.fixture
def stores(database: str) -> Iterator[tuple[UsageStore, UsageRetention]]:
    """A usage store and the retention job on the same database."""
    store = open_usage_store(database)
    job = UsageRetention(database)
    try:
        yield store, job
    finally:
        job.close()
        store.close()
