"""Seed 000's usage examples, verbatim, through real HTTP against a fresh Postgres database."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

MODULE = {
    "name": "http-proxy",
    "type": "L7_HTTP",
    "description": "HTTP/HTTPS proxy module",
    "config": {"max_connections": 10000, "timeout": 30},
    "grpc_host": "http-proxy-service",
    "grpc_port": 50051,
    "version": "v1.0.0",
    "image": "marchproxy/http-proxy:v1.0.0",
    "replicas": 3,
    "enabled": True,
}
ROUTE = {
    "name": "api-route",
    "match_rules": {"host": "api.example.com", "path": "/v1/*", "method": ["GET", "POST"]},
    "backend_config": {
        "target": "http://backend:8080",
        "timeout": 30,
        "retries": 3,
        "load_balancing": "round_robin",
    },
    "rate_limit": 1000.0,
    "priority": 100,
    "enabled": True,
}
SCALING = {
    "min_instances": 2,
    "max_instances": 10,
    "scale_up_threshold": 80.0,
    "scale_down_threshold": 20.0,
    "cooldown_seconds": 300,
    "metric": "cpu",
    "enabled": True,
}
DEPLOYMENT = {
    "version": "v2.0.0",
    "image": "marchproxy/http-proxy:v2.0.0",
    "config": {"new_feature": True},
    "environment": {"ENV": "production"},
    "traffic_weight": 0.0,
}


async def test_seed000_usage_examples(api, module_server) -> None:
    status, mod = await api.call("POST", "/api/v1/modules", MODULE)
    assert status == 201, mod
    assert mod["id"] == 1 and mod["name"] == "http-proxy" and mod["status"] == "ENABLED"

    status, route = await api.call("POST", "/api/v1/modules/1/routes", ROUTE)
    assert status == 201, route
    assert route["match_rules"]["method"] == ["GET", "POST"]

    status, pol = await api.call("POST", "/api/v1/modules/1/scaling", SCALING)
    assert status == 201, pol
    assert pol["max_instances"] == 10

    status, dep = await api.call("POST", "/api/v1/modules/1/deployments", DEPLOYMENT)
    assert status == 201, dep
    assert dep["id"] == 2 and dep["status"] == "PENDING" and dep["previous_deployment_id"] == 1

    # the seed's grpc_host does not resolve here: health answers, unhealthy
    status, health = await api.call("GET", "/api/v1/modules/1/deployments/2/health")
    assert status == 200, health
    assert health["healthy"] is False

    fake, port = module_server
    status, _ = await api.call(
        "PATCH", "/api/v1/modules/1", {"grpc_host": "127.0.0.1", "grpc_port": port}
    )
    assert status == 200
    status, health = await api.call("GET", "/api/v1/modules/1/deployments/2/health")
    assert status == 200 and health["healthy"] is True, health
    assert fake.keys_seen[-1] == api.settings.cluster_api_key

    status, dep = await api.call(
        "POST",
        "/api/v1/modules/1/deployments/2/promote",
        {"traffic_weight": 100.0, "incremental": True},
    )
    assert status == 200, dep
    assert dep["status"] == "ACTIVE" and dep["traffic_weight"] == 100.0
    assert [h["weight"] for h in dep["weight_history"]] == [10.0, 25.0, 50.0, 100.0]

    status, dep = await api.call(
        "POST", "/api/v1/modules/1/deployments/2/rollback", {"reason": "High error rate detected"}
    )
    assert status == 200, dep
    assert dep["status"] == "ROLLED_BACK" and dep["traffic_weight"] == 0.0
    assert dep["rollback_reason"] == "High error rate detected"
    status, first = await api.call("GET", "/api/v1/modules/1/deployments/1")
    assert first["status"] == "ACTIVE" and first["traffic_weight"] == 100.0
    status, mod = await api.call("GET", "/api/v1/modules/1")
    assert mod["version"] == "v1.0.0"

    # every write left an audit record
    status, audit = await api.call("GET", "/api/v1/audit?resource_type=deployment")
    actions = [a["action"] for a in audit["items"]]
    assert "rollback" in actions and actions.count("promote") == 4 and "create" in actions
