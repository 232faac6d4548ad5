"""SQLAlchemy 2 models: Postgres is the source of truth (SQLite in embedded mode)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(AsyncAttrs, DeclarativeBase):
    type_annotation_map = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        datetime: DateTime(timezone=True),
    }


class Timestamps:
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class User(Timestamps, Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(128), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))
    is_active: Mapped[bool] = mapped_column(default=True)


class Module(Timestamps, Base):
    __tablename__ = "modules"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    type: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(Text, default="")
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    grpc_host: Mapped[str] = mapped_column(String(255), default="")
    grpc_port: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[str] = mapped_column(String(64), default="")
    image: Mapped[str] = mapped_column(String(512), default="")
    replicas: Mapped[int] = mapped_column(Integer, default=1)
    enabled: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(16), default="DISABLED")
    health: Mapped[str] = mapped_column(String(16), default="UNKNOWN")
    health_message: Mapped[str] = mapped_column(Text, default="")
    last_health_check: Mapped[datetime | None] = mapped_column(default=None)


class ModuleRoute(Timestamps, Base):
    __tablename__ = "module_routes"
    __table_args__ = (UniqueConstraint("module_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    module_id: Mapped[int] = mapped_column(ForeignKey("modules.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    match_rules: Mapped[dict[str, Any]] = mapped_column(default=dict)
    backend_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    rate_limit: Mapped[float | None] = mapped_column(Float, default=None)
    rate_limit_burst: Mapped[int | None] = mapped_column(Integer, default=None)
    priority: Mapped[int] = mapped_column(Integer, default=100)
    enabled: Mapped[bool] = mapped_column(default=True)


class ScalingPolicy(Timestamps, Base):
    __tablename__ = "scaling_policies"
    id: Mapped[int] = mapped_column(primary_key=True)
    module_id: Mapped[int] = mapped_column(
        ForeignKey("modules.id", ondelete="CASCADE"), unique=True
    )
    min_instances: Mapped[int] = mapped_column(Integer, default=1)
    max_instances: Mapped[int] = mapped_column(Integer, default=1)
    scale_up_threshold: Mapped[float] = mapped_column(Float, default=80.0)
    scale_down_threshold: Mapped[float] = mapped_column(Float, default=20.0)
    cooldown_seconds: Mapped[int] = mapped_column(Integer, default=300)
    metric: Mapped[str] = mapped_column(String(32), default="cpu")
    enabled: Mapped[bool] = mapped_column(default=True)


class Deployment(Timestamps, Base):
    __tablename__ = "deployments"
    id: Mapped[int] = mapped_column(primary_key=True)
    module_id: Mapped[int] = mapped_column(ForeignKey("modules.id", ondelete="CASCADE"), index=True)
    version: Mapped[str] = mapped_column(String(64))
    image: Mapped[str] = mapped_column(String(512), default="")
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    environment: Mapped[dict[str, Any]] = mapped_column(default=dict)
    traffic_weight: Mapped[float] = mapped_column(Float, default=0.0)
    status: Mapped[str] = mapped_column(String(16), default="PENDING")
    previous_deployment_id: Mapped[int | None] = mapped_column(Integer, default=None)
    health_check_passed: Mapped[bool | None] = mapped_column(default=None)
    health_check_message: Mapped[str] = mapped_column(Text, default="")
    deployed_by: Mapped[str] = mapped_column(String(128), default="")
    deployed_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)
    rollback_reason: Mapped[str] = mapped_column(Text, default="")
    weight_history: Mapped[list[Any]] = mapped_column(default=list)


class Service(Timestamps, Base):
    __tablename__ = "services"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    protocol: Mapped[str] = mapped_column(String(16), default="http")
    module: Mapped[str | None] = mapped_column(String(128), default=None)
    tls_enabled: Mapped[bool] = mapped_column(default=False)
    health_check_path: Mapped[str] = mapped_column(String(255), default="")
    enabled: Mapped[bool] = mapped_column(default=True)
    tags: Mapped[list[Any]] = mapped_column(default=list)


class Listener(Timestamps, Base):
    __tablename__ = "nlb_listeners"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    port: Mapped[int] = mapped_column(Integer, unique=True)
    protocols: Mapped[list[Any]] = mapped_column(default=list)
    default_protocol: Mapped[str] = mapped_column(String(32), default="")
    transport: Mapped[str] = mapped_column(String(8), default="tcp")
    proxy_protocol: Mapped[str] = mapped_column(String(8), default="v2", server_default="v2")


class RateLimit(Timestamps, Base):
    __tablename__ = "nlb_rate_limits"
    id: Mapped[int] = mapped_column(primary_key=True)
    target: Mapped[str] = mapped_column(String(255), unique=True)
    requests_per_second: Mapped[float] = mapped_column(Float)
    burst: Mapped[int] = mapped_column(Integer)
    scope: Mapped[str] = mapped_column(String(16), default="local")


class FeatureFlag(Timestamps, Base):
    __tablename__ = "feature_flags"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    enabled: Mapped[bool] = mapped_column(default=False)
    description: Mapped[str] = mapped_column(Text, default="")


class AuditLog(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64), default="")
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    config_version: Mapped[int | None] = mapped_column(Integer, default=None)


class RegistrationEvent(Base):
    __tablename__ = "registration_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    module_name: Mapped[str] = mapped_column(String(128), index=True)
    event: Mapped[str] = mapped_column(String(32))
    instance_id: Mapped[str] = mapped_column(String(255), default="")
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ConfigState(Base):
    """One row (id=1): the global monotonically increasing config_version."""

    __tablename__ = "config_state"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class StateSnapshot(Base):
    __tablename__ = "state_snapshots"
    component: Mapped[str] = mapped_column(String(16), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)
    #: the snapshot as JSON text, exactly as served and written to Redis
    body: Mapped[str] = mapped_column(Text)


class StateAck(Base):
    __tablename__ = "state_acks"
    component: Mapped[str] = mapped_column(String(16), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    applied_version: Mapped[int] = mapped_column(BigInteger, default=0)
    rejected_version: Mapped[int] = mapped_column(BigInteger, default=0)
    reason: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class RouteMetric(Base):
    """Per-route counters last reported by a data-plane instance (seed 004 metrics)."""

    __tablename__ = "route_metrics"
    instance_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    route: Mapped[str] = mapped_column(String(255), primary_key=True)
    module: Mapped[str] = mapped_column(String(128), default="")
    call_count: Mapped[int] = mapped_column(BigInteger, default=0)
    error_count: Mapped[int] = mapped_column(BigInteger, default=0)
    total_duration_ms: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
