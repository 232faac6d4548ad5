"""The AILB module config (``modules[i].config`` of the desired-state snapshot), validated whole."""

from __future__ import annotations

import hashlib
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ProviderName = Literal["openai", "anthropic", "ollama"]
Strategy = Literal["round_robin", "weighted", "least_busy", "lowest_latency", "cost"]

#: Anthropic prices a 5-minute prompt-cache write at 1.25 x the input price
CACHE_WRITE_FACTOR = 1.25
#: per-deployment upper bounds, named so nobody configures a 10-hour timeout by accident
MAX_TIMEOUT_S = 3600.0
MAX_RETRIES = 10


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Price(_Frozen):
    """USD per million tokens, as providers publish them."""

    input: float = Field(default=0.0, ge=0)
    output: float = Field(default=0.0, ge=0)
    #: price of prompt tokens served from the provider's prompt cache (defaults to ``input``)
    cached_input: float | None = Field(default=None, ge=0)
    #: price of prompt tokens written to the provider's prompt cache (Anthropic's
    #: ``cache_creation_input_tokens``); defaults to 1.25 x ``input``, Anthropic's price for
    #: its default 5-minute cache (set it for the 1-hour cache, 2 x input)
    cache_write_input: float | None = Field(default=None, ge=0)

    @property
    def cache_write(self) -> float:
        if self.cache_write_input is None:
            return self.input * CACHE_WRITE_FACTOR
        return self.cache_write_input


class Deployment(_Frozen):
    model_name: str = Field(min_length=1)
    provider: ProviderName = "openai"
    base_url: str = Field(min_length=1)
    api_key: str = ""
    model: str = ""
    weight: float = Field(default=1.0, gt=0)
    timeout: float = Field(default=60.0, gt=0, le=MAX_TIMEOUT_S)
    max_retries: int = Field(default=0, ge=0, le=MAX_RETRIES)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    price: Price = Price()
    id: str = ""

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return v.rstrip("/")

    @property
    def resolved_api_key(self) -> str:
        if self.api_key.startswith("env:"):
            return os.environ.get(self.api_key[4:], "")
        return self.api_key


class RouterSettings(_Frozen):
    strategy: Strategy = "round_robin"
    #: model group -> ordered groups tried when every deployment of it failed
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    default_fallbacks: list[str] = Field(default_factory=list)
    #: consecutive failures before a deployment is cooled down
    allowed_fails: int = Field(default=3, ge=1, le=1000)
    cooldown_seconds: float = Field(default=30.0, ge=0, le=3600)
    retry_backoff_seconds: float = Field(default=0.05, ge=0, le=30)
    #: EWMA smoothing factor of the lowest-latency strategy
    latency_alpha: float = Field(default=0.3, gt=0, le=1)


class VirtualKey(_Frozen):
    """A virtual key, stored hashed: ``key_hash`` is sha256 hex of the key (``key`` is hashed on
    load and never kept)."""

    key_hash: str = ""
    key: str = ""
    name: str = ""
    team: str = ""
    user: str = ""
    models: list[str] = Field(default_factory=list)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    #: USD; spend is persisted, so the budget holds across restarts and replicas
    budget: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_key(self) -> VirtualKey:
        if not self.key_hash and not self.key:
            raise ValueError("a key needs key_hash (sha256 hex) or key")
        if self.key_hash and (
            len(self.key_hash) != 64 or any(c not in "0123456789abcdef" for c in self.key_hash)
        ):
            raise ValueError("key_hash must be 64 lowercase hex characters (sha256)")
        return self

    @property
    def digest(self) -> str:
        return self.key_hash or hash_key(self.key)

    @property
    def key_id(self) -> str:
        return self.name or self.digest[:16]


CacheScope = Literal["key", "team", "shared"]


class CacheSettings(_Frozen):
    enabled: bool = False
    #: who shares entries: each key alone, the keys of one team (a key without a team is
    #: alone), or everyone (an answer may then reach another tenant)
    scope: CacheScope = "team"
    #: also cache requests whose answers are sampled (temperature absent or > 0, n > 1,
    #: best_of > 1), replaying one sample to every later identical request
    cache_sampled: bool = False
    ttl_seconds: int = Field(default=300, ge=1, le=7 * 86400)
    #: entries kept in process when no Redis is configured
    max_entries: int = Field(default=1024, ge=1, le=1_000_000)
    #: total bytes of the answers kept in process (the oldest go first)
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=1 << 40)
    #: answers larger than this are not cached at all (in process or in Redis)
    max_entry_bytes: int = Field(default=1024 * 1024, ge=1, le=512 * 1024 * 1024)


class BudgetSettings(_Frozen):
    #: completion tokens held against a budget when a request sets no max_tokens
    default_max_tokens: int = Field(default=4096, ge=1, le=10_000_000)


class AilbConfig(_Frozen):
    model_list: list[Deployment] = Field(default_factory=list)
    #: alias or glob pattern ("gpt-4*") -> model group name
    model_aliases: dict[str, str] = Field(default_factory=dict)
    router_settings: RouterSettings = RouterSettings()
    keys: list[VirtualKey] = Field(default_factory=list)
    #: None: keys are required exactly when some are configured
    require_key: bool | None = None
    cache: CacheSettings = CacheSettings()
    budgets: BudgetSettings = BudgetSettings()

    @model_validator(mode="after")
    def _consistent(self) -> AilbConfig:
        groups = {d.model_name for d in self.model_list}
        for src, chain in self.router_settings.fallbacks.items():
            for dst in chain:
                if dst not in groups:
                    raise ValueError(f"fallback {src} -> {dst}: no deployment has model_name {dst}")
        for dst in self.router_settings.default_fallbacks:
            if dst not in groups:
                raise ValueError(f"default fallback {dst}: no deployment has model_name {dst}")
        for alias, target in self.model_aliases.items():
            if target not in groups:
                raise ValueError(f"alias {alias} -> {target}: no deployment has that model_name")
        digests = [k.digest for k in self.keys]
        if len(set(digests)) != len(digests):
            raise ValueError("duplicate virtual key")
        return self

    @property
    def keys_required(self) -> bool:
        return bool(self.keys) if self.require_key is None else self.require_key


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
