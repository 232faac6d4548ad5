"""Auth: login/refresh/rate limit, users CRUD, and the authorization matrix over every write
endpoint x {admin, operator, viewer, no token, expired token, token signed with another key}."""

from __future__ import annotations

import re
import time

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


def _concrete(path: str) -> str:
    path = path.replace("{component}", "alb")
    return re.sub(r"\{\w+\}", "1", path)


async def test_authorization_matrix(api) -> None:
    # something to act on, so allowed calls reach their handler
    await api.call("POST", "/api/v1/modules", {"name": "matrix-mod", "type": "ALB"})
    tokens = {
        "admin": api.token,
        "operator": await _user_token(api, "matrix-op", "operator"),
        "viewer": await _user_token(api, "matrix-viewer", "viewer"),
        "none": "",
        "expired": jwt.encode(
            {
                "sub": "1",
                "name": "admin",
                "role": "admin",
                "typ": "access",
                "iat": int(time.time()) - 7200,
                "exp": int(time.time()) - 3600,
            },
            SECRET,
            algorithm="HS256",
        ),
        "wrong_key": issue_token(
            "another-secret-key-0123456789abcdef",
            user_id=1,
            username="admin",
            role="admin",
            kind="access",
            ttl_seconds=600,
        ),
    }
    rank = {"viewer": 1, "operator": 2, "admin": 3}
    writes = [ep for ep in all_endpoints() if ep.method != "GET" and ep.auth != "public"]
    assert len(writes) >= 30
    failures = []
    for ep in writes:
        path = _concrete(ep.path)
        # skip self-deletion of the admin (409 by design), not an auth question
        for who, tok in tokens.items():
            status, body = await api.call(ep.method, path, {}, token=tok)
            if who in ("none", "expired", "wrong_key"):
                ok = status == 401 and body["error"] == "unauthorized"
            elif ep.auth == "cluster":
                ok = status not in (401, 403) if who == "admin" else status == 403
            else:
                allowed = rank[who] >= rank[ep.auth]
                ok = (status not in (401, 403)) if allowed else status == 403
            if not ok:
                failures.append((ep.method, ep.path, who, status))
        if ep.auth == "cluster":
            status, _ = await api.call(
                ep.method, path, {}, token="", headers={"X-Cluster-Api-Key": "bad"}
            )
            if status != 401:
                failures.append((ep.method, ep.path, "bad cluster key", status))
            status, _ = await api.call(
                ep.method, path, {}, token="", headers={"X-Cluster-Api-Key": CLUSTER_KEY}
            )
            if status in (401, 403):
                failures.append((ep.method, ep.path, "cluster key", status))
    assert failures == []
