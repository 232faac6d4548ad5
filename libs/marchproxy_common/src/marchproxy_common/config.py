"""Typed settings read once from the environment (pydantic-settings) and passed down explicitly.

Variable names are the ones DESIGN.md lists (DATABASE_URL, REDIS_URL, SECRET_KEY, CLUSTER_API_KEY,
NLB_ADDR, LOG_LEVEL, LOG_FORMAT, ...). In production (MARCHPROXY_ENV=production) a missing secret
stops start-up with one line naming the variable.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import uuid
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_CLUSTER_API_KEY = "marchproxy-dev-cluster-key"
DEV_SECRET_KEY = "marchproxy-dev-secret-key-change-me"

S = TypeVar("S", bound="CommonSettings")

#: peers allowed to send a PROXY header by default: an NLB on the same host
DEFAULT_PROXY_TRUSTED_SOURCES = "127.0.0.0/8,::1"


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    marchproxy_env: Literal["development", "production"] = "development"
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"
    cluster_api_key: str = ""
    secret_key: str = ""
    redis_url: str = ""
    database_url: str = ""
    api_url: str = ""
    nlb_addr: str = "127.0.0.1:50051"
    heartbeat_interval: float = Field(default=5.0, gt=0, le=300)
    heartbeat_timeout: float = Field(default=10.0, ge=1.0, le=3600)
    drain_timeout: float = Field(default=30.0, ge=0, le=3600)
    grpc_tls_cert: str = ""
    grpc_tls_key: str = ""
    grpc_tls_ca: str = ""

    @field_validator("api_url")
    @classmethod
    def _check_api_url(cls, v: str) -> str:
        if v and (urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).hostname):
            raise ValueError(f"API_URL must be an http:// or https:// URL, not {v!r}")
        return v

    @property
    def production(self) -> bool:
        return self.marchproxy_env == "production"

    @property
    def effective_cluster_api_key(self) -> str:
        return self.cluster_api_key or DEV_CLUSTER_API_KEY

    @property
    def effective_secret_key(self) -> str:
        return self.secret_key or DEV_SECRET_KEY

    @model_validator(mode="after")
    def _production_secrets(self) -> CommonSettings:
        if self.production:
            for var in self.required_in_production():
                if not getattr(self, var.lower()):
                    raise ValueError(f"{var} must be set when MARCHPROXY_ENV=production")
        return self

    @classmethod
    def required_in_production(cls) -> tuple[str, ...]:
        return ("CLUSTER_API_KEY",)


class ModuleSettings(CommonSettings):
    """Settings every module (ALB, DBLB, AILB, RTMP, external) shares."""

    module_id: str = ""
    instance_id: str = ""
    module_version: str = "0.1.0"
    data_host: str = "127.0.0.1"
    data_port: int = Field(default=0, ge=0, le=65535)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=0, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=0, ge=0, le=65535)
    advertise_host: str = ""
    module_weight: int = Field(default=100, ge=0, le=10_000)
    module_capacity: int = Field(default=0, ge=0)
    config_file: str = ""
    register_with_nlb: bool = True
    proxy_protocol: Literal["off", "optional", "required"] = "optional"
    #: comma-separated CIDRs allowed to send a PROXY header (the NLB's addresses); "*" trusts
    #: every peer, "" nobody. Anyone else's header is not parsed, so a client that connects
    #: directly cannot claim another address.
    proxy_trusted_sources: str = DEFAULT_PROXY_TRUSTED_SOURCES
    #: a Unix socket path on which a co-located NLB may hand client connections over
    #: (SCM_RIGHTS) instead of relaying them; "" (the default) for none. Modules that do not
    #: support it say so at start-up and keep being relayed.
    handoff_path: str = ""

    @field_validator("proxy_trusted_sources")
    @classmethod
    def _check_cidrs(cls, v: str) -> str:
        if v.strip() != "*":
            for cidr in _split_cidrs(v):
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    raise ValueError(f"not a CIDR: {cidr!r}") from None
        return v

    def proxy_trusted_networks(self) -> tuple[str, ...] | None:
        """The trusted CIDRs, normalized; None = every peer."""
        v = self.proxy_trusted_sources.strip()
        if v == "*":
            return None
        return tuple(str(ipaddress.ip_network(c, strict=False)) for c in _split_cidrs(v))

    def resolved_instance_id(self, module_id: str) -> str:
        if self.instance_id:
            return self.instance_id
        return f"{module_id}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _split_cidrs(v: str) -> list[str]:
    return [c.strip() for c in v.split(",") if c.strip()]


def load_settings(cls: type[S], **overrides: object) -> S:
    """Build settings or exit with one clear line naming the bad variable."""
    try:
        return cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]).upper()
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}" if loc else msg)
        print(f"configuration error: {'; '.join(lines)}", file=sys.stderr)
        raise SystemExit(2) from None
