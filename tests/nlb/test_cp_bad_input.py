"""Bad input to a real NLB process over real gRPC: every malformed field is INVALID_ARGUMENT with
a message naming it (never INTERNAL, never stored), and /status stays strict JSON whatever was
sent. Table-driven cases pin the known holes; Hypothesis throws everything else at the server."""

from __future__ import annotations

import json
import math
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marchproxy.v1 import nlb_pb2, nlb_pb2_grpc, types_pb2
from tests.conftest import ServiceProcess, free_port, wait_port

pytestmark = pytest.mark.integration

KEY = "bad-input-key"
META = (("x-cluster-api-key", KEY),)
INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
HEALTH_NAMES = {n.removeprefix("HEALTH_STATUS_").lower() for n, _ in types_pb2.HealthStatus.items()}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Nlb:
    proc: ServiceProcess
    stub: nlb_pb2_grpc.NLBServiceStub
    admin: str

    def call(self, method: str, request: Any) -> tuple[grpc.StatusCode, str, Any]:
        try:
            resp = getattr(self.stub, method)(request, metadata=META, timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", None
        return grpc.StatusCode.OK, "", resp

    def status(self) -> dict[str, Any]:
        """GET /status, parsed strictly: NaN or Infinity in the body fail the test."""
        with urllib.request.urlopen(f"{self.admin}/status", timeout=10) as r:
            text = r.read().decode()

        def refuse(name: str) -> None:
            raise AssertionError(f"/status is not valid JSON: it contains {name}")

        body: dict[str, Any] = json.loads(text, parse_constant=refuse)
        return body

    def register(self, instance_id: str, module_id: str = "alb") -> None:
        code, details, _ = self.call(
            "RegisterModule",
            nlb_pb2.RegisterModuleRequest(
                module_id=module_id,
                instance_id=instance_id,
                module_type=types_pb2.MODULE_TYPE_ALB,
                protocols=[types_pb2.PROTOCOL_HTTP],
                data_address=types_pb2.Address(host="127.0.0.1", port=8080),
            ),
        )
        assert code == grpc.StatusCode.OK, details


@pytest.fixture(scope="module")
def nlb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nlb]:
    grpc_port, admin_port = free_port(), free_port()
    log_dir: Path = tmp_path_factory.mktemp("nlb-bad-input")
    proc = ServiceProcess(
        "nlb",
        [sys.executable, "-m", "marchproxy_nlb"],
        {
            "CLUSTER_API_KEY": KEY,
            "NLB_GRPC_PORT": str(grpc_port),
            "NLB_ADMIN_PORT": str(admin_port),
            "HEARTBEAT_TIMEOUT": "3600",
        },
        log_dir,
    )
    try:
        wait_port(grpc_port)
        wait_port(admin_port)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            yield Nlb(proc, nlb_pb2_grpc.NLBServiceStub(ch), f"http://127.0.0.1:{admin_port}")
        assert proc.proc.poll() is None, proc.output()[-4000:]
    finally:
        proc.stop()


def module_view(nlb: Nlb, instance_id: str) -> dict[str, Any]:
    return next(m for m in nlb.status()["status"]["modules"] if m["instance_id"] == instance_id)


# -- Heartbeat -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"health": 99}, "health"),
        ({"health": -3}, "health"),
        ({"active_connections": -1}, "active_connections"),
        ({"requests_total": -5}, "requests_total"),
        ({"memory_bytes": -1}, "memory_bytes"),
        ({"errors_total": -1}, "errors_total"),
        ({"cpu_percent": math.nan}, "cpu_percent"),
        ({"cpu_percent": math.inf}, "cpu_percent"),
        ({"cpu_percent": -0.5}, "cpu_percent"),
        ({"requests_per_second": math.nan}, "requests_per_second"),
        ({"requests_per_second": -math.inf}, "requests_per_second"),
        ({"applied_config_version": -1}, "applied_config_version"),
        ({"rejected_config_version": -7}, "rejected_config_version"),
        ({"stats": types_pb2.ModuleStats(bytes_in=-1)}, "bytes_in"),
        ({"stats": types_pb2.ModuleStats(bytes_out=-1)}, "bytes_out"),
        ({"rejected_reason": "r" * 5000}, "rejected_reason"),
        ({"instance_id": ""}, "instance_id"),
    ],
)
def test_bad_heartbeat_is_invalid_argument_and_stores_nothing(
    nlb: Nlb, fields: dict[str, Any], needle: str
) -> None:
    nlb.register("hb-table")
    request = nlb_pb2.HeartbeatRequest(module_id="alb", instance_id="hb-table")
    for name, value in fields.items():
        if isinstance(value, types_pb2.ModuleStats):
            request.stats.CopyFrom(value)
        else:
            setattr(request, name, value)
    code, details, _ = nlb.call("Heartbeat", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in details
    view = module_view(nlb, "hb-table")
    assert view["health"] == "healthy"
    assert view["cpu_percent"] == 0 and view["reported_connections"] == 0


def test_good_heartbeat_is_stored(nlb: Nlb) -> None:
    nlb.register("hb-good")
    code, details, resp = nlb.call(
        "Heartbeat",
        nlb_pb2.HeartbeatRequest(
            module_id="alb",
            instance_id="hb-good",
            health=types_pb2.HEALTH_STATUS_DEGRADED,
            active_connections=3,
            cpu_percent=250.5,  # two and a half cores
            requests_per_second=12.25,
        ),
    )
    assert code == grpc.StatusCode.OK, details
    assert resp.success
    view = module_view(nlb, "hb-good")
    assert (view["health"], view["reported_connections"]) == ("degraded", 3)
    assert view["cpu_percent"] == 250.5


@FUZZ
@given(
    health=INT32,
    conns=INT64,
    requests=INT64,
    memory=INT64,
    errors=INT64,
    cpu=st.floats(allow_nan=True, allow_infinity=True),
    rps=st.floats(allow_nan=True, allow_infinity=True),
    bytes_in=INT64,
    applied=INT64,
)
def test_any_heartbeat_is_answered_and_status_stays_json(
    nlb: Nlb,
    health: int,
    conns: int,
    requests: int,
    memory: int,
    errors: int,
    cpu: float,
    rps: float,
    bytes_in: int,
    applied: int,
) -> None:
    nlb.register("hb-fuzz")
    request = nlb_pb2.HeartbeatRequest(
        module_id="alb",
        instance_id="hb-fuzz",
        active_connections=conns,
        requests_total=requests,
        memory_bytes=memory,
        errors_total=errors,
        cpu_percent=cpu,
        requests_per_second=rps,
        applied_config_version=applied,
        stats=types_pb2.ModuleStats(bytes_in=bytes_in),
    )
    request.health = health  # type: ignore[assignment]
    code, details, _ = nlb.call("Heartbeat", request)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, details)
    if code != grpc.StatusCode.OK:
        assert details
    view = module_view(nlb, "hb-fuzz")  # parsed strictly: no NaN, no Infinity
    assert view["health"] in HEALTH_NAMES
    assert view["cpu_percent"] >= 0 and view["reported_connections"] >= 0
    assert view["memory_bytes"] >= 0 and view["requests_total"] >= 0


# -- UpdateNLBConfig -----------------------------------------------------------------------------


def config(nlb: Nlb, text: str) -> nlb_pb2.UpdateNLBConfigResponse:
    code, details, resp = nlb.call(
        "UpdateNLBConfig", nlb_pb2.UpdateNLBConfigRequest(config_json=text)
    )
    assert code == grpc.StatusCode.OK, details
    return resp


def dynamic(nlb: Nlb) -> dict[str, Any]:
    code, details, resp = nlb.call("GetNLBConfig", nlb_pb2.GetNLBConfigRequest())
    assert code == grpc.StatusCode.OK, details
    body: dict[str, Any] = json.loads(resp.config_json)["dynamic"]
    return body


@pytest.mark.parametrize(
    "text",
    [
        '{"heartbeat_timeout": true}',
        '{"heartbeat_timeout": false}',
        '{"heartbeat_timeout": "5"}',
        '{"heartbeat_timeout": null}',
        '{"heartbeat_timeout": [5]}',
        '{"heartbeat_timeout": {"s": 5}}',
        '{"heartbeat_timeout": 0.5}',
        '{"heartbeat_timeout": 0}',
        '{"heartbeat_timeout": -10}',
        '{"heartbeat_timeout": NaN}',
        '{"heartbeat_timeout": Infinity}',
        '{"heartbeat_timeout": 1e400}',
        '{"heartbeat_timeout": 3601}',
    ],
)
def test_bad_heartbeat_timeout_is_rejected_and_nothing_changes(nlb: Nlb, text: str) -> None:
    assert config(nlb, '{"heartbeat_timeout": 3600}').success
    resp = config(nlb, text)
    assert not resp.success
    assert any("heartbeat_timeout" in e for e in resp.validation_errors), resp.validation_errors
    assert dynamic(nlb)["heartbeat_timeout"] == 3600


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('"heartbeat_timeout"', "JSON object"),
        ('{"nlb_grpc_port": 1}', "read-only"),
        ('{"x": "' + "a" * 70_000 + '"}', "larger than"),
    ],
)
def test_malformed_config_is_rejected(nlb: Nlb, text: str, needle: str) -> None:
    resp = config(nlb, text)
    assert not resp.success
    assert any(needle in e for e in resp.validation_errors), resp.validation_errors


def test_heartbeat_timeout_floor_is_one_second(nlb: Nlb) -> None:
    try:
        assert config(nlb, '{"heartbeat_timeout": 1}').success
        assert dynamic(nlb)["heartbeat_timeout"] == 1
        assert config(nlb, '{"heartbeat_timeout": 2.5}').success
    finally:
        assert config(nlb, '{"heartbeat_timeout": 3600}').success


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@FUZZ
@given(value=JSON_VALUES)
def test_any_heartbeat_timeout_value_is_a_number_of_seconds_or_refused(
    nlb: Nlb, value: Any
) -> None:
    try:
        resp = config(nlb, json.dumps({"heartbeat_timeout": value}))
        current = dynamic(nlb)["heartbeat_timeout"]
        assert not isinstance(current, bool) and isinstance(current, int | float)
        assert 1 <= current <= 3600
        if resp.success:
            assert current == value
    finally:
        assert config(nlb, '{"heartbeat_timeout": 3600}').success


# -- UpdateHealth --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_fields", "code", "needle"),
    [
        ({"module_id": "uh-1", "status": 0}, grpc.StatusCode.INVALID_ARGUMENT, "status"),
        ({"module_id": "uh-1", "status": 99}, grpc.StatusCode.INVALID_ARGUMENT, "status"),
        ({"module_id": "uh-1", "status": -1}, grpc.StatusCode.INVALID_ARGUMENT, "status"),
        ({"module_id": "", "status": 1}, grpc.StatusCode.INVALID_ARGUMENT, "module_id"),
        ({"module_id": "a b", "status": 1}, grpc.StatusCode.INVALID_ARGUMENT, "module_id"),
        (
            {"module_id": "uh-1", "status": 3, "reason": "x" * 2000},
            grpc.StatusCode.INVALID_ARGUMENT,
            "reason",
        ),
        ({"module_id": "nobody", "status": 1}, grpc.StatusCode.NOT_FOUND, "nobody"),
    ],
)
def test_bad_update_health(
    nlb: Nlb, request_fields: dict[str, Any], code: grpc.StatusCode, needle: str
) -> None:
    nlb.register("uh-1")
    request = nlb_pb2.HealthUpdateRequest(module_id=request_fields["module_id"])
    request.status = request_fields["status"]
    request.reason = request_fields.get("reason", "")
    got, details, _ = nlb.call("UpdateHealth", request)
    assert got == code
    assert needle in details
    assert module_view(nlb, "uh-1")["health"] == "healthy"


@FUZZ
@given(status=INT32, reason=st.text(max_size=1500), key=st.sampled_from(["uh-2", "alb", "ghost"]))
def test_any_update_health_is_answered(nlb: Nlb, status: int, reason: str, key: str) -> None:
    nlb.register("uh-2")
    request = nlb_pb2.HealthUpdateRequest(module_id=key, reason=reason)
    request.status = status  # type: ignore[assignment]
    code, details, _ = nlb.call("UpdateHealth", request)
    expected = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
    assert code in expected, (code, details)
    assert module_view(nlb, "uh-2")["health"] in HEALTH_NAMES


# -- ListModules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"module_type": 99}, "module_type"),
        ({"protocol": 999}, "protocol"),
        ({"health": 42}, "health"),
        ({"module_id": "bad id"}, "module_id"),
        ({"page_size": 100_000}, "page_size"),
        ({"page_token": "abc"}, "next_page_token"),
        ({"page_token": "-1"}, "next_page_token"),
        ({"page_token": "9" * 40}, "next_page_token"),
    ],
)
def test_bad_list_modules(nlb: Nlb, fields: dict[str, Any], needle: str) -> None:
    request = nlb_pb2.ListModulesRequest()
    for name in ("module_type", "protocol", "health", "module_id"):
        if name in fields:
            setattr(request, name, fields[name])
    request.pagination.page_size = fields.get("page_size", 0)
    request.pagination.next_page_token = fields.get("page_token", "")
    code, details, _ = nlb.call("ListModules", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in details


def test_list_modules_pages_through_everything(nlb: Nlb) -> None:
    for i in range(5):
        nlb.register(f"page-{i}", module_id="paged")
    seen: list[str] = []
    token = ""
    for _ in range(10):
        request = nlb_pb2.ListModulesRequest(module_id="paged")
        request.pagination.page_size = 2
        request.pagination.next_page_token = token
        code, details, resp = nlb.call("ListModules", request)
        assert code == grpc.StatusCode.OK, details
        seen += [i.instance_id for i in resp.instances]
        token = resp.pagination.next_page_token
        if not token:
            break
    assert seen == [f"page-{i}" for i in range(5)]


@FUZZ
@given(
    module_type=INT32,
    protocol=INT32,
    health=INT32,
    page_size=st.integers(0, 2**32 - 1),
    token=st.text(max_size=12),
    include_draining=st.booleans(),
)
def test_any_list_modules_is_answered(
    nlb: Nlb,
    module_type: int,
    protocol: int,
    health: int,
    page_size: int,
    token: str,
    include_draining: bool,
) -> None:
    request = nlb_pb2.ListModulesRequest(include_draining=include_draining)
    request.module_type = module_type  # type: ignore[assignment]
    request.protocol = protocol  # type: ignore[assignment]
    request.health = health  # type: ignore[assignment]
    request.pagination.page_size = page_size
    request.pagination.next_page_token = token
    code, details, resp = nlb.call("ListModules", request)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, details)
    if resp is not None:
        assert len(resp.instances) <= (page_size or 1000)
