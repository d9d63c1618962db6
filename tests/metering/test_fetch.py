"""The usage store's reads let the event loop run while they turn rows into Python."""

from __future__ import annotations

import pytest

from tokenworks.metering import store as usage_store


def test_a_summary_is_fetched_in_chunks_that_let_go_of_the_gil(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`fetchall` of 200,000 groups is one C call holding the GIL; the store fetches
    `FETCH_CHUNK_ROWS` at a time and lets go between chunks."""
    rows = [{"n": i} for i in range(1_234)]
    sizes: list[int] = []

    class Cursor:
        def fetchmany(self, n: int) -> list[dict[str, int]]:
            chunk = rows[sum(sizes) : sum(sizes) + n]
            sizes.append(len(chunk))
            return chunk

    yields: list[float] = []
    monkeypatch.setattr(usage_store.time, "sleep", yields.append)
    assert usage_store.fetch_yielding(Cursor()) == rows
    assert sizes == [500, 500, 234, 0] and yields == [0, 0, 0]
