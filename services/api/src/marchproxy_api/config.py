"""API settings: read once from the environment, frozen, passed down explicitly."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from marchproxy_common.config import CommonSettings

DEFAULT_SQLITE_PATH = "marchproxy-api.sqlite3"


class ApiSettings(CommonSettings):
    api_host: str = "0.0.0.0"
    api_port: int = Field(default=8000, ge=0, le=65535)
    marchproxy_admin_password: str = ""
    marchproxy_admin_username: str = "admin"
    access_token_minutes: float = Field(default=15.0, gt=0, le=24 * 60)
    refresh_token_days: float = Field(default=7.0, gt=0, le=365)
    state_prefix: str = "marchproxy"
    #: seconds between checks that Redis still holds every snapshot (republished if not)
    state_check_interval: float = Field(default=1.0, gt=0, le=3600)
    sqlite_path: str = DEFAULT_SQLITE_PATH
    run_migrations: bool = True
    #: longest pause between start-up attempts while the database is unreachable (seconds)
    start_retry_max: float = Field(default=5.0, gt=0, le=300)
    #: long-poll bounds (seconds)
    state_poll_default: float = Field(default=30.0, gt=0, le=300)
    state_poll_max: float = Field(default=60.0, gt=0, le=600)
    #: incremental promote: weights walked and seconds between steps
    promote_steps: tuple[float, ...] = (10.0, 25.0, 50.0, 100.0)
    promote_step_seconds: float = Field(default=2.0, ge=0, le=3600)
    #: an incremental promote request waits this long for its rollout, then answers 202 and
    #: the rollout goes on in the background
    promote_wait_seconds: float = Field(default=10.0, ge=0, le=600)
    #: promote/rollback wait this long for another one of the same module, then answer 409
    module_lock_wait: float = Field(default=5.0, ge=0, le=600)
    grpc_timeout: float = Field(default=3.0, gt=0, le=60)
    #: pooled gRPC channels to modules; the least recently used is closed beyond this
    grpc_max_channels: int = Field(default=1024, ge=1, le=100_000)
    #: failed logins allowed per (username, client) per window
    login_max_failures: int = Field(default=5, ge=1, le=1000)
    login_window_seconds: float = Field(default=60.0, gt=0, le=3600)
    #: failed logins allowed per client address over all usernames per window
    login_max_failures_per_client: int = Field(default=50, ge=1, le=100_000)
    #: failure counters kept; beyond this the least recently failed are evicted
    login_max_keys: int = Field(default=100_000, ge=2, le=10_000_000)
    #: argon2 runs in a pool of this many threads; more than password_hash_queue hashes
    #: running or waiting at once are refused with 503
    password_hash_threads: int = Field(default=2, ge=1, le=64)
    password_hash_queue: int = Field(default=64, ge=1, le=100_000)

    @classmethod
    def required_in_production(cls) -> tuple[str, ...]:
        return ("CLUSTER_API_KEY", "SECRET_KEY", "DATABASE_URL")

    @property
    def sqlalchemy_url(self) -> str:
        """DATABASE_URL mapped to an async driver; unset → a local SQLite file (embedded mode)."""
        url = self.database_url.strip()
        if not url:
            return f"sqlite+aiosqlite:///{Path(self.sqlite_path).absolute()}"
        for prefix in ("postgresql://", "postgres://", "postgresql+psycopg2://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        if url.startswith("sqlite://"):
            return "sqlite+aiosqlite://" + url[len("sqlite://") :]
        return url
