"""InstanceRegistry rules, with an injected clock and no event loop."""

from __future__ import annotations

import pytest

from marchproxy.v1 import types_pb2
from marchproxy_nlb.registry.table import InstanceRegistry, RegistryFull

HTTP = types_pb2.PROTOCOL_HTTP
PG = types_pb2.PROTOCOL_POSTGRESQL


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **kw: object) -> InstanceRegistry:
    return InstanceRegistry(heartbeat_timeout=10.0, clock=clock, **kw)  # type: ignore[arg-type]


def reg(r: InstanceRegistry, iid: str, protocols: tuple[int, ...] = (HTTP,), module: str = "alb"):  # type: ignore[no-untyped-def]
    return r.register(
        module_id=module,
        module_type=types_pb2.MODULE_TYPE_ALB,
        protocols=protocols,
        data_host="127.0.0.1",
        data_port=9000,
        instance_id=iid,
    )


def test_register_then_candidates_by_protocol() -> None:
    r = make(Clock())
    reg(r, "a")
    reg(r, "b", (PG,), module="dblb")
    assert [i.instance_id for i in r.candidates(HTTP)] == ["a"]
    assert [i.instance_id for i in r.candidates(PG)] == ["b"]


def test_reregistering_refreshes_in_place_and_clears_draining() -> None:
    clock = Clock()
    r = make(clock)
    inst, created = reg(r, "a")
    inst.routed_total = 7
    r.unregister("a", graceful=True)
    assert not r.candidates(HTTP)
    same, created_again = reg(r, "a")
    assert created and not created_again
    assert same is inst and same.routed_total == 7 and same.routable


def test_missing_heartbeats_expire_and_heartbeats_keep() -> None:
    clock = Clock()
    r = make(clock)
    reg(r, "a")
    reg(r, "b")
    clock.now += 6
    assert r.heartbeat("a", reported_connections=3) is not None
    clock.now += 6  # b is 12 s silent, a only 6
    assert [i.instance_id for i in r.expire()] == ["b"]
    assert r.get("a") is not None and r.get("a").reported_connections == 3  # type: ignore[union-attr]
    assert r.heartbeat("b") is None  # unknown: must re-register


def test_graceful_unregister_drains_until_deadline() -> None:
    clock = Clock()
    r = make(clock)
    reg(r, "a")
    r.unregister("a", graceful=True, drain_timeout=5)
    inst = r.get("a")
    assert inst is not None and inst.draining and inst.health == types_pb2.HEALTH_STATUS_DRAINING
    assert not r.candidates(HTTP)
    clock.now += 4
    r.heartbeat("a", health=types_pb2.HEALTH_STATUS_HEALTHY)
    assert r.expire() == [] and r.get("a").draining  # type: ignore[union-attr]
    clock.now += 2
    assert [i.instance_id for i in r.expire()] == ["a"]


def test_hard_unregister_removes_and_notifies() -> None:
    r = make(Clock())
    events: list[tuple[str, str]] = []
    r.subscribe(lambda ev, inst: events.append((ev, inst.instance_id)))
    reg(r, "a")
    r.unregister("a", graceful=False)
    assert r.get("a") is None
    assert events == [("registered", "a"), ("unregistered", "a")]


def test_set_health_by_module_id_and_unhealthy_not_routable() -> None:
    r = make(Clock())
    reg(r, "a")
    reg(r, "b")
    changed = r.set_health("alb", types_pb2.HEALTH_STATUS_UNHEALTHY, "operator")
    assert {i.instance_id for i in changed} == {"a", "b"}
    assert not r.candidates(HTTP)
    r.set_health("a", types_pb2.HEALTH_STATUS_DEGRADED)
    assert [i.instance_id for i in r.candidates(HTTP)] == ["a"]


def test_capacity_of_the_registry_is_bounded() -> None:
    r = make(Clock(), max_instances=2)
    reg(r, "a")
    reg(r, "b")
    reg(r, "a")  # refresh is always allowed
    with pytest.raises(RegistryFull):
        reg(r, "c")
