"""Seed 003 services (CRUD + reload) and the NLB's listeners and rate limits."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from marchproxy_api.db.models import FeatureFlag, Listener, RateLimit, Service
from marchproxy_api.endpoints import Ctx, Endpoint
from marchproxy_api.errors import conflict, not_found
from marchproxy_api.repos.base import Repo
from marchproxy_api.repos.entities import (
    FeatureFlagRepo,
    ListenerRepo,
    RateLimitRepo,
    ServiceRepo,
)
from marchproxy_api.schemas import (
    COMPONENTS,
    FeatureFlagIn,
    FeatureFlagOut,
    FeatureFlagPage,
    ListenerIn,
    ListenerOut,
    ListenerPage,
    ListQuery,
    RateLimitIn,
    RateLimitOut,
    RateLimitPage,
    ReloadOut,
    ServiceIn,
    ServiceOut,
    ServicePage,
    ServiceQuery,
)
from marchproxy_api.txn import write_tx

from .common import page, read_session, row


class _Crud:
    """CRUD endpoints for one table whose rows have one unique natural key."""

    def __init__(
        self,
        *,
        base: str,
        param: str,
        kind: str,
        repo: type[Repo[Any]],
        model: Any,
        unique: str,
        body: type[BaseModel],
        out: type[BaseModel],
        page_model: type[BaseModel],
        query: type[BaseModel],
        tag: str,
    ) -> None:
        self.base, self.param, self.kind = base, param, kind
        self.repo, self.model, self.unique = repo, model, unique
        self.body, self.out, self.page_model, self.query, self.tag = (
            body,
            out,
            page_model,
            query,
            tag,
        )

    def _filters(self, q: Any) -> list[Any]:
        where = []
        for name in ("enabled", "protocol", "name"):
            val = getattr(q, name, None)
            if val is not None and hasattr(self.model, name):
                where.append(getattr(self.model, name) == val)
        return where

    async def list_items(self, ctx: Ctx) -> BaseModel:
        q = ctx.query
        async with read_session(ctx) as session:
            rows, total = await self.repo(session).page(
                self._filters(q), limit=q.limit, offset=q.offset
            )
        return page(self.page_model, self.out, rows, total, q)

    async def _unique_taken(self, repo: Repo[Any], value: Any, ident: int | None) -> bool:
        rows, _ = await repo.page([getattr(self.model, self.unique) == value], limit=2)
        return any(r.id != ident for r in rows)

    async def create(self, ctx: Ctx) -> BaseModel:
        body = ctx.body
        async with write_tx(ctx.app, ctx.actor) as tx:
            repo = self.repo(tx.session)
            value = getattr(body, self.unique)
            if await self._unique_taken(repo, value, None):
                raise conflict(f"{self.kind} with {self.unique} {value!r} already exists")
            obj = await repo.add(body.model_dump(mode="json"))
            tx.audit("create", self.kind, obj.id, None, row(obj))
        return self.out.model_validate(obj)

    async def _get(self, repo: Repo[Any], ctx: Ctx) -> Any:
        obj = await repo.get(ctx.params[self.param])
        if obj is None:
            raise not_found(self.kind, ctx.params[self.param])
        return obj

    async def get(self, ctx: Ctx) -> BaseModel:
        async with read_session(ctx) as session:
            obj = await self._get(self.repo(session), ctx)
        return self.out.model_validate(obj)

    async def put(self, ctx: Ctx) -> BaseModel:
        body = ctx.body
        async with write_tx(ctx.app, ctx.actor) as tx:
            repo = self.repo(tx.session)
            obj = await self._get(repo, ctx)
            value = getattr(body, self.unique)
            if await self._unique_taken(repo, value, obj.id):
                raise conflict(f"{self.kind} with {self.unique} {value!r} already exists")
            before = row(obj)
            await repo.update(obj, body.model_dump(mode="json"))
            tx.audit("update", self.kind, obj.id, before, row(obj))
        return self.out.model_validate(obj)

    async def delete(self, ctx: Ctx) -> None:
        async with write_tx(ctx.app, ctx.actor) as tx:
            repo = self.repo(tx.session)
            obj = await self._get(repo, ctx)
            tx.audit("delete", self.kind, obj.id, row(obj), None)
            await repo.delete(obj)

    def endpoints(self) -> list[Endpoint]:
        item = f"{self.base}/{{{self.param}}}"
        k = self.kind
        return [
            Endpoint(
                "GET",
                self.base,
                self.list_items,
                f"List {k}s",
                self.tag,
                query=self.query,
                response=self.page_model,
            ),
            Endpoint(
                "POST",
                self.base,
                self.create,
                f"Create {k}",
                self.tag,
                auth="admin",
                body=self.body,
                response=self.out,
                status=201,
                extra_statuses=(409,),
            ),
            Endpoint("GET", item, self.get, f"Get {k}", self.tag, response=self.out),
            Endpoint(
                "PUT",
                item,
                self.put,
                f"Replace {k}",
                self.tag,
                auth="admin",
                body=self.body,
                response=self.out,
                extra_statuses=(409,),
            ),
            Endpoint(
                "DELETE", item, self.delete, f"Delete {k}", self.tag, auth="admin", status=204
            ),
        ]


services = _Crud(
    base="/api/v1/services",
    param="service_id",
    kind="service",
    repo=ServiceRepo,
    model=Service,
    unique="name",
    body=ServiceIn,
    out=ServiceOut,
    page_model=ServicePage,
    query=ServiceQuery,
    tag="services",
)
listeners = _Crud(
    base="/api/v1/nlb/listeners",
    param="listener_id",
    kind="listener",
    repo=ListenerRepo,
    model=Listener,
    unique="port",
    body=ListenerIn,
    out=ListenerOut,
    page_model=ListenerPage,
    query=ListQuery,
    tag="nlb",
)
rate_limits = _Crud(
    base="/api/v1/nlb/rate-limits",
    param="rate_limit_id",
    kind="rate_limit",
    repo=RateLimitRepo,
    model=RateLimit,
    unique="target",
    body=RateLimitIn,
    out=RateLimitOut,
    page_model=RateLimitPage,
    query=ListQuery,
    tag="nlb",
)


async def reload_service(ctx: Ctx) -> ReloadOut:
    """Seed 003 reload: recompile and republish every snapshot under a new version."""
    async with write_tx(ctx.app, ctx.actor, force_publish=True) as tx:
        svc = await ServiceRepo(tx.session).get(ctx.params["service_id"])
        if svc is None:
            raise not_found("service", ctx.params["service_id"])
        tx.audit("reload", "service", svc.id, None, None)
    return ReloadOut(config_version=tx.version or 0, components=sorted(tx.changed or COMPONENTS))


_reload = [
    Endpoint(
        "POST",
        "/api/v1/services/{service_id}/reload",
        reload_service,
        "Republish desired state (seed 003 reload)",
        "services",
        auth="operator",
        response=ReloadOut,
    ),
    Endpoint(
        "POST",
        "/api/v1/services/{service_id}/reload-xds",
        reload_service,
        "Alias of /reload (seed 003 name)",
        "services",
        auth="operator",
        response=ReloadOut,
    ),
]

feature_flags = _Crud(
    base="/api/v1/feature-flags",
    param="flag_id",
    kind="feature_flag",
    repo=FeatureFlagRepo,
    model=FeatureFlag,
    unique="name",
    body=FeatureFlagIn,
    out=FeatureFlagOut,
    page_model=FeatureFlagPage,
    query=ListQuery,
    tag="feature-flags",
)

ENDPOINTS = [
    *services.endpoints(),
    *_reload,
    *listeners.endpoints(),
    *rate_limits.endpoints(),
    *feature_flags.endpoints(),
]
