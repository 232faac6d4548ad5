"""Picking an instance (pure): the strategy setting and what ``Balancer.pick`` hands back."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from marchproxy_nlb.config import NlbSettings
from marchproxy_nlb.metrics import NlbMetrics
from marchproxy_nlb.registry.table import InstanceRegistry
from marchproxy_nlb.traffic.balancer import STRATEGIES, Balancer, is_strategy
from marchproxy_nlb.traffic.plane import DataPlane


@dataclass
class Inst:
    instance_id: str
    weight: int = 100
    active_connections: int = 0
    extra: str = "kept"


def test_strategy_names() -> None:
    assert all(is_strategy(name) for name in STRATEGIES)
    assert not is_strategy("random")
    assert not is_strategy("LEAST_CONN")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pick_returns_one_of_the_callers_own_objects(strategy: str) -> None:
    assert is_strategy(strategy)
    balancer = Balancer(strategy)
    candidates = [Inst("a", active_connections=3), Inst("b"), Inst("c", weight=0)]
    for _ in range(5):
        chosen = balancer.pick(candidates, client_ip="192.0.2.7")
        assert chosen is not None
        assert any(chosen is c for c in candidates)
        assert chosen.extra == "kept"
    assert balancer.pick([], client_ip="192.0.2.7") is None


def test_an_unknown_strategy_setting_falls_back_to_least_connections() -> None:
    settings = NlbSettings(nlb_balance="random", redis_url="", nlb_listeners="0=http")
    plane = DataPlane(settings, InstanceRegistry(heartbeat_timeout=30), NlbMetrics())
    assert plane.balancer.strategy == "least_conn"
