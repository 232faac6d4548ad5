"""RTMP settings (environment, static) and module config (desired state, dynamic)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from marchproxy_common.config import ModuleSettings

DEFAULT_OUT_CHUNK_SIZE = 4096  # what we announce to players (nginx-rtmp's default too)


class RtmpSettings(ModuleSettings):
    """Environment: the ModuleSettings variables plus RTMP_* defaults for the module config."""

    rtmp_handshake_timeout: float = Field(default=10.0, gt=0, le=300)
    #: HTTP port serving HLS (/hls/<app>/<stream>.m3u8); -1 disables it, 0 picks a free port
    rtmp_hls_host: str = "127.0.0.1"
    rtmp_hls_port: int = Field(default=-1, ge=-1, le=65535)


def _check_rtmp_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "rtmp" or not parts.hostname:
        raise ValueError(f"not an rtmp:// URL: {url!r}")
    if len([p for p in parts.path.split("/") if p]) < 1:
        raise ValueError(f"RTMP URL needs an application: {url!r}")
    return url


class PublishKey(BaseModel):
    """A publish key and the stream name(s) it may publish (like an nginx-rtmp ``on_publish``
    check or SRS's per-stream secret): ``live/<name>?key=<key>``, name matching ``stream``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = Field(min_length=1, max_length=256)
    #: an exact stream name, or a glob (``studio-*``; ``*`` = any name)
    stream: str = Field(min_length=1, max_length=256)

    @property
    def exact(self) -> bool:
        return not any(c in self.stream for c in "*?[")

    def allows(self, name: str) -> bool:
        return self.stream == name if self.exact else fnmatch.fnmatchcase(name, self.stream)


class ApplicationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._~-]+$")
    #: who may publish: ``{key, stream}`` pairs. Publish ``<stream>?key=<key>``; a key bound to
    #: one exact name may also be sent as the stream name itself (OBS "stream key"), and the
    #: stream is then published under the bound name. Players play the name, never the key.
    publish_keys: tuple[PublishKey, ...] = ()
    #: allow publishing without a key (development)
    publish_open: bool = False
    #: nginx-rtmp style callback: POST form (call=publish, app, name, key, addr); 2xx allows
    on_publish: str = ""
    #: allow playing (players need no key)
    play: bool = True
    #: push every stream published here to these rtmp://host[:port]/app URLs (stream name kept)
    push: tuple[str, ...] = ()
    #: pull a stream nobody publishes here from this origin (rtmp://host[:port]/app) on demand
    pull: str = ""
    gop_cache: bool = True
    max_players: int = Field(default=0, ge=0)
    #: HLS output (MPEG-TS segments + m3u8) on the HLS HTTP port (RTMP_HLS_PORT)
    hls: bool = False
    hls_fragment: float = Field(default=2.0, ge=0.5, le=30)
    hls_playlist_length: int = Field(default=6, ge=2, le=100)

    @field_validator("publish_keys", mode="before")
    @classmethod
    def _no_bare_keys(cls, v: Any) -> Any:
        if isinstance(v, list | tuple) and any(isinstance(k, str) for k in v):
            raise ValueError(
                "entries are {key, stream} objects now: a bare key was also the stream's play "
                "name, so every player learned it (publish <stream>?key=<key> instead)"
            )
        return v

    @field_validator("push")
    @classmethod
    def _push_urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_rtmp_url(u) for u in v)

    @field_validator("pull")
    @classmethod
    def _pull_url(cls, v: str) -> str:
        return _check_rtmp_url(v) if v else v

    @field_validator("on_publish")
    @classmethod
    def _callback(cls, v: str) -> str:
        if v and urlsplit(v).scheme not in ("http", "https"):
            raise ValueError("on_publish must be an http(s) URL")
        return v


class RtmpConfig(BaseModel):
    """``modules[i].config`` of the RTMP module entry (see services/rtmp/README.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    applications: tuple[ApplicationConfig, ...] = ()
    chunk_size: int = Field(default=DEFAULT_OUT_CHUNK_SIZE, ge=128, le=65536)
    #: a player's queued bytes above this make it skip to the next keyframe
    player_buffer_bytes: int = Field(default=1 << 20, ge=16 * 1024, le=256 << 20)
    #: a player over the buffer cap for this long is disconnected
    slow_player_timeout: float = Field(default=10.0, gt=0, le=600)
    max_connections: int = Field(default=10_000, ge=1)
    #: a publisher that sends no media for this long is disconnected (nginx drop_idle_publisher)
    publisher_idle_timeout: float = Field(default=30.0, gt=0, le=3600)
    #: media is collected this long and written to each player in one send (0 = next loop tick)
    flush_interval_ms: int = Field(default=40, ge=0, le=500)

    @field_validator("applications")
    @classmethod
    def _unique(cls, v: tuple[ApplicationConfig, ...]) -> tuple[ApplicationConfig, ...]:
        names = [a.name for a in v]
        if len(names) != len(set(names)):
            raise ValueError("application names must be unique")
        return v

    def app(self, name: str) -> ApplicationConfig | None:
        for a in self.applications:
            if a.name == name:
                return a
        return None


def config_from_snapshot(
    snapshot: Mapping[str, Any], module_id: str
) -> tuple[RtmpConfig | None, list[str]]:
    """Find our module entry (``name == module_id``) and validate its ``config``."""
    modules = snapshot.get("modules")
    if modules is None:
        return RtmpConfig(), []
    if not isinstance(modules, list):
        return None, ["modules must be a list"]
    entry = next((m for m in modules if isinstance(m, dict) and m.get("name") == module_id), None)
    if entry is None:
        return RtmpConfig(), []
    if entry.get("enabled") is False:
        return RtmpConfig(), []
    raw = entry.get("config") or {}
    try:
        return RtmpConfig.model_validate(raw), []
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            errors.append(f"modules[{module_id}].config.{loc}: {err['msg']}")
        return None, errors
