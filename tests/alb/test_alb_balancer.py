"""Balancer policies and outlier ejection: pure, with an injected clock and seeded RNG."""

from __future__ import annotations

import random
from collections import Counter

from marchproxy_alb.balancer import BackendPool, RetryBudget
from marchproxy_alb.routing import HealthCheckConfig, OutlierConfig, Target

T = [Target("http", "10.0.0.1", 80), Target("http", "10.0.0.2", 80), Target("http", "10.0.0.3", 80)]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_round_robin_is_even() -> None:
    pool = BackendPool(tuple(T))
    got = Counter(pool.pick() for _ in range(300))
    assert set(got.values()) == {100}


def test_weighted_is_proportional_and_smooth() -> None:
    ts = (Target("http", "a", 1, 5), Target("http", "b", 1, 1), Target("http", "c", 1, 1))
    pool = BackendPool(ts, "weighted")
    seq = [pool.pick() for _ in range(7)]
    assert Counter(seq) == {ts[0]: 5, ts[1]: 1, ts[2]: 1}
    assert seq[0] == ts[0] and seq[1] == ts[0] and seq[2] != ts[0]  # nginx SWRR interleaves


def test_least_connections_prefers_idle() -> None:
    pool = BackendPool(tuple(T), "least_connections")
    pool.begin(T[0])
    pool.begin(T[1])
    assert pool.pick() == T[2]
    pool.begin(T[2])
    pool.begin(T[2])
    assert pool.pick() in (T[0], T[1])


def test_p2c_avoids_the_busiest() -> None:
    pool = BackendPool(tuple(T), "random_two_choices", rng=random.Random(1))
    for _ in range(50):
        pool.begin(T[0])
    got = Counter(pool.pick() for _ in range(300))
    assert got[T[0]] == 0


def test_consistent_hash_is_sticky_and_moves_little() -> None:
    pool = BackendPool(tuple(T), "consistent_hash")
    keys = [f"user-{i}".encode() for i in range(300)]
    first = {k: pool.pick(k) for k in keys}
    assert first == {k: pool.pick(k) for k in keys}
    assert len(set(first.values())) == 3
    # eject T[0]: only its keys move
    pool.states[T[0]].healthy = False
    after = {k: pool.pick(k) for k in keys}
    for k in keys:
        if first[k] != T[0]:
            assert after[k] == first[k]
        else:
            assert after[k] != T[0]


def test_outlier_ejection_and_return() -> None:
    clock = Clock()
    pool = BackendPool(
        tuple(T[:2]),
        outlier=OutlierConfig(
            consecutive_failures=3, base_ejection_time=10, max_ejection_percent=50
        ),
        clock=clock,
    )
    assert not pool.record_failure(T[0])
    assert not pool.record_failure(T[0])
    assert pool.record_failure(T[0])
    assert all(pool.pick() == T[1] for _ in range(10))
    # max_ejection_percent=50: the second target may not be ejected too
    for _ in range(5):
        assert not pool.record_failure(T[1])
    clock.t += 11
    assert {pool.pick() for _ in range(4)} == {T[0], T[1]}


def test_active_health_thresholds() -> None:
    pool = BackendPool(
        tuple(T[:1]), health=HealthCheckConfig(healthy_threshold=2, unhealthy_threshold=2)
    )
    assert pool.record_health(T[0], False) is None
    assert pool.record_health(T[0], False) is False
    assert pool.pick() is None
    assert pool.record_health(T[0], True) is None
    assert pool.record_health(T[0], True) is True
    assert pool.pick() == T[0]


def test_retry_budget() -> None:
    b = RetryBudget(ratio=0.5, cap=2, tokens=2)
    assert b.try_spend() and b.try_spend() and not b.try_spend()
    b.deposit()
    b.deposit()
    assert b.try_spend()
