"""The demo's peak-hour figures: fair shares over pools, sheds, queue wait and price by tier."""

from __future__ import annotations

from types import SimpleNamespace

from tokenworks.cli.peak import by_tier, cheap_at_peak, fair_shares, sheds

STATE = {
    "pools": {
        "cheap": {
            "tiers": {"standard": {"sheds": {"deadline": 2}}, "flex": {"sheds": {"expired": 1}}},
            "served_weighted_tokens": {"1": 300.0, "2": 100.0},
        },
        "premium": {
            "tiers": {"standard": {"sheds": {"deadline": 1}}},
            "served_weighted_tokens": {"1": 100.0, "3": 500.0},
        },
    }
}


def test_fair_shares_add_up_each_tenant_over_every_pool_by_name() -> None:
    shares = fair_shares(STATE, {"1": "swarm", "3": "vip"})
    assert shares == [("vip", 500.0), ("swarm", 400.0), ("2", 100.0)]
    assert sheds(STATE) == {"deadline": 3, "expired": 1}


def record(tier: str | None, queue_ms: float | None, price_nano: int, status: int = 200) -> object:
    usage = SimpleNamespace(input_tokens=4, output_tokens=6)
    return SimpleNamespace(
        service_tier=tier, queue_ms=queue_ms, price_nano=price_nano, status=status, usage=usage
    )


def test_by_tier_counts_served_requests_only_and_reads_no_tier_as_standard() -> None:
    rows = [
        record("priority", 1.0, 40),
        record("priority", 3.0, 60),
        record(None, None, 10),  # a row from before queue_ms existed: no wait
        record("standard", 500.0, 30),
        record("flex", 9000.0, 5),
        record("flex", 0.0, 0, status=429),  # shed: neither waited nor paid as served
    ]
    tiers = {t["tier"]: t for t in by_tier(rows)}
    assert tiers["priority"]["served"] == 2 and tiers["priority"]["paid_nano"] == 100
    assert (
        tiers["priority"]["tokens"] == 20 and tiers["priority"]["paid_per_mtok_nano"] == 5 * 10**6
    )
    assert tiers["priority"]["wait_ms_max"] == 3.0
    assert tiers["standard"]["served"] == 2 and tiers["standard"]["wait_ms_max"] == 500.0
    assert tiers["standard"]["wait_ms_p50"] == 500.0
    assert tiers["flex"]["served"] == 1 and tiers["flex"]["paid_nano"] == 5


def test_the_cheap_producer_at_its_peak_refuses_beyond_its_slots() -> None:
    profile = cheap_at_peak()
    assert profile.slots == 8 and profile.queue_max == 0 and profile.full_status == 429
    assert profile.retry_after_s == 2
