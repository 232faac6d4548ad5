"""Auth: login/refresh/rate limit, users CRUD, and the authorization matrix over every
endpoint x {admin, operator, viewer, no token, expired token, token signed with another key}.

The role each endpoint needs is pinned below from the issue and the seeds, independently of the
endpoint table under test: admin for writes, operator for enable/disable, promote, rollback,
scaling and reload, viewer for reads; users and the audit log are admin-only; data-plane state
endpoints take the cluster key (or an admin token). A role that is allowed must get the
operation's success status with a proper request, not merely "not 401/403".
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import pytest

from marchproxy_api.app import all_endpoints
from marchproxy_api.security import issue_token

pytestmark = pytest.mark.integration
SECRET = "test-secret-key-0123456789abcdef0123"
CLUSTER_KEY = "test-cluster-key"


async def _user_token(api, username: str, role: str) -> str:
    status, body = await api.call(
        "POST", "/api/v1/users", {"username": username, "password": "password-123", "role": role}
    )
    assert status in (201, 409), body
    return (await api.login(username, "password-123"))["access_token"]


async def test_login_refresh_and_rate_limit(api) -> None:
    tokens = await api.login("admin", "admin-password-for-tests")
    assert tokens["role"] == "admin" and tokens["token_type"] == "bearer"
    status, body = await api.call(
        "POST", "/api/v1/auth/refresh", {"refresh_token": tokens["refresh_token"]}, token=""
    )
    assert status == 200 and body["access_token"]
    # an access token is not a refresh token
    status, body = await api.call(
        "POST", "/api/v1/auth/refresh", {"refresh_token": tokens["access_token"]}, token=""
    )
    assert status == 401 and body["error"] == "unauthorized"
    # a refresh token is not an access token
    status, _ = await api.call("GET", "/api/v1/modules", token=tokens["refresh_token"])
    assert status == 401
    codes = []
    for _ in range(api.settings.login_max_failures + 1):
        status, body = await api.call(
            "POST", "/api/v1/auth/login", {"username": "admin", "password": "wrong"}, token=""
        )
        codes.append(status)
    assert codes[:-1] == [401] * api.settings.login_max_failures
    assert codes[-1] == 429 and body["error"] == "rate_limited"


async def test_users_crud(api) -> None:
    status, user = await api.call(
        "POST",
        "/api/v1/users",
        {"username": "ops1", "password": "password-123", "role": "operator"},
    )
    assert status == 201 and "password" not in user and "password_hash" not in user
    status, _ = await api.call(
        "POST", "/api/v1/users", {"username": "ops1", "password": "password-123"}
    )
    assert status == 409
    status, body = await api.call("POST", "/api/v1/users", {"username": "x", "password": "short"})
    assert status == 422 and body["details"]["fields"][0]["loc"] == ["body", "password"]
    status, user = await api.call("PATCH", f"/api/v1/users/{user['id']}", {"role": "viewer"})
    assert status == 200 and user["role"] == "viewer"
    status, page = await api.call("GET", "/api/v1/users?limit=1")
    assert status == 200 and len(page["items"]) == 1 and page["total"] >= 2
    status, _ = await api.call("DELETE", f"/api/v1/users/{user['id']}")
    assert status == 204
    status, _ = await api.call("GET", f"/api/v1/users/{user['id']}")
    assert status == 404


M = "/api/v1/modules/{module_id}"
PUBLIC = {
    ("GET", "/"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/system/health"),
    ("GET", "/api/openapi.json"),
    ("GET", "/api/docs"),
    ("POST", "/api/v1/auth/login"),
    ("POST", "/api/v1/auth/refresh"),
}
EXPECTED_ROLE = {
    # user management and the audit log: admins only (issue 5, "user management for admins")
    ("GET", "/api/v1/users"): "admin",
    ("POST", "/api/v1/users"): "admin",
    ("GET", "/api/v1/users/{user_id}"): "admin",
    ("PATCH", "/api/v1/users/{user_id}"): "admin",
    ("DELETE", "/api/v1/users/{user_id}"): "admin",
    ("GET", "/api/v1/audit"): "admin",
    # seed 000 modules; seed 004 history and metrics
    ("GET", "/api/v1/modules/registration-history"): "viewer",
    ("GET", "/api/v1/modules/metrics"): "viewer",
    ("GET", "/api/v1/modules"): "viewer",
    ("POST", "/api/v1/modules"): "admin",
    ("GET", M): "viewer",
    ("PATCH", M): "admin",
    ("DELETE", M): "admin",
    ("POST", M + "/health"): "viewer",  # seed 000: users "check health"
    ("POST", M + "/enable"): "operator",
    ("POST", M + "/disable"): "operator",
    # routes
    ("GET", M + "/routes"): "viewer",
    ("POST", M + "/routes"): "admin",
    ("GET", M + "/routes/{route_id}"): "viewer",
    ("PATCH", M + "/routes/{route_id}"): "admin",
    ("DELETE", M + "/routes/{route_id}"): "admin",
    ("POST", M + "/routes/{route_id}/enable"): "operator",
    ("POST", M + "/routes/{route_id}/disable"): "operator",
    ("GET", "/api/v1/routing/conflicts"): "viewer",
    # scaling: issue 5 gives "scale" to operators
    ("GET", M + "/scaling"): "viewer",
    ("POST", M + "/scaling"): "operator",
    ("PUT", M + "/scaling"): "operator",
    ("DELETE", M + "/scaling"): "operator",
    ("POST", M + "/scaling/enable"): "operator",
    ("POST", M + "/scaling/disable"): "operator",
    # deployments
    ("GET", M + "/deployments"): "viewer",
    ("POST", M + "/deployments"): "admin",
    ("GET", M + "/deployments/{deployment_id}"): "viewer",
    ("PATCH", M + "/deployments/{deployment_id}"): "admin",
    ("POST", M + "/deployments/{deployment_id}/promote"): "operator",
    ("POST", M + "/deployments/{deployment_id}/rollback"): "operator",
    ("GET", M + "/deployments/{deployment_id}/health"): "viewer",
    # seed 003 services; reload is an operator action
    ("GET", "/api/v1/services"): "viewer",
    ("POST", "/api/v1/services"): "admin",
    ("GET", "/api/v1/services/{service_id}"): "viewer",
    ("PUT", "/api/v1/services/{service_id}"): "admin",
    ("DELETE", "/api/v1/services/{service_id}"): "admin",
    ("POST", "/api/v1/services/{service_id}/reload"): "operator",
    ("POST", "/api/v1/services/{service_id}/reload-xds"): "operator",
    # NLB listeners and rate limits, feature flags
    ("GET", "/api/v1/nlb/listeners"): "viewer",
    ("POST", "/api/v1/nlb/listeners"): "admin",
    ("GET", "/api/v1/nlb/listeners/{listener_id}"): "viewer",
    ("PUT", "/api/v1/nlb/listeners/{listener_id}"): "admin",
    ("DELETE", "/api/v1/nlb/listeners/{listener_id}"): "admin",
    ("GET", "/api/v1/nlb/rate-limits"): "viewer",
    ("POST", "/api/v1/nlb/rate-limits"): "admin",
    ("GET", "/api/v1/nlb/rate-limits/{rate_limit_id}"): "viewer",
    ("PUT", "/api/v1/nlb/rate-limits/{rate_limit_id}"): "admin",
    ("DELETE", "/api/v1/nlb/rate-limits/{rate_limit_id}"): "admin",
    ("GET", "/api/v1/feature-flags"): "viewer",
    ("POST", "/api/v1/feature-flags"): "admin",
    ("GET", "/api/v1/feature-flags/{flag_id}"): "viewer",
    ("PUT", "/api/v1/feature-flags/{flag_id}"): "admin",
    ("DELETE", "/api/v1/feature-flags/{flag_id}"): "admin",
    # desired state: operators read the status; data planes use the cluster key
    ("GET", "/api/v1/state/status"): "viewer",
    ("POST", "/api/v1/state/metrics"): "cluster",
    ("GET", "/api/v1/state/{component}"): "cluster",
    ("POST", "/api/v1/state/{component}/ack"): "cluster",
}
RANK = {"viewer": 1, "operator": 2, "admin": 3}

Case = tuple[str, Any, int]  # concrete path, JSON body, expected success status


class Cases:
    """A fresh, valid request per (endpoint, caller): resources are created as admin first."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.n = itertools.count(1)

    async def made(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, out = await self.api.call("POST", path, body)
        assert status == 201, (path, body, out)
        return out

    async def module(self) -> dict[str, Any]:
        n = next(self.n)
        return await self.made("/api/v1/modules", {"name": f"mx-mod-{n}", "type": "ALB"})

    async def route(self) -> tuple[int, int]:
        mod = await self.module()
        route = await self.made(f"/api/v1/modules/{mod['id']}/routes", self.route_body())
        return mod["id"], route["id"]

    def route_body(self) -> dict[str, Any]:
        n = next(self.n)
        return {"name": f"r{n}", "match_rules": {"host": f"mx{n}.example.com", "path": "/"}}

    async def policy(self) -> int:
        mod = await self.module()
        await self.made(f"/api/v1/modules/{mod['id']}/scaling", SCALING)
        return int(mod["id"])

    async def deployment(self) -> tuple[int, int]:
        mod = await self.module()
        dep = await self.made(f"/api/v1/modules/{mod['id']}/deployments", {"version": "v2"})
        return mod["id"], dep["id"]

    def service_body(self) -> dict[str, Any]:
        return {"name": f"svc-{next(self.n)}", "host": "10.0.0.1", "port": 8080}

    def listener_body(self) -> dict[str, Any]:
        n = next(self.n)
        return {"name": f"lst-{n}", "port": 20000 + n, "protocols": ["http"]}

    def rate_limit_body(self) -> dict[str, Any]:
        return {"target": f"listener:{next(self.n)}", "requests_per_second": 10, "burst": 20}

    def flag_body(self) -> dict[str, Any]:
        return {"name": f"flag-{next(self.n)}", "enabled": True}

    async def item(self, base: str, body: dict[str, Any]) -> str:
        return f"{base}/{(await self.made(base, body))['id']}"

    async def build(self, method: str, path: str) -> Case:
        builder = BUILDERS[(method, path)]
        return await builder(self)


SCALING = {"min_instances": 1, "max_instances": 3, "scale_up_threshold": 80.0}


def _route_path(m: int, r: int, tail: str = "") -> str:
    return f"/api/v1/modules/{m}/routes/{r}{tail}"


def _dep_path(m: int, d: int, tail: str = "") -> str:
    return f"/api/v1/modules/{m}/deployments/{d}{tail}"


async def _user(c: Cases) -> str:
    body = {"username": f"mx-user-{next(c.n)}", "password": "password-123"}
    return f"/api/v1/users/{(await c.made('/api/v1/users', body))['id']}"


async def _mod_path(c: Cases, tail: str = "") -> str:
    return f"/api/v1/modules/{(await c.module())['id']}{tail}"


def _const(path: str, body: Any, status: int) -> Callable[[Cases], Awaitable[Case]]:
    async def build(c: Cases) -> Case:
        return path, body, status

    return build


def _crud(
    base: str, param: str, body: Callable[[Cases], dict[str, Any]]
) -> dict[tuple[str, str], Callable[[Cases], Awaitable[Case]]]:
    item = f"{base}/{{{param}}}"

    async def create(c: Cases) -> Case:
        return base, body(c), 201

    async def get(c: Cases) -> Case:
        return await c.item(base, body(c)), None, 200

    async def put(c: Cases) -> Case:
        return await c.item(base, body(c)), body(c), 200

    async def delete(c: Cases) -> Case:
        return await c.item(base, body(c)), None, 204

    return {
        ("GET", base): _const(base, None, 200),
        ("POST", base): create,
        ("GET", item): get,
        ("PUT", item): put,
        ("DELETE", item): delete,
    }


async def _b_user_create(c: Cases) -> Case:
    return "/api/v1/users", {"username": f"mx-new-{next(c.n)}", "password": "password-123"}, 201


async def _b_user_get(c: Cases) -> Case:
    return await _user(c), None, 200


async def _b_user_patch(c: Cases) -> Case:
    return await _user(c), {"role": "operator"}, 200


async def _b_user_delete(c: Cases) -> Case:
    return await _user(c), None, 204


async def _b_module_create(c: Cases) -> Case:
    return "/api/v1/modules", {"name": f"mx-new-{next(c.n)}", "type": "DBLB"}, 201


async def _b_module_get(c: Cases) -> Case:
    return await _mod_path(c), None, 200


async def _b_module_patch(c: Cases) -> Case:
    return await _mod_path(c), {"description": "changed"}, 200


async def _b_module_delete(c: Cases) -> Case:
    return await _mod_path(c), None, 204


async def _b_module_health(c: Cases) -> Case:
    return await _mod_path(c, "/health"), None, 200


async def _b_module_enable(c: Cases) -> Case:
    return await _mod_path(c, "/enable"), None, 200


async def _b_module_disable(c: Cases) -> Case:
    return await _mod_path(c, "/disable"), None, 200


async def _b_routes_list(c: Cases) -> Case:
    return await _mod_path(c, "/routes"), None, 200


async def _b_route_create(c: Cases) -> Case:
    return await _mod_path(c, "/routes"), c.route_body(), 201


async def _b_route_get(c: Cases) -> Case:
    return _route_path(*await c.route()), None, 200


async def _b_route_patch(c: Cases) -> Case:
    return _route_path(*await c.route()), {"priority": 7}, 200


async def _b_route_delete(c: Cases) -> Case:
    return _route_path(*await c.route()), None, 204


async def _b_route_enable(c: Cases) -> Case:
    return _route_path(*await c.route(), "/enable"), None, 200


async def _b_route_disable(c: Cases) -> Case:
    return _route_path(*await c.route(), "/disable"), None, 200


async def _b_scaling_get(c: Cases) -> Case:
    return f"/api/v1/modules/{await c.policy()}/scaling", None, 200


async def _b_scaling_create(c: Cases) -> Case:
    return await _mod_path(c, "/scaling"), SCALING, 201


async def _b_scaling_put(c: Cases) -> Case:
    return f"/api/v1/modules/{await c.policy()}/scaling", {**SCALING, "max_instances": 5}, 200


async def _b_scaling_delete(c: Cases) -> Case:
    return f"/api/v1/modules/{await c.policy()}/scaling", None, 204


async def _b_scaling_enable(c: Cases) -> Case:
    return f"/api/v1/modules/{await c.policy()}/scaling/enable", None, 200


async def _b_scaling_disable(c: Cases) -> Case:
    return f"/api/v1/modules/{await c.policy()}/scaling/disable", None, 200


async def _b_deps_list(c: Cases) -> Case:
    return await _mod_path(c, "/deployments"), None, 200


async def _b_dep_create(c: Cases) -> Case:
    return await _mod_path(c, "/deployments"), {"version": "v9"}, 201


async def _b_dep_get(c: Cases) -> Case:
    return _dep_path(*await c.deployment()), None, 200


async def _b_dep_patch(c: Cases) -> Case:
    return _dep_path(*await c.deployment()), {"image": "img:2"}, 200


async def _b_dep_promote(c: Cases) -> Case:
    return _dep_path(*await c.deployment(), "/promote"), {"traffic_weight": 100}, 200


async def _b_dep_rollback(c: Cases) -> Case:
    return _dep_path(*await c.deployment(), "/rollback"), {"reason": "matrix"}, 200


async def _b_dep_health(c: Cases) -> Case:
    return _dep_path(*await c.deployment(), "/health"), None, 200


async def _b_reload(c: Cases) -> Case:
    return await c.item("/api/v1/services", c.service_body()) + "/reload", None, 200


async def _b_reload_xds(c: Cases) -> Case:
    return await c.item("/api/v1/services", c.service_body()) + "/reload-xds", None, 200


BUILDERS: dict[tuple[str, str], Callable[[Cases], Awaitable[Case]]] = {
    ("GET", "/api/v1/users"): _const("/api/v1/users", None, 200),
    ("POST", "/api/v1/users"): _b_user_create,
    ("GET", "/api/v1/users/{user_id}"): _b_user_get,
    ("PATCH", "/api/v1/users/{user_id}"): _b_user_patch,
    ("DELETE", "/api/v1/users/{user_id}"): _b_user_delete,
    ("GET", "/api/v1/audit"): _const("/api/v1/audit", None, 200),
    ("GET", "/api/v1/modules/registration-history"): _const(
        "/api/v1/modules/registration-history", None, 200
    ),
    ("GET", "/api/v1/modules/metrics"): _const("/api/v1/modules/metrics", None, 200),
    ("GET", "/api/v1/modules"): _const("/api/v1/modules", None, 200),
    ("POST", "/api/v1/modules"): _b_module_create,
    ("GET", M): _b_module_get,
    ("PATCH", M): _b_module_patch,
    ("DELETE", M): _b_module_delete,
    ("POST", M + "/health"): _b_module_health,
    ("POST", M + "/enable"): _b_module_enable,
    ("POST", M + "/disable"): _b_module_disable,
    ("GET", M + "/routes"): _b_routes_list,
    ("POST", M + "/routes"): _b_route_create,
    ("GET", M + "/routes/{route_id}"): _b_route_get,
    ("PATCH", M + "/routes/{route_id}"): _b_route_patch,
    ("DELETE", M + "/routes/{route_id}"): _b_route_delete,
    ("POST", M + "/routes/{route_id}/enable"): _b_route_enable,
    ("POST", M + "/routes/{route_id}/disable"): _b_route_disable,
    ("GET", "/api/v1/routing/conflicts"): _const("/api/v1/routing/conflicts", None, 200),
    ("GET", M + "/scaling"): _b_scaling_get,
    ("POST", M + "/scaling"): _b_scaling_create,
    ("PUT", M + "/scaling"): _b_scaling_put,
    ("DELETE", M + "/scaling"): _b_scaling_delete,
    ("POST", M + "/scaling/enable"): _b_scaling_enable,
    ("POST", M + "/scaling/disable"): _b_scaling_disable,
    ("GET", M + "/deployments"): _b_deps_list,
    ("POST", M + "/deployments"): _b_dep_create,
    ("GET", M + "/deployments/{deployment_id}"): _b_dep_get,
    ("PATCH", M + "/deployments/{deployment_id}"): _b_dep_patch,
    ("POST", M + "/deployments/{deployment_id}/promote"): _b_dep_promote,
    ("POST", M + "/deployments/{deployment_id}/rollback"): _b_dep_rollback,
    ("GET", M + "/deployments/{deployment_id}/health"): _b_dep_health,
    **_crud("/api/v1/services", "service_id", Cases.service_body),
    ("POST", "/api/v1/services/{service_id}/reload"): _b_reload,
    ("POST", "/api/v1/services/{service_id}/reload-xds"): _b_reload_xds,
    **_crud("/api/v1/nlb/listeners", "listener_id", Cases.listener_body),
    **_crud("/api/v1/nlb/rate-limits", "rate_limit_id", Cases.rate_limit_body),
    **_crud("/api/v1/feature-flags", "flag_id", Cases.flag_body),
    ("GET", "/api/v1/state/status"): _const("/api/v1/state/status", None, 200),
    ("POST", "/api/v1/state/metrics"): _const(
        "/api/v1/state/metrics", {"instance_id": "mx-1", "routes": {}}, 200
    ),
    ("GET", "/api/v1/state/{component}"): _const("/api/v1/state/alb?after=0&timeout=0", None, 200),
    ("POST", "/api/v1/state/{component}/ack"): _const(
        "/api/v1/state/alb/ack", {"instance_id": "mx-1", "applied_version": 1}, 200
    ),
}


def test_pinned_roles_cover_every_endpoint_of_the_app() -> None:
    served = {(ep.method, ep.path): ep.auth for ep in all_endpoints()}
    pinned = {**EXPECTED_ROLE, **dict.fromkeys(PUBLIC, "public")}
    assert served == pinned
    assert set(BUILDERS) == set(EXPECTED_ROLE)


def _bad_tokens() -> dict[str, str]:
    now = int(time.time())
    expired = {"sub": "1", "name": "admin", "role": "admin", "typ": "access"}
    return {
        "none": "",
        "expired": jwt.encode({**expired, "iat": now - 7200, "exp": now - 3600}, SECRET, "HS256"),
        "wrong_key": issue_token(
            "another-secret-key-0123456789abcdef",
            user_id=1,
            username="admin",
            role="admin",
            kind="access",
            ttl_seconds=600,
        ),
    }


async def test_authorization_matrix(api) -> None:
    roles = {
        "admin": api.token,
        "operator": await _user_token(api, "matrix-op", "operator"),
        "viewer": await _user_token(api, "matrix-viewer", "viewer"),
    }
    cases = Cases(api)
    failures: list[tuple[str, str, str, int, Any]] = []

    async def expect(method: str, case: Case, who: str, want: int, **kw: Any) -> None:
        path, body, _ = case
        status, out = await api.call(method, path, body, **kw)
        error = out.get("error") if isinstance(out, dict) else None
        if status != want or (
            want in (401, 403) and error != ("unauthorized", "forbidden")[want == 403]
        ):
            failures.append((method, path, who, status, out))

    for (method, path), needed in EXPECTED_ROLE.items():
        case: Case | None = None
        for who, token in roles.items():
            allowed = needed != "cluster" and RANK[who] >= RANK[needed]
            allowed = allowed or (needed == "cluster" and who == "admin")
            if allowed:
                case = await cases.build(method, path)
                await expect(method, case, who, case[2], token=token)
            else:
                case = case or await cases.build(method, path)
                await expect(method, case, who, 403, token=token)
        assert case is not None
        for who, token in _bad_tokens().items():
            await expect(method, case, who, 401, token=token)
        if needed == "cluster":
            case = await cases.build(method, path)
            await expect(method, case, "cluster key", case[2], token="", headers=CLUSTER_HDR)
            bad = {"X-Cluster-Api-Key": "bad"}
            await expect(method, case, "bad cluster key", 401, token="", headers=bad)
    assert failures == []


CLUSTER_HDR = {"X-Cluster-Api-Key": CLUSTER_KEY}
