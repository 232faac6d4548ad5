"""NLB static settings, read once from the environment (DESIGN.md section 2, Configuration)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from marchproxy_common.config import CommonSettings


class NlbSettings(CommonSettings):
    nlb_grpc_host: str = "127.0.0.1"
    nlb_grpc_port: int = Field(default=50051, ge=0, le=65535)
    nlb_admin_host: str = "127.0.0.1"
    nlb_admin_port: int = Field(default=8082, ge=0, le=65535)
    nlb_version: str = "0.1.0"
    #: how often the registry looks for instances whose heartbeats stopped
    nlb_expiry_interval: float = Field(default=0.5, gt=0, le=60)
    #: largest accepted RPC message (bytes); larger requests get RESOURCE_EXHAUSTED
    nlb_max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    #: data-plane listeners, e.g. "7000=http,tls,postgresql,rtmp;3307=mysql;5353/udp=udp"
    nlb_listeners: str = ""
    #: address the data-plane listeners bind
    nlb_data_host: str = "127.0.0.1"
    #: how long a new connection may take to show its first bytes before the listener's default
    #: protocol is used (server-speaks-first protocols such as MySQL send nothing)
    nlb_sniff_timeout: float = Field(default=0.1, gt=0, le=30)
    nlb_connect_timeout: float = Field(default=5.0, gt=0, le=120)
    #: instances tried for one connection before it is refused (connect failures only)
    nlb_connect_attempts: int = Field(default=3, ge=1, le=20)
    #: hand connections to co-located module instances that advertise a hand-over socket
    #: (label ``handoff_path``) instead of relaying them (the NLB leaves the data path)
    nlb_module_handoff: bool = True
    #: close a relayed connection after this long without bytes either way (0: never)
    nlb_idle_timeout: float = Field(default=3600.0, ge=0)
    nlb_udp_idle_timeout: float = Field(default=60.0, gt=0)
    #: least_conn | round_robin | hash (consistent hash on the client IP)
    nlb_balance: str = "least_conn"
    #: a new version whose failure ratio exceeds this is rolled back by itself
    nlb_rollback_error_rate: float = Field(default=0.5, gt=0, le=1)
    #: Unix socket for hitless restarts: a new NLB takes the listening sockets from the old one
    nlb_handoff_path: str = ""
    #: Redis key prefix of cluster-wide rate-limit buckets (NLB replicas sharing it share budgets)
    nlb_ratelimit_prefix: str = "marchproxy:nlb:rl:"
    #: per-client-IP buckets kept in memory (oldest dropped first); listener, protocol, route
    #: and global buckets are kept apart and never dropped for them
    nlb_ratelimit_max_client_buckets: int = Field(default=100_000, ge=1, le=10_000_000)
    #: scaling executor: "" (none), process, docker, kubernetes
    nlb_scaler: Literal["", "process", "docker", "kubernetes"] = ""
    nlb_autoscale_interval: float = Field(default=5.0, gt=0, le=3600)
    #: NLB_ADDR given to modules the process/docker scaler starts (default: our gRPC port on
    #: loopback, right for processes; containers need e.g. "nlb:50051")
    nlb_scaler_nlb_addr: str = ""
    #: process executor: module -> command, e.g. {"alb": ["marchproxy-alb"]} (JSON)
    nlb_scaler_commands: dict[str, list[str]] = Field(default_factory=dict)
    #: docker executor: engine URL, module -> image (JSON), network for new containers
    nlb_docker_url: str = "unix:///var/run/docker.sock"
    nlb_docker_images: dict[str, str] = Field(default_factory=dict)
    nlb_docker_network: str = ""
    #: kubernetes executor: API server, namespace (default: the pod's), module -> Deployment
    nlb_k8s_api: str = "https://kubernetes.default.svc"
    nlb_k8s_namespace: str = ""
    nlb_k8s_deployments: dict[str, str] = Field(default_factory=dict)
    #: the most module instances the registry accepts
    nlb_max_instances: int = Field(default=10_000, ge=1)
    #: run from a static desired-state file (YAML/JSON) instead of Redis/API
    config_file: str = ""

    def local_grpc_target(self, port: int) -> str:
        """How a process on this host reaches our gRPC server on ``port`` (a wildcard bind
        is reached on loopback); ``host:port``, IPv6 in brackets."""
        host = self.nlb_grpc_host.strip("[]")
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
