"""The snapshot compiler (pure): cached route JSON gives the same bytes as compiling afresh,
stamping and un-stamping are inverse, and content_of reads any stored document."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from marchproxy_api.snapshots import TYPE_COMPONENT, SnapshotCompiler, content_of, stamp_text

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Mod:
    id: int
    name: str
    type: str
    enabled: bool = True
    version: str = "1"
    config: Any = None
    replicas: int = 1
    grpc_host: str = ""
    grpc_port: int = 0


@dataclass(frozen=True)
class Route:
    id: int
    module_id: int
    name: str
    priority: int
    updated_at: datetime
    enabled: bool = True
    match_rules: Any = None
    backend_config: Any = None
    rate_limit: float | None = None
    rate_limit_burst: int | None = None


@dataclass(frozen=True)
class Dep:
    id: int
    module_id: int
    status: str
    traffic_weight: float
    version: str = "v"
    image: str = ""
    config: Any = None


def _src(mods, routes, deps) -> dict[str, list[Any]]:
    return {
        "modules": mods,
        "routes": routes,
        "deployments": deps,
        "policies": [],
        "listeners": [],
        "rate_limits": [],
        "services": [],
    }


@st.composite
def sources(draw: st.DrawFn) -> dict[str, list[Any]]:
    types = draw(st.lists(st.sampled_from(sorted(TYPE_COMPONENT)), min_size=1, max_size=5))
    mods = [Mod(i + 1, f"m{i + 1}", t, config={"k": i}) for i, t in enumerate(types)]
    n = draw(st.integers(0, 30))
    routes = [
        Route(
            id=i + 1,
            module_id=draw(st.integers(1, len(mods) + 1)),  # len+1: a route of no module
            name=f"r{i}",
            priority=draw(st.integers(0, 5)),
            updated_at=T0 + timedelta(microseconds=draw(st.integers(0, 10**6))),
            match_rules={"host": draw(st.sampled_from(["a.example", None, "ü.example"]))},
            backend_config={"target": "http://10.0.0.1"},
            rate_limit=draw(st.none() | st.floats(0, 1e6)),
        )
        for i in range(n)
    ]
    statuses = st.sampled_from(["ACTIVE", "ROLLING_OUT", "INACTIVE", "PENDING"])
    deps = [
        Dep(i + 1, draw(st.integers(1, len(mods))), draw(statuses), 50.0)
        for i in range(draw(st.integers(0, 6)))
    ]
    return _src(mods, routes, deps)


@given(sources(), st.data())
def test_cached_compile_equals_a_fresh_one(src, data) -> None:
    warm = SnapshotCompiler()
    first = warm.compile(src)
    assert set(first) == {"nlb", "alb", "dblb", "ailb", "rtmp"}
    for comp, text in first.items():
        doc = json.loads(text)
        assert list(doc)[:4] == ["component", "modules", "routes", "deployments"]
        assert doc["component"] == comp
        assert text == json.dumps(doc, separators=(",", ":"))
    nlb = json.loads(first["nlb"])
    assert [r["id"] for r in nlb["routes"]] == [
        r.id for r in src["routes"] if r.module_id <= len(src["modules"])
    ]
    # change some routes (new updated_at), rename a module, delete a route
    routes = list(src["routes"])
    for i in data.draw(st.sets(st.integers(0, max(0, len(routes) - 1)))) if routes else ():
        routes[i] = replace(routes[i], priority=99, updated_at=routes[i].updated_at + timedelta(1))
    if routes and data.draw(st.booleans()):
        routes.pop(data.draw(st.integers(0, len(routes) - 1)))
    mods = list(src["modules"])
    mods[0] = replace(mods[0], name="renamed")
    changed = _src(mods, routes, src["deployments"])
    assert warm.compile(changed) == SnapshotCompiler().compile(changed)


@given(sources(), st.integers(0, 2**62))
def test_stamp_and_content_of_are_inverse(src, version) -> None:
    for text in SnapshotCompiler().compile(src).values():
        stamped = stamp_text(text, version, T0)
        doc = json.loads(stamped)
        assert list(doc)[:3] == ["component", "version", "generated_at"]
        assert doc["version"] == version and doc["generated_at"] == "2026-01-01T00:00:00.000000Z"
        assert {k: v for k, v in doc.items() if k not in ("version", "generated_at")} == (
            json.loads(text)
        )
        assert content_of(stamped) == text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=12), json_values, max_size=6))
def test_content_of_any_stored_document(doc) -> None:
    stored = json.dumps(doc, separators=(",", ":"))
    out = json.loads(content_of(stored))
    assert out == {k: v for k, v in doc.items() if k not in ("version", "generated_at")}
