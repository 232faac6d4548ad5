"""DBLB settings (environment, static) and module config (desired state, dynamic)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import SettingsConfigDict

from marchproxy_common.config import ModuleSettings
from marchproxy_common.wire.postgres.messages import DEFAULT_MAX_MESSAGE

PoolMode = Literal["session", "transaction"]
AuthType = Literal["trust", "cleartext", "md5", "scram-sha-256", "passthrough"]
DEFAULT_MODULE_ID = "dblb"
#: PgBouncer's default auth_query (reading pg_authid needs a superuser, or a SECURITY DEFINER
#: function in its place)
DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
    "FROM pg_authid WHERE rolname = $1 AND rolcanlogin"
)
ADMIN_DATABASES = frozenset({"pgbouncer", "marchproxy"})


class DblbSettings(ModuleSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    #: Second listener for MySQL clients (0 = any free port; -1 = disabled).
    mysql_port: int = Field(default=-1, ge=-1, le=65535)
    #: Processes serving the Postgres port (SO_REUSEPORT; pool limits are split among them).
    workers: int = Field(default=1, ge=1, le=8)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReplicaConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=5432, ge=1, le=65535)
    dbname: str | None = None  # default: the primary's dbname


class DatabaseConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=5432, ge=1, le=65535)
    dbname: str | None = None  # default: the alias itself
    user: str | None = None  # force this server user (default: the client's user)
    password: str | None = None  # password for the server user
    pool_mode: PoolMode | None = None
    pool_size: int | None = Field(default=None, ge=1, le=10_000)
    min_pool_size: int | None = Field(default=None, ge=0, le=10_000)
    #: read replicas for opt-in read/write split (transaction mode): a transaction goes to a
    #: replica when it starts with BEGIN/START TRANSACTION READ ONLY or carries the routing
    #: comment ``/* marchproxy:replica */``
    replicas: list[ReplicaConfig] = Field(default_factory=list)


class UserConfig(_Strict):
    #: plain text, an 'md5…' hash or a 'SCRAM-SHA-256$…' verifier
    password: str = ""
    pool_mode: PoolMode | None = None


class MysqlConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=3306, ge=1, le=65535)
    pool_size: int = Field(default=20, ge=1, le=10_000)
    #: user -> password used for the server login (clients authenticate with the same)
    users: dict[str, str] = Field(default_factory=dict)


class DblbConfig(_Strict):
    auth_type: AuthType = "trust"
    pool_mode: PoolMode = "transaction"
    default_pool_size: int = Field(default=20, ge=1, le=10_000)
    min_pool_size: int = Field(default=0, ge=0, le=10_000)
    max_client_conn: int = Field(default=1000, ge=1, le=1_000_000)
    #: pools (database, user) at most; at the cap the longest-empty pool is evicted for a
    #: new one, and with none empty the client is refused (53300)
    max_pools: int = Field(default=1000, ge=1, le=1_000_000)
    #: seconds a pool with no clients and no busy servers is kept (PgBouncer's
    #: autodb_idle_timeout); pools that keep min_pool_size servers are kept
    pool_idle_timeout: float = Field(default=600.0, gt=0)
    #: seconds a client waits for a server before it gets an error (PgBouncer query_wait_timeout)
    query_wait_timeout: float = Field(default=120.0, gt=0)
    server_connect_timeout: float = Field(default=15.0, gt=0)
    server_idle_timeout: float = Field(default=600.0, gt=0)
    server_lifetime: float = Field(default=3600.0, gt=0)
    server_reset_query: str = "DISCARD ALL"
    #: auth_query (as PgBouncer): a client user not in ``users`` is authenticated against the
    #: secret (md5 hash or SCRAM verifier) that ``auth_query`` returns for it ($1 = user name;
    #: second column = secret), run as ``auth_user`` (its password from ``users``) in the
    #: client's database. The pool then logs in with that md5 hash, or with the SCRAM keys
    #: recovered from the client's proof. Secrets are cached for ``auth_cache_ttl``.
    auth_user: str = ""
    auth_query: str = DEFAULT_AUTH_QUERY
    #: passthrough auth: seconds a password the server accepted is trusted without asking
    #: the server again (0: ask every time); forgotten at once when a server login of the
    #: pool fails authentication (the password changed). The same for auth_query secrets.
    auth_cache_ttl: float = Field(default=300.0, ge=0)
    max_packet_size: int = Field(default=DEFAULT_MAX_MESSAGE, ge=1024)
    #: TLS to clients: certificate and key files (PEM); ``client_tls_mode`` says whether a
    #: client must use it (``require``) or may (``allow``); ``disable`` answers SSLRequest 'N'.
    client_tls_mode: Literal["disable", "allow", "require"] = "disable"
    client_tls_cert: str = ""
    client_tls_key: str = ""
    #: TLS to servers: ``prefer`` tries SSLRequest and falls back to clear, ``require`` fails
    #: without TLS. Certificates are verified only when ``server_tls_ca`` names a CA file.
    server_tls_mode: Literal["disable", "prefer", "require"] = "disable"
    server_tls_ca: str = ""
    #: admin console: ``admin_users`` may run every command (PAUSE, RESUME, RELOAD, SHOW);
    #: ``stats_users`` only SHOW. When either list is set, users in neither are refused; when
    #: both are empty, any user that authenticates gets SHOW only.
    admin_users: list[str] = Field(default_factory=list)
    stats_users: list[str] = Field(default_factory=list)
    databases: dict[str, DatabaseConfig] = Field(default_factory=dict)
    users: dict[str, UserConfig] = Field(default_factory=dict)
    mysql: MysqlConfig | None = None

    @model_validator(mode="after")
    def _tls_files(self) -> DblbConfig:
        if self.client_tls_mode != "disable" and not (self.client_tls_cert and self.client_tls_key):
            raise ValueError("client_tls_cert and client_tls_key are required for client TLS")
        return self

    def database(self, alias: str) -> tuple[DatabaseConfig, str] | None:
        """Resolve a client's database name to (config, server dbname)."""
        db = self.databases.get(alias) or self.databases.get("*")
        if db is None:
            return None
        return db, db.dbname or alias

    def pool_mode_for(self, db: DatabaseConfig, user: str) -> PoolMode:
        u = self.users.get(user)
        return (u.pool_mode if u and u.pool_mode else None) or db.pool_mode or self.pool_mode


def module_config_from_snapshot(
    snapshot: Mapping[str, Any], module_id: str
) -> tuple[DblbConfig | None, list[str]]:
    """Find our module entry (``name == module_id``) and validate its ``config``."""
    modules = snapshot.get("modules")
    if modules is None:
        raw: Any = snapshot.get("config", {})
    else:
        if not isinstance(modules, list):
            return None, ["modules must be a list"]
        entries = [m for m in modules if isinstance(m, Mapping) and m.get("name") == module_id]
        raw = entries[0].get("config", {}) if entries else {}
    if not isinstance(raw, Mapping):
        return None, ["module config must be an object"]
    try:
        return DblbConfig.model_validate(raw), []
    except ValidationError as exc:
        return None, [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
