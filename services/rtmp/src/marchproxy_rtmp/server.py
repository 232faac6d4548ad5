"""The RTMP data plane: listener, applications, publish authentication, streams, relays."""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from marchproxy_common.http1 import HttpServer, Request, Response
from marchproxy_common.http1_client import call
from marchproxy_common.module.hooks import BoundAddress
from marchproxy_common.net.listener import stop_serving
from marchproxy_common.net.proxied import wrap_proxy_protocol
from marchproxy_common.tasks import cancel_and_wait, spawn
from marchproxy_rtmp.config import ApplicationConfig, RtmpConfig, RtmpSettings
from marchproxy_rtmp.hls import HlsMuxer
from marchproxy_rtmp.ingest import RtmpConnection
from marchproxy_rtmp.relay import PullRelay, PushRelay
from marchproxy_rtmp.streams import DeliveryCounters, Player, PublisherInfo, Stream, StreamRegistry

_log = structlog.get_logger("marchproxy.rtmp")

ON_PUBLISH_TIMEOUT = 5.0  # seconds an on_publish callback may take before we refuse
DRAIN_GOODBYE_TIMEOUT = 2.0  # seconds connections get to flush their goodbye before abort
IDLE_SWEEP_INTERVAL = 5.0  # how often idle publishers are looked for (at most)


@dataclass(slots=True)
class ServerCounters:
    connections_total: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    protocol_errors: int = 0
    digest_handshakes: int = 0
    idle_publishers_dropped: int = 0
    proxy_rejected: int = 0
    rejected_connects: int = 0
    publish_total: int = 0
    publish_rejected: int = 0
    plays_total: int = 0
    relay_push_started: int = 0
    relay_push_failed: int = 0
    relay_pull_started: int = 0
    relay_pull_failed: int = 0
    delivery: DeliveryCounters = field(default_factory=DeliveryCounters)


class RtmpServer:
    def __init__(self, settings: RtmpSettings, config: RtmpConfig | None = None) -> None:
        self.settings = settings
        self.config = config or RtmpConfig()
        self.registry = StreamRegistry()
        self.connections: set[RtmpConnection] = set()
        self.counters = ServerCounters()
        self.clock = time.monotonic
        self.started_at = time.monotonic()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.pushes: dict[tuple[str, str], list[PushRelay]] = {}
        self.pulls: dict[tuple[str, str], PullRelay] = {}
        self.idle = asyncio.Event()
        self.idle.set()
        self.hls: dict[tuple[str, str], HlsMuxer] = {}
        self._hls_evictions: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._hls_server: HttpServer | None = None
        self._hls_listener: asyncio.AbstractServer | None = None
        self.hls_port = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> BoundAddress:
        loop = asyncio.get_running_loop()
        factory = wrap_proxy_protocol(
            lambda: RtmpConnection(self),
            mode=self.settings.proxy_protocol,
            on_reject=self._proxy_rejected,
            trusted_sources=self.settings.proxy_trusted_networks(),
        )
        self._server = await loop.create_server(factory, host, port, backlog=1024)
        self._spawn(self._sweep(), name="rtmp idle publisher sweep")
        h, p = self._server.sockets[0].getsockname()[:2]
        _log.info(
            "rtmp_listening",
            address=f"{h}:{p}",
            proxy_protocol=self.settings.proxy_protocol,
            proxy_trusted_sources=self.settings.proxy_trusted_sources,
        )
        return BoundAddress(h, p)

    async def start_hls(self, host: str, port: int) -> int:
        self._hls_server = HttpServer(self._hls_file)
        self._hls_listener = await asyncio.get_running_loop().create_server(
            self._hls_server, host, port, reuse_address=True
        )
        self.hls_port = int(self._hls_listener.sockets[0].getsockname()[1])
        return self.hls_port

    async def _hls_file(self, request: Request) -> Response:
        """``GET /hls/<app>/<name>.m3u8`` (the playlist) and ``/hls/<app>/<name>-<seq>.ts``."""
        not_found = Response(b"Not Found", status=404)
        parts = request.path.split("/")
        if len(parts) != 4 or parts[1] != "hls" or not parts[2] or not parts[3]:
            return not_found
        if request.method not in ("GET", "HEAD"):
            return Response(b"Method Not Allowed", status=405, headers={"Allow": "GET, HEAD"})
        app, file = parts[2], parts[3]
        if file.endswith(".m3u8"):
            muxer = self.hls.get((app, file[: -len(".m3u8")]))
            if muxer is None:
                return not_found
            return Response(
                muxer.playlist().encode(),
                content_type="application/vnd.apple.mpegurl",
                headers={"Cache-Control": "no-cache"},
            )
        name, _, rest = file.rpartition("-")
        muxer = self.hls.get((app, name))
        seq = rest.removesuffix(".ts")
        data = muxer.segment(int(seq)) if muxer is not None and seq.isdigit() else None
        if data is None:
            return not_found
        return Response(data, content_type="video/mp2t")

    def apply(self, config: RtmpConfig) -> None:
        self.config = config
        for conn in list(self.connections):
            if conn.app and config.app(conn.app) is None:
                conn.abort()  # its application was removed

    async def stop_accepting(self) -> None:
        if self._server is not None:
            await stop_serving(self._server)

    async def drain(self, deadline: float) -> None:
        """Let streams run until ``deadline``, then end them the polite way (players get
        StreamEOF + UnpublishNotify, publishers a FIN) and close whatever is left."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(self.idle.wait(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            for stream in self.registry.publishing():
                self.stop_publish(stream)
            for conn in list(self.connections):
                conn.close_after_flush()
            try:
                await asyncio.wait_for(self.idle.wait(), DRAIN_GOODBYE_TIMEOUT)
            except TimeoutError:
                pass
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.abort()
        for relays in list(self.pushes.values()):
            for r in relays:
                r.stop()
        for pull in list(self.pulls.values()):
            pull.stop()
        await cancel_and_wait(*self._tasks)
        for handle in self._hls_evictions.values():
            handle.cancel()
        self._hls_evictions.clear()
        if self._hls_listener is not None:
            self._hls_listener.close()
            self._hls_listener = None
        if self._hls_server is not None:
            await self._hls_server.shutdown(1.0)
            self._hls_server = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _proxy_rejected(self, reason: str) -> None:
        self.counters.proxy_rejected += 1
        _log.info("rtmp_proxy_header_rejected", reason=reason)

    async def _sweep(self) -> None:
        """Disconnect publishers that stopped sending media (nginx-rtmp drop_idle_publisher)."""
        while True:
            timeout = self.config.publisher_idle_timeout
            await asyncio.sleep(min(IDLE_SWEEP_INTERVAL, timeout / 2))
            now = self.clock()
            for conn in list(self.connections):
                if conn.publishing and now - conn.last_media_at > timeout:
                    _log.info("rtmp_idle_publisher_dropped", peer=conn.peer, app=conn.app)
                    self.counters.idle_publishers_dropped += 1
                    conn.abort()

    def _spawn(self, coro: Any, name: str) -> None:
        task = spawn(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections ---------------------------------------------------------------------------

    def connection_opened(self, conn: RtmpConnection) -> None:
        self.counters.connections_total += 1
        if len(self.connections) >= self.config.max_connections:
            conn.abort()
            return
        self.connections.add(conn)
        self.idle.clear()

    def connection_closed(self, conn: RtmpConnection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self.idle.set()

    # -- publishing ----------------------------------------------------------------------------

    def authorize_publish(
        self, conn: RtmpConnection, stream_id: int, name: str, args: dict[str, str]
    ) -> None:
        app = self.config.app(conn.app)
        if app is None:
            conn.publish_authorized(stream_id, name, False, "no such application")
            return
        if app.on_publish:
            self._spawn(
                self._callback(app, conn, stream_id, name, args),
                name=f"rtmp on_publish {conn.client_id}",
            )
            return
        if app.publish_open:
            conn.publish_authorized(stream_id, name, True, "")
            return
        bound = publish_name_for_key(app, name, args)
        if bound is None:
            conn.publish_authorized(stream_id, name, False, "bad stream key")
        else:
            conn.publish_authorized(stream_id, bound, True, "")

    async def _callback(
        self,
        app: ApplicationConfig,
        conn: RtmpConnection,
        stream_id: int,
        name: str,
        args: dict[str, str],
    ) -> None:
        form = {
            **args,
            "call": "publish",
            "app": app.name,
            "name": name,
            "addr": conn.peer.rpartition(":")[0],
            "clientid": str(conn.client_id),
            "tcurl": conn.tc_url,
        }
        allowed = False
        reason = "on_publish refused"
        try:
            # nginx-rtmp's contract: a form POST, any 2xx allows, redirects are not followed
            resp = await call("POST", app.on_publish, form=form, total_s=ON_PUBLISH_TIMEOUT)
            allowed = 200 <= resp.status < 300
            reason = f"on_publish answered {resp.status}"
        except (OSError, TimeoutError, ValueError) as exc:
            reason = f"on_publish failed: {type(exc).__name__}"
            _log.warning("rtmp_on_publish_failed", url=app.on_publish, error=str(exc))
        conn.publish_authorized(stream_id, name, allowed, reason)

    def start_publish(self, app: str, name: str, pub: PublisherInfo) -> Stream | None:
        cfg = self.config.app(app)
        stream = self.registry.get_or_create(
            app,
            name,
            gop_cache=cfg.gop_cache if cfg else True,
            flush_interval=self.config.flush_interval_ms / 1000,
        )
        takeover = False
        if stream.publisher is not None:
            # an on-demand pull yields to a real publisher; its players stay and get the new one
            pull = self.pulls.get((app, name))
            if pull is None or stream.publisher.client_id != pull.client_id:
                return None
            pull.stop()
            for relay in self.pushes.pop((app, name), []):
                relay.stop()
            if stream.hls is not None:
                self._evict_hls_later((app, name), stream.hls)
            for ended in stream.stop(keep_players=True):
                ended.owner.stream_ended(ended)
            takeover = True
        if cfg is not None:
            stream.gop_cache_enabled = cfg.gop_cache
        stream.flush_interval = self.config.flush_interval_ms / 1000
        stream.start(pub, self.clock())
        if takeover:
            for player in list(stream.players):
                player.owner.stream_restarted(player)
        if cfg is not None and cfg.hls:
            stream.hls = HlsMuxer(
                name, fragment=cfg.hls_fragment, playlist_length=cfg.hls_playlist_length
            )
            self.hls[(app, name)] = stream.hls
        self.counters.publish_total += 1
        for url in cfg.push if cfg else ():
            relay = PushRelay(url, stream, self)
            self.pushes.setdefault((app, name), []).append(relay)
            self.counters.relay_push_started += 1
            self._spawn(relay.run(), name=f"rtmp push {app}/{name} -> {url}")
        return stream

    def stop_publish(self, stream: Stream) -> None:
        for relay in self.pushes.pop((stream.app, stream.name), []):
            relay.stop()
        if stream.hls is not None:
            self._evict_hls_later((stream.app, stream.name), stream.hls)
        for player in stream.stop():
            player.owner.stream_ended(player)
        self.registry.discard_if_idle(stream)

    def _evict_hls_later(self, key: tuple[str, str], muxer: HlsMuxer) -> None:
        """An ended stream's playlist (with ENDLIST) stays for one playlist window, so players
        that are behind can finish it; then the muxer and its segments are forgotten."""
        window = max(muxer.fragment, sum(s.duration for s in muxer.segments))
        old = self._hls_evictions.pop(key, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._hls_evictions[key] = loop.call_later(window, self._evict_hls, key, muxer)

    def _evict_hls(self, key: tuple[str, str], muxer: HlsMuxer) -> None:
        self._hls_evictions.pop(key, None)
        if self.hls.get(key) is muxer:  # not a newer publish of the same name
            del self.hls[key]

    # -- playing -------------------------------------------------------------------------------

    def can_add_player(self, app: str, name: str) -> bool:
        cfg = self.config.app(app)
        if cfg is None or not cfg.max_players:
            return True
        stream = self.registry.get(app, name)
        return stream is None or len(stream.players) < cfg.max_players

    def start_play(self, app: str, name: str, player: Player) -> None:
        cfg = self.config.app(app)
        stream = self.registry.get_or_create(
            app,
            name,
            gop_cache=cfg.gop_cache if cfg else True,
            flush_interval=self.config.flush_interval_ms / 1000,
        )
        self.counters.plays_total += 1
        stream.add_player(player)
        if (
            stream.publisher is None
            and cfg is not None
            and cfg.pull
            and (app, name) not in self.pulls
        ):
            pull = PullRelay(cfg.pull, app, name, self)
            self.pulls[(app, name)] = pull
            self.counters.relay_pull_started += 1
            self._spawn(pull.run(), name=f"rtmp pull {app}/{name} <- {cfg.pull}")

    def stop_play(self, player: Player) -> None:
        stream = player.stream
        if stream is None:
            return
        stream.remove_player(player)
        if not stream.players:
            pull = self.pulls.get((stream.app, stream.name))
            if pull is not None:
                pull.stop()
        self.registry.discard_if_idle(stream)

    # -- observability -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock()
        apps: dict[str, Any] = {}
        for cfg in self.config.applications:
            apps[cfg.name] = {"streams": [], "push": list(cfg.push), "pull": cfg.pull}
        for stream in self.registry.streams.values():
            entry = apps.setdefault(stream.app, {"streams": []})
            entry["streams"].append(stream.status(now))
        c = self.counters
        return {
            "rtmp": {
                "uptime_seconds": round(now - self.started_at, 3),
                "connections": len(self.connections),
                "connections_total": c.connections_total,
                "bytes_in": c.bytes_in,
                "bytes_out": c.bytes_out + c.delivery.bytes_out,
                "streams": len(self.registry.publishing()),
                "players": self.registry.player_count(),
                "frames_skipped": c.delivery.frames_skipped,
                "players_dropped": c.delivery.players_dropped,
                "applications": apps,
            }
        }


def publish_name_for_key(app: ApplicationConfig, name: str, args: dict[str, str]) -> str | None:
    """The name ``name`` (with query ``args``) may publish under, or None if its key is wrong.

    ``name?key=<k>``: ``k`` must be bound to ``name`` (exactly or by glob). A bare ``<k>`` (an
    encoder's "stream key" field) publishes under the one exact name ``k`` is bound to. Every
    key is compared in constant time, and all of them are compared."""
    key = args.get("key")
    match: str | None = None
    for entry in app.publish_keys:
        secret = entry.key.encode()
        if key is not None:
            if hmac.compare_digest(key.encode(), secret) and entry.allows(name):
                match = match or name
        elif hmac.compare_digest(name.encode(), secret) and entry.exact:
            match = match or entry.stream
    return match
