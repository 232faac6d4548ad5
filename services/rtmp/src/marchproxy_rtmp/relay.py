"""Relays: push a live stream to other RTMP servers (nginx-rtmp's ``push``) and pull a stream
from an origin on demand (nginx-rtmp's ``pull``)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import TYPE_CHECKING, Any

import structlog

from marchproxy_common.tasks import spawn
from marchproxy_common.wire.rtmp.chunks import (
    MSG_AGGREGATE,
    MSG_AUDIO,
    MSG_DATA_AMF0,
    MSG_DATA_AMF3,
    MSG_VIDEO,
    MessageReceived,
)
from marchproxy_common.wire.rtmp.errors import RtmpProtocolError
from marchproxy_common.wire.rtmp.messages import encode_data, parse_data, split_aggregate
from marchproxy_rtmp.client import RtmpClientError, RtmpClientProtocol, open_client, parse_rtmp_url
from marchproxy_rtmp.streams import Player, PublisherInfo, Stream

if TYPE_CHECKING:
    from marchproxy_rtmp.server import RtmpServer

_log = structlog.get_logger("marchproxy.rtmp.relay")

RELAY_CONNECT_TIMEOUT = 10.0
RELAY_RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)  # then give up until the next publish
#: a pull that got no media is retried after these delays, then its players are told
PULL_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)
#: ... and not retried any more once this long has passed since its first attempt
PULL_GIVE_UP_AFTER = 30.0
_pull_ids = itertools.count(-1, -1)  # pulls publish with negative client ids


async def _first_of(*futures: asyncio.Future[Any]) -> None:
    await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)


class PushRelay:
    """Publishes ``stream`` to ``url`` (rtmp://host[:port]/app[/name]) for as long as it lives."""

    def __init__(self, url: str, stream: Stream, server: RtmpServer) -> None:
        self.url = url
        self.target = parse_rtmp_url(url)
        self.stream = stream
        self.server = server
        self.name = self.target.stream or stream.name  # the name it gets at the target
        self._publish_as = self.target.stream_name(stream.name)  # ... with the URL's ?query
        self._stopped = asyncio.Event()
        self._proto: RtmpClientProtocol | None = None
        self.connected = False

    def stop(self) -> None:
        self._stopped.set()
        if self._proto is not None:
            self._proto.close()

    async def run(self) -> None:
        for delay in (0.0, *RELAY_RETRY_DELAYS):
            if delay:
                try:
                    await asyncio.wait_for(self._stopped.wait(), delay)
                except TimeoutError:
                    pass
            if self._stopped.is_set() or self.stream.publisher is None:
                return
            try:
                await self._once()
            except (RtmpClientError, RtmpProtocolError, OSError, TimeoutError) as exc:
                self.server.counters.relay_push_failed += 1
                _log.warning("rtmp_push_failed", url=self.url, error=str(exc))
            if self._stopped.is_set():
                return

    async def _once(self) -> None:
        t = self.target
        proto = await open_client(t.host, t.port, t.app, connect_timeout=RELAY_CONNECT_TIMEOUT)
        self._proto = proto
        player: Player | None = None
        try:
            async with asyncio.timeout(RELAY_CONNECT_TIMEOUT):
                sid = await proto.publish(self._publish_as)
            assert proto.transport is not None
            player = Player(
                proto.transport,
                self,
                stream_id=sid,
                chunk_size=proto.writer.chunk_size,
                peer=self.url,
                buffer_cap=self.server.config.player_buffer_bytes,
                slow_timeout=self.server.config.slow_player_timeout,
            )
            if self.stream.publisher is None or self._stopped.is_set():
                return
            self.stream.add_player(player, relay=True)
            self.connected = True
            _log.info("rtmp_push_started", url=self.url, stream=self.name)
            stop = spawn(self._stopped.wait(), name=f"rtmp push wait {self.url}")
            try:
                await _first_of(stop, proto.closed)
            finally:
                stop.cancel()
            if self._stopped.is_set() and proto.transport is not None:
                proto.notify("FCUnpublish", None, self.name)
                proto.notify("deleteStream", None, float(sid))
        finally:
            self.connected = False
            if player is not None:
                self.stream.remove_player(player)
            proto.close()
            self._proto = None

    # PlayerOwner
    def stream_ended(self, player: Player) -> None:
        self._stopped.set()

    def stream_restarted(self, player: Player) -> None:
        pass  # push relays are stopped when the stream changes hands

    def stream_not_found(self, player: Player) -> None:
        self._stopped.set()  # not reached: relays attach to published streams only

    def player_dropped(self, player: Player, reason: str) -> None:
        _log.warning("rtmp_push_too_slow", url=self.url, reason=reason)
        if self._proto is not None:
            self._proto.close()


class PullRelay:
    """Plays ``name`` from an origin and publishes it locally while players want it.

    An attempt that fails before any media arrived (origin down, connect refused, play
    refused) is retried after :data:`PULL_RETRY_DELAYS` while players wait; when those run
    out (or :data:`PULL_GIVE_UP_AFTER` has passed) the waiting players get
    ``NetStream.Play.StreamNotFound`` and are closed. A session that published and then ended
    ends its players the usual way (StreamEOF + UnpublishNotify)."""

    def __init__(self, origin: str, app: str, name: str, server: RtmpServer) -> None:
        self.origin = parse_rtmp_url(origin)
        self.url = origin
        self.app = app
        self.name = name
        self.server = server
        self.client_id = next(_pull_ids)
        self._stopped = asyncio.Event()
        self._proto: RtmpClientProtocol | None = None
        self._stream: Stream | None = None
        self.attempts = 0

    def stop(self) -> None:
        self._stopped.set()
        if self._proto is not None:
            self._proto.close()

    def _ours(self, stream: Stream | None) -> bool:
        return (
            stream is not None
            and stream.publisher is not None
            and stream.publisher.client_id == self.client_id
        )

    def _publish_locally(self) -> Stream | None:
        """Publish on the first media from the origin (not before: an attempt that gets none
        must leave the waiting players subscribed for the next one)."""
        if self._stream is None and not self._stopped.is_set():
            pub = PublisherInfo(f"pull:{self.url}", self.client_id, self.stop)
            self._stream = self.server.start_publish(self.app, self.name, pub)
            if self._stream is None:  # a real publisher has the stream: not needed
                self.stop()
        return self._stream if self._ours(self._stream) else None

    def _on_media(self, ev: MessageReceived) -> None:
        t = ev.type_id
        if t in (MSG_DATA_AMF0, MSG_DATA_AMF3):
            values = parse_data(t, ev.payload)
            if not values or values[0] != "onMetaData":
                return  # |RtmpSampleAccess and the like: not a sign of a live stream
        elif t not in (MSG_AUDIO, MSG_VIDEO, MSG_AGGREGATE):
            return
        stream = self._publish_locally()
        if stream is None:
            return  # stopped, or a real publisher took the stream over
        if t in (MSG_AUDIO, MSG_VIDEO):
            stream.on_media(t, ev.timestamp, ev.payload, self.server.clock())
        elif t == MSG_AGGREGATE:
            now = self.server.clock()
            for sub_type, ts, data in split_aggregate(ev.payload, ev.timestamp):
                if sub_type in (MSG_AUDIO, MSG_VIDEO):
                    stream.on_media(sub_type, ts, data, now)
        else:
            meta = values[1] if len(values) > 1 and isinstance(values[1], dict) else {}
            stream.set_metadata(encode_data(*values), dict(meta))

    def _wanted(self) -> bool:
        """Players still wait for this pull, and no real publisher has the stream."""
        if self._stopped.is_set():
            return False
        stream = self.server.registry.get(self.app, self.name)
        if stream is None or not stream.players:
            return False
        return stream.publisher is None or self._ours(stream)

    async def run(self) -> None:
        key = (self.app, self.name)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + PULL_GIVE_UP_AFTER
        try:
            for delay in (0.0, *PULL_RETRY_DELAYS):
                if delay:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopped.wait(), delay)
                if not self._wanted():
                    return
                self.attempts += 1
                try:
                    await self._once()
                except (RtmpClientError, RtmpProtocolError, OSError, TimeoutError) as exc:
                    self.server.counters.relay_pull_failed += 1
                    _log.warning(
                        "rtmp_pull_failed", origin=self.url, attempt=self.attempts, error=str(exc)
                    )
                if self._stream is not None or loop.time() >= give_up_at:
                    break  # a session published (its end ended the players), or out of time
            if self._stream is None and self._wanted():
                self._give_up()
        finally:
            if self.server.pulls.get(key) is self:
                del self.server.pulls[key]
            stream, self._stream = self._stream, None
            if stream is not None and self._ours(stream):
                self.server.stop_publish(stream)

    async def _once(self) -> None:
        o = self.origin
        proto = await open_client(
            o.host, o.port, o.app, on_media=self._on_media, connect_timeout=RELAY_CONNECT_TIMEOUT
        )
        self._proto = proto
        try:
            if self._stopped.is_set():
                return
            async with asyncio.timeout(RELAY_CONNECT_TIMEOUT):
                # the local name, plus the origin URL's query (a play key, say)
                q = self.origin.query
                await proto.play(f"{self.name}?{q}" if q else self.name)
            _log.info("rtmp_pull_started", origin=self.url, stream=self.name)
            stop = spawn(self._stopped.wait(), name=f"rtmp pull wait {self.url}")
            try:
                await _first_of(stop, proto.closed)
            finally:
                stop.cancel()
        finally:
            proto.close()
            self._proto = None
            stream = self._stream
            if stream is not None and self._ours(stream):
                self.server.stop_publish(stream)

    def _give_up(self) -> None:
        stream = self.server.registry.get(self.app, self.name)
        if stream is None or stream.publisher is not None:
            return
        _log.warning("rtmp_pull_gave_up", origin=self.url, stream=self.name, attempts=self.attempts)
        for player in list(stream.players):
            player.owner.stream_not_found(player)
