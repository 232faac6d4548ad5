"""Pydantic models: they validate requests AND generate the OpenAPI document (openapi.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

from marchproxy_common.listeners import LISTENER_PROTOCOLS

MAX_NAME = 128
MAX_TEXT = 4096
MAX_ID = 2**31 - 1
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

ModuleType = Literal[
    "ALB",
    "DBLB",
    "AILB",
    "RTMP",
    "L7_HTTP",
    "L4_TCP",
    "L4_UDP",
    "L3_NETWORK",
    "OBSERVABILITY",
    "ZERO_TRUST",
    "MULTI_CLOUD",
]
ModuleStatus = Literal["DISABLED", "STARTING", "ENABLED", "STOPPING", "ERROR"]
DeploymentStatus = Literal["PENDING", "ROLLING_OUT", "ACTIVE", "INACTIVE", "ROLLED_BACK", "FAILED"]
RoleName = Literal["admin", "operator", "viewer"]
Component = Literal["nlb", "alb", "dblb", "ailb", "rtmp"]
COMPONENTS: tuple[str, ...] = ("nlb", "alb", "dblb", "ailb", "rtmp")
LoadBalancing = Literal["round_robin", "least_conn", "weighted", "random", "ip_hash"]
HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT", "TRACE"}


def name_field(default: Any = ...) -> Any:
    return Field(default, min_length=1, max_length=MAX_NAME, pattern=NAME_PATTERN)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ErrorOut(BaseModel):
    error: str
    message: str
    details: dict[str, Any] = {}


# ---------------------------------------------------------------- auth and users
class LoginIn(Strict):
    username: str = Field(min_length=1, max_length=MAX_NAME)
    password: str = Field(min_length=1, max_length=1024)


class RefreshIn(Strict):
    refresh_token: str = Field(min_length=1, max_length=8192)


class TokenOut(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    role: RoleName


class UserCreate(Strict):
    username: str = name_field()
    password: str = Field(min_length=8, max_length=1024)
    role: RoleName = "viewer"


class UserUpdate(Strict):
    password: str | None = Field(default=None, min_length=8, max_length=1024)
    role: RoleName | None = None
    is_active: bool | None = None


class UserOut(Out):
    id: int
    username: str
    role: RoleName
    is_active: bool
    created_at: datetime
    updated_at: datetime


# ---------------------------------------------------------------- modules
class ModuleCreate(Strict):
    name: str = name_field()
    type: ModuleType
    description: str = Field(default="", max_length=MAX_TEXT)
    config: dict[str, Any] = {}
    grpc_host: str = Field(default="", max_length=255)
    grpc_port: int = Field(default=0, ge=0, le=65535)
    version: str = Field(default="", max_length=64)
    image: str = Field(default="", max_length=512)
    replicas: int = Field(default=1, ge=0, le=10_000)
    enabled: bool = False


class ModuleUpdate(Strict):
    name: str | None = name_field(None)
    type: ModuleType | None = None
    description: str | None = Field(default=None, max_length=MAX_TEXT)
    config: dict[str, Any] | None = None
    grpc_host: str | None = Field(default=None, max_length=255)
    grpc_port: int | None = Field(default=None, ge=0, le=65535)
    version: str | None = Field(default=None, max_length=64)
    image: str | None = Field(default=None, max_length=512)
    replicas: int | None = Field(default=None, ge=0, le=10_000)
    enabled: bool | None = None


class ModuleOut(Out):
    id: int
    name: str
    type: str
    description: str
    config: dict[str, Any]
    grpc_host: str
    grpc_port: int
    version: str
    image: str
    replicas: int
    enabled: bool
    status: str
    health: str
    health_message: str
    last_health_check: datetime | None
    created_at: datetime
    updated_at: datetime


class HealthOut(BaseModel):
    healthy: bool
    status: str
    message: str
    checks: dict[str, str] = {}
    checked_at: datetime
    module_id: int
    deployment_id: int | None = None


# ---------------------------------------------------------------- routes
class MatchRules(Strict):
    host: str | None = Field(default=None, max_length=255)
    path: str | None = Field(default=None, max_length=2048)
    method: list[str] | None = None
    headers: dict[str, str] = {}
    query: dict[str, str] = {}

    @field_validator("method", mode="before")
    @classmethod
    def _methods(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            out = []
            for m in v:
                if not isinstance(m, str) or m.upper() not in HTTP_METHODS:
                    raise ValueError(f"unknown HTTP method {m!r}")
                out.append(m.upper())
            return sorted(set(out))
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError("path must start with '/'")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        return v.lower() if v else v


class BackendConfig(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    target: str | None = Field(default=None, max_length=2048)
    targets: list[str] = []
    timeout: float = Field(default=30.0, gt=0, le=86_400)
    retries: int = Field(default=3, ge=0, le=100)
    load_balancing: LoadBalancing = "round_robin"


class RouteCreate(Strict):
    name: str = name_field()
    match_rules: MatchRules = MatchRules()
    backend_config: BackendConfig = BackendConfig()
    rate_limit: float | None = Field(default=None, ge=0, le=1e9)
    rate_limit_burst: int | None = Field(default=None, ge=1, le=10**9)
    priority: int = Field(default=100, ge=0, le=1_000_000)
    enabled: bool = True


class RouteUpdate(Strict):
    name: str | None = name_field(None)
    match_rules: MatchRules | None = None
    backend_config: BackendConfig | None = None
    rate_limit: float | None = Field(default=None, ge=0, le=1e9)
    rate_limit_burst: int | None = Field(default=None, ge=1, le=10**9)
    priority: int | None = Field(default=None, ge=0, le=1_000_000)
    enabled: bool | None = None


class RouteOut(Out):
    id: int
    module_id: int
    name: str
    match_rules: dict[str, Any]
    backend_config: dict[str, Any]
    rate_limit: float | None
    rate_limit_burst: int | None
    priority: int
    enabled: bool
    created_at: datetime
    updated_at: datetime


# ---------------------------------------------------------------- scaling
class ScalingIn(Strict):
    min_instances: int = Field(default=1, ge=0, le=10_000)
    max_instances: int = Field(default=1, ge=1, le=10_000)
    scale_up_threshold: float = Field(default=80.0, ge=0, le=100)
    scale_down_threshold: float = Field(default=20.0, ge=0, le=100)
    cooldown_seconds: int = Field(default=300, ge=0, le=86_400)
    metric: Literal["cpu", "memory", "requests", "connections"] = "cpu"
    enabled: bool = True

    @model_validator(mode="after")
    def _bounds(self) -> ScalingIn:
        if self.min_instances > self.max_instances:
            raise ValueError("min_instances must not exceed max_instances")
        if self.scale_down_threshold >= self.scale_up_threshold:
            raise ValueError("scale_down_threshold must be below scale_up_threshold")
        return self


class ScalingOut(Out):
    id: int
    module_id: int
    min_instances: int
    max_instances: int
    scale_up_threshold: float
    scale_down_threshold: float
    cooldown_seconds: int
    metric: str
    enabled: bool
    created_at: datetime
    updated_at: datetime


# ---------------------------------------------------------------- deployments


class DeploymentCreate(Strict):
    version: str = Field(min_length=1, max_length=64)
    image: str = Field(default="", max_length=512)
    config: dict[str, Any] = {}
    environment: dict[str, str] = {}
    traffic_weight: float = Field(default=0.0, ge=0, le=100)


class DeploymentUpdate(Strict):
    image: str | None = Field(default=None, max_length=512)
    config: dict[str, Any] | None = None
    environment: dict[str, str] | None = None


class PromoteIn(Strict):
    traffic_weight: float = Field(default=100.0, ge=0, le=100)
    incremental: bool = False


class RollbackIn(Strict):
    reason: str = Field(default="", max_length=MAX_TEXT)


class DeploymentOut(Out):
    id: int
    module_id: int
    version: str
    image: str
    config: dict[str, Any]
    environment: dict[str, Any]
    traffic_weight: float
    status: str
    previous_deployment_id: int | None
    health_check_passed: bool | None
    health_check_message: str
    deployed_by: str
    deployed_at: datetime
    completed_at: datetime | None
    rollback_reason: str
    weight_history: list[dict[str, Any]]
    created_at: datetime
    updated_at: datetime


# ---------------------------------------------------------------- services (seed 003)
ServiceProtocol = Literal["tcp", "udp", "http", "https", "grpc", "postgresql", "mysql", "rtmp"]


class ServiceIn(Strict):
    name: str = name_field()
    description: str = Field(default="", max_length=MAX_TEXT)
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)
    protocol: ServiceProtocol = "http"
    module: str | None = Field(default=None, max_length=MAX_NAME)
    tls_enabled: bool = False
    health_check_path: str = Field(default="", max_length=255)
    enabled: bool = True
    tags: list[str] = Field(default=[], max_length=64)


class ServiceOut(Out):
    id: int
    name: str
    description: str
    host: str
    port: int
    protocol: str
    module: str | None
    tls_enabled: bool
    health_check_path: str
    enabled: bool
    tags: list[Any]
    created_at: datetime
    updated_at: datetime


class ReloadOut(BaseModel):
    config_version: int
    components: list[str]


# ---------------------------------------------------------------- NLB listeners / rate limits
class ListenerIn(Strict):
    name: str = name_field()
    port: int = Field(ge=1, le=65535)
    #: what the listener accepts (sniffed on the first bytes when there are several)
    protocols: list[str] = Field(min_length=1, max_length=32)
    default_protocol: str = Field(default="", max_length=32)
    transport: Literal["tcp", "udp"] = "tcp"
    #: what the NLB sends an instance before the client's bytes: a PROXY v2 or v1 header
    #: (modules), or nothing (plain TCP backends that do not speak PROXY)
    proxy_protocol: Literal["v2", "v1", "none"] = "v2"

    @field_validator("protocols")
    @classmethod
    def _known_protocols(cls, v: list[str]) -> list[str]:
        names = [p.strip().lower() for p in v]
        unknown = sorted(set(names) - LISTENER_PROTOCOLS)
        if unknown:
            raise ValueError(
                f"unknown protocols {unknown}; known: {', '.join(sorted(LISTENER_PROTOCOLS))}"
            )
        return names

    @model_validator(mode="after")
    def _default_is_listed(self) -> ListenerIn:
        default = self.default_protocol.strip().lower()
        if default and default not in self.protocols:
            raise ValueError(f"default_protocol {default!r} is not one of protocols")
        self.default_protocol = default
        return self


class ListenerOut(Out):
    id: int
    name: str
    port: int
    protocols: list[Any]
    default_protocol: str
    transport: str
    proxy_protocol: str
    created_at: datetime
    updated_at: datetime


class RateLimitIn(Strict):
    target: str = Field(min_length=1, max_length=255)
    requests_per_second: float = Field(gt=0, le=1e9)
    burst: int = Field(ge=1, le=10**9)
    #: local: per NLB process; cluster (= global): shared by every NLB through Redis
    scope: Literal["local", "cluster", "global"] = "local"


class RateLimitOut(Out):
    id: int
    target: str
    requests_per_second: float
    burst: int
    scope: str
    created_at: datetime
    updated_at: datetime


class FeatureFlagIn(Strict):
    name: str = name_field()
    enabled: bool = False
    description: str = Field(default="", max_length=MAX_TEXT)


class FeatureFlagOut(Out):
    id: int
    name: str
    enabled: bool
    description: str
    created_at: datetime
    updated_at: datetime


# ---------------------------------------------------------------- desired state
class StateAckIn(Strict):
    instance_id: str = Field(min_length=1, max_length=255)
    applied_version: int = Field(default=0, ge=0, le=2**62)
    rejected_version: int = Field(default=0, ge=0, le=2**62)
    reason: str = Field(default="", max_length=MAX_TEXT)


class StateAckOut(Out):
    component: str
    instance_id: str
    applied_version: int
    rejected_version: int
    reason: str
    updated_at: datetime


class ComponentStatus(BaseModel):
    component: str
    version: int
    published_version: int
    instances: list[StateAckOut]


class StateStatusOut(BaseModel):
    config_version: int
    redis: str
    components: list[ComponentStatus]


class RouteCounter(Strict):
    call_count: int = Field(default=0, ge=0, le=2**62)
    error_count: int = Field(default=0, ge=0, le=2**62)
    total_duration_ms: float = Field(default=0.0, ge=0, le=1e18)


class RouteMetricsIn(Strict):
    instance_id: str = Field(min_length=1, max_length=255)
    module: str = Field(default="", max_length=MAX_NAME)
    routes: dict[str, RouteCounter] = Field(default={}, max_length=10_000)


class RouteMetricOut(BaseModel):
    call_count: int
    total_duration_ms: float
    error_count: int
    avg_duration_ms: float
    success_rate: float


class RouteMetricsOut(RootModel[dict[str, RouteMetricOut]]):
    """Seed 004: ``"<module>:<route>"`` -> counters summed over the reporting instances."""


class AcceptedOut(BaseModel):
    accepted: int


# ---------------------------------------------------------------- desired-state snapshot
# The document data planes load (docs/desired-state.md); documented here for the long poll.
class SnapshotModule(BaseModel):
    id: int
    name: str
    type: str
    enabled: bool
    version: str
    config: dict[str, Any]
    replicas: int
    grpc_host: str
    grpc_port: int


class SnapshotRoute(BaseModel):
    id: int
    module: str
    name: str
    priority: int
    enabled: bool
    match_rules: dict[str, Any]
    backend_config: dict[str, Any]
    rate_limit: dict[str, Any] | None


class SnapshotDeployment(BaseModel):
    id: int
    module: str
    version: str
    image: str
    config: dict[str, Any]
    traffic_weight: float
    status: str


class StateSnapshotOut(BaseModel):
    component: Component
    version: int
    generated_at: str
    modules: list[SnapshotModule]
    routes: list[SnapshotRoute]
    deployments: list[SnapshotDeployment]
    #: the NLB's snapshot only
    listeners: list[dict[str, Any]] | None = None
    rate_limits: list[dict[str, Any]] | None = None
    scaling_policies: list[dict[str, Any]] | None = None
    services: list[dict[str, Any]] | None = None


# ---------------------------------------------------------------- system
class RootOut(BaseModel):
    name: str
    version: str
    docs: str
    openapi: str
    health: str


class HealthzOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready"]
    config_version: int


class SystemHealthOut(BaseModel):
    status: Literal["healthy", "degraded"]
    ready: bool
    version: str
    database: Literal["up", "down"]
    redis: str
    config_version: int
    publish_pending: int
    modules_by_status: dict[str, int]


class RegistrationEventOut(Out):
    id: int
    at: datetime
    module_name: str
    event: str
    instance_id: str
    details: dict[str, Any]


class ConflictOut(BaseModel):
    component: str
    route: str
    route_id: int
    module: str
    conflicts_with: str
    conflicts_with_id: int
    conflicts_with_module: str
    reason: str


class AuditOut(Out):
    id: int
    at: datetime
    actor: str
    action: str
    resource_type: str
    resource_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    config_version: int | None


# ---------------------------------------------------------------- lists
class ListQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    limit: int = Field(default=100, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=MAX_ID)


class ModuleQuery(ListQuery):
    type: ModuleType | None = None
    enabled: bool | None = None
    status: ModuleStatus | None = None
    name: str | None = Field(default=None, max_length=MAX_NAME)


class RouteQuery(ListQuery):
    enabled: bool | None = None
    name: str | None = Field(default=None, max_length=MAX_NAME)


class DeploymentQuery(ListQuery):
    status: DeploymentStatus | None = None


class ServiceQuery(ListQuery):
    enabled: bool | None = None
    protocol: ServiceProtocol | None = None
    name: str | None = Field(default=None, max_length=MAX_NAME)


class AuditQuery(ListQuery):
    resource_type: str | None = Field(default=None, max_length=64)
    actor: str | None = Field(default=None, max_length=MAX_NAME)


class HistoryQuery(ListQuery):
    module: str | None = Field(default=None, max_length=MAX_NAME)


class StatePollQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    after: int = Field(default=0, ge=0, le=2**62)
    timeout: float | None = Field(default=None, ge=0, le=600)


class Page(BaseModel):
    total: int
    limit: int
    offset: int


class ModulePage(Page):
    items: list[ModuleOut]


class RoutePage(Page):
    items: list[RouteOut]


class DeploymentPage(Page):
    items: list[DeploymentOut]


class ServicePage(Page):
    items: list[ServiceOut]


class UserPage(Page):
    items: list[UserOut]


class ListenerPage(Page):
    items: list[ListenerOut]


class RateLimitPage(Page):
    items: list[RateLimitOut]


class AuditPage(Page):
    items: list[AuditOut]


class HistoryPage(Page):
    items: list[RegistrationEventOut]


class FeatureFlagPage(Page):
    items: list[FeatureFlagOut]


class ConflictsOut(BaseModel):
    conflicts: list[ConflictOut]
    checked_routes: int
