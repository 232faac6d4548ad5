"""Per-table repositories (SQL only)."""

from __future__ import annotations

from sqlalchemy import func, select

from marchproxy_api.db.models import (
    AuditLog,
    Deployment,
    FeatureFlag,
    Listener,
    Module,
    ModuleRoute,
    RateLimit,
    RegistrationEvent,
    ScalingPolicy,
    Service,
    User,
)

from .base import Repo


class UserRepo(Repo[User]):
    model = User

    async def by_username(self, username: str) -> User | None:
        rows = await self.session.execute(select(User).where(User.username == username))
        return rows.scalar_one_or_none()

    async def count(self) -> int:
        return len((await self.session.execute(select(User.id))).all())


class ModuleRepo(Repo[Module]):
    model = Module

    async def by_name(self, name: str) -> Module | None:
        rows = await self.session.execute(select(Module).where(Module.name == name))
        return rows.scalar_one_or_none()


class RouteRepo(Repo[ModuleRoute]):
    model = ModuleRoute

    async def of_module(self, module_id: int, route_id: int) -> ModuleRoute | None:
        rows = await self.session.execute(
            select(ModuleRoute).where(
                ModuleRoute.module_id == module_id, ModuleRoute.id == route_id
            )
        )
        return rows.scalar_one_or_none()

    async def same_match(
        self, *, host: str, path: str, priority: int, exclude_id: int
    ) -> list[tuple[ModuleRoute, str, str]]:
        """Enabled routes (with module name and type) that match ``host``/``path`` at
        ``priority``: the only candidates a new route can clash with (seed 004)."""
        rules = ModuleRoute.match_rules
        route_path = func.coalesce(func.nullif(rules["path"].as_string(), ""), "/*")
        route_host = func.lower(func.coalesce(func.nullif(rules["host"].as_string(), ""), "*"))
        rows = await self.session.execute(
            select(ModuleRoute, Module.name, Module.type)
            .join(Module, Module.id == ModuleRoute.module_id)
            .where(
                ModuleRoute.enabled.is_(True),
                ModuleRoute.priority == priority,
                ModuleRoute.id != exclude_id,
                route_path == path,
                route_host == host,
            )
            .order_by(ModuleRoute.id)
        )
        return [(r, name, type_) for r, name, type_ in rows.tuples()]

    async def enabled_with_modules(self) -> list[tuple[ModuleRoute, str, str]]:
        rows = await self.session.execute(
            select(ModuleRoute, Module.name, Module.type)
            .join(Module, Module.id == ModuleRoute.module_id)
            .where(ModuleRoute.enabled.is_(True))
            .order_by(ModuleRoute.id)
        )
        return [(r, name, type_) for r, name, type_ in rows.tuples()]


class ScalingRepo(Repo[ScalingPolicy]):
    model = ScalingPolicy

    async def of_module(self, module_id: int) -> ScalingPolicy | None:
        rows = await self.session.execute(
            select(ScalingPolicy).where(ScalingPolicy.module_id == module_id)
        )
        return rows.scalar_one_or_none()


class DeploymentRepo(Repo[Deployment]):
    model = Deployment

    async def of_module(self, module_id: int, dep_id: int) -> Deployment | None:
        rows = await self.session.execute(
            select(Deployment).where(Deployment.module_id == module_id, Deployment.id == dep_id)
        )
        return rows.scalar_one_or_none()

    async def live(self, module_id: int) -> list[Deployment]:
        """Deployments that carry traffic now (ACTIVE or ROLLING_OUT), oldest first."""
        rows = await self.session.execute(
            select(Deployment)
            .where(
                Deployment.module_id == module_id,
                Deployment.status.in_(("ACTIVE", "ROLLING_OUT")),
            )
            .order_by(Deployment.id)
        )
        return list(rows.scalars())

    async def active(self, module_id: int) -> Deployment | None:
        rows = await self.session.execute(
            select(Deployment)
            .where(Deployment.module_id == module_id, Deployment.status == "ACTIVE")
            .order_by(Deployment.id.desc())
            .limit(1)
        )
        return rows.scalar_one_or_none()


class ServiceRepo(Repo[Service]):
    model = Service


class ListenerRepo(Repo[Listener]):
    model = Listener


class RateLimitRepo(Repo[RateLimit]):
    model = RateLimit


class FeatureFlagRepo(Repo[FeatureFlag]):
    model = FeatureFlag


class AuditRepo(Repo[AuditLog]):
    model = AuditLog


class HistoryRepo(Repo[RegistrationEvent]):
    model = RegistrationEvent
