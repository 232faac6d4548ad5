"""Login, refresh, users (admin) and the audit log."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

from marchproxy_api.db.models import AuditLog
from marchproxy_api.endpoints import Ctx, Endpoint
from marchproxy_api.errors import ApiError, conflict, not_found
from marchproxy_api.keys import (
    login_limiter_key,
    metrics_key,
    password_hashing_key,
    settings_key,
)
from marchproxy_api.repos.entities import AuditRepo, UserRepo
from marchproxy_api.schemas import (
    AuditOut,
    AuditPage,
    AuditQuery,
    ListQuery,
    LoginIn,
    RefreshIn,
    RoleName,
    TokenOut,
    UserCreate,
    UserOut,
    UserPage,
    UserUpdate,
)
from marchproxy_api.security import AuthError, HashingBusy, decode_token, issue_token
from marchproxy_api.txn import write_tx

from .common import changes, page, read_session, row


def _tokens(ctx: Ctx, user_id: int, username: str, role: str) -> TokenOut:
    s = ctx.app[settings_key]
    access_ttl = s.access_token_minutes * 60
    secret = s.effective_secret_key
    return TokenOut(
        access_token=issue_token(
            secret,
            user_id=user_id,
            username=username,
            role=role,
            kind="access",
            ttl_seconds=access_ttl,
        ),
        refresh_token=issue_token(
            secret,
            user_id=user_id,
            username=username,
            role=role,
            kind="refresh",
            ttl_seconds=s.refresh_token_days * 86400,
        ),
        expires_in=int(access_ttl),
        # users.role is only ever written from RoleName-validated input (and admin at bootstrap)
        role=cast(RoleName, role),
    )


async def login(ctx: Ctx) -> TokenOut:
    body: LoginIn = ctx.body
    limiter = ctx.app[login_limiter_key]
    peer = ctx.request.remote or "?"
    wait = limiter.retry_after(body.username, peer)
    if wait > 0:
        err = ApiError(429, "rate_limited", "too many failed logins", retry_after=round(wait, 1))
        err.headers["Retry-After"] = str(int(wait) + 1)
        raise err
    async with read_session(ctx) as session:
        user = await UserRepo(session).by_username(body.username)
    with _busy_is_503():
        ok = await ctx.app[password_hashing_key].verify(
            user.password_hash if user else None, body.password
        )
    if not ok or user is None or not user.is_active:
        limiter.failed(body.username, peer)
        ctx.app[metrics_key].login_failures.inc()
        raise ApiError(401, "unauthorized", "invalid username or password")
    limiter.succeeded(body.username, peer)
    return _tokens(ctx, user.id, user.username, user.role)


@contextmanager
def _busy_is_503() -> Iterator[None]:
    try:
        yield
    except HashingBusy:
        err = ApiError(503, "busy", "too many password checks in progress; retry shortly")
        err.headers["Retry-After"] = "1"
        raise err from None


async def _hash(ctx: Ctx, password: str) -> str:
    with _busy_is_503():
        hashed: str = await ctx.app[password_hashing_key].hash(password)
        return hashed


async def refresh(ctx: Ctx) -> TokenOut:
    body: RefreshIn = ctx.body
    try:
        claims = decode_token(
            ctx.app[settings_key].effective_secret_key, body.refresh_token, "refresh"
        )
    except AuthError as exc:
        raise ApiError(401, "unauthorized", exc.message) from None
    async with read_session(ctx) as session:
        user = await UserRepo(session).get(int(claims["sub"]))
    if user is None or not user.is_active:
        raise ApiError(401, "unauthorized", "user no longer exists or is disabled")
    return _tokens(ctx, user.id, user.username, user.role)


async def list_users(ctx: Ctx) -> UserPage:
    q: ListQuery = ctx.query
    async with read_session(ctx) as session:
        rows, total = await UserRepo(session).page(limit=q.limit, offset=q.offset)
    return page(UserPage, UserOut, rows, total, q)


async def create_user(ctx: Ctx) -> UserOut:
    body: UserCreate = ctx.body
    password_hash = await _hash(ctx, body.password)
    async with write_tx(ctx.app, ctx.actor, config=False) as tx:
        repo = UserRepo(tx.session)
        if await repo.by_username(body.username):
            raise conflict(f"user {body.username!r} already exists", username=body.username)
        user = await repo.add(
            {
                "username": body.username,
                "password_hash": password_hash,
                "role": body.role,
            }
        )
        tx.audit("create", "user", user.id, None, row(user))
    return UserOut.model_validate(user)


async def get_user(ctx: Ctx) -> UserOut:
    async with read_session(ctx) as session:
        user = await UserRepo(session).get(ctx.params["user_id"])
    if user is None:
        raise not_found("user", ctx.params["user_id"])
    return UserOut.model_validate(user)


async def update_user(ctx: Ctx) -> UserOut:
    body: UserUpdate = ctx.body
    values = changes(body)
    if "password" in values:
        values["password_hash"] = await _hash(ctx, values.pop("password"))
    async with write_tx(ctx.app, ctx.actor, config=False) as tx:
        repo = UserRepo(tx.session)
        user = await repo.get(ctx.params["user_id"])
        if user is None:
            raise not_found("user", ctx.params["user_id"])
        before = row(user)
        await repo.update(user, values)
        tx.audit("update", "user", user.id, before, row(user))
    return UserOut.model_validate(user)


async def delete_user(ctx: Ctx) -> None:
    async with write_tx(ctx.app, ctx.actor, config=False) as tx:
        repo = UserRepo(tx.session)
        user = await repo.get(ctx.params["user_id"])
        if user is None:
            raise not_found("user", ctx.params["user_id"])
        if ctx.principal is not None and ctx.principal.user_id == user.id:
            raise conflict("you cannot delete yourself")
        tx.audit("delete", "user", user.id, row(user), None)
        await repo.delete(user)


async def list_audit(ctx: Ctx) -> AuditPage:
    q: AuditQuery = ctx.query
    where = []
    if q.resource_type:
        where.append(AuditLog.resource_type == q.resource_type)
    if q.actor:
        where.append(AuditLog.actor == q.actor)
    async with read_session(ctx) as session:
        rows, total = await AuditRepo(session).page(
            where, limit=q.limit, offset=q.offset, order=AuditLog.id.desc()
        )
    return page(AuditPage, AuditOut, rows, total, q)


U = "/api/v1/users"
ENDPOINTS = [
    Endpoint(
        "POST",
        "/api/v1/auth/login",
        login,
        "Log in (JWT access + refresh)",
        "auth",
        auth="public",
        body=LoginIn,
        response=TokenOut,
        extra_statuses=(401, 429, 503),
    ),
    Endpoint(
        "POST",
        "/api/v1/auth/refresh",
        refresh,
        "Exchange a refresh token",
        "auth",
        auth="public",
        body=RefreshIn,
        response=TokenOut,
        extra_statuses=(401,),
    ),
    Endpoint(
        "GET",
        U,
        list_users,
        "List users",
        "users",
        auth="admin",
        query=ListQuery,
        response=UserPage,
    ),
    Endpoint(
        "POST",
        U,
        create_user,
        "Create user",
        "users",
        auth="admin",
        body=UserCreate,
        response=UserOut,
        status=201,
        extra_statuses=(409,),
    ),
    Endpoint(
        "GET", U + "/{user_id}", get_user, "Get user", "users", auth="admin", response=UserOut
    ),
    Endpoint(
        "PATCH",
        U + "/{user_id}",
        update_user,
        "Update user",
        "users",
        auth="admin",
        body=UserUpdate,
        response=UserOut,
    ),
    Endpoint(
        "DELETE",
        U + "/{user_id}",
        delete_user,
        "Delete user (not yourself)",
        "users",
        auth="admin",
        status=204,
        extra_statuses=(409,),
    ),
    Endpoint(
        "GET",
        "/api/v1/audit",
        list_audit,
        "Audit log of every write",
        "audit",
        auth="admin",
        query=AuditQuery,
        response=AuditPage,
    ),
]
