"""Live streams: one publisher fans out to many players from one shared buffer.

Every media message becomes one :class:`MediaFrame`. Its chunk encoding (a stateless fmt 0
header, so the bytes do not depend on what else went to a player) is computed once per
(chunk size, message stream id) and the *same* ``bytes`` object is written to every player.

A late joiner gets the cached metadata (``onMetaData``), the AVC/AAC sequence headers and then the
GOP cache (everything since the last video keyframe), so its first video frame is a keyframe and
it starts at once. A player whose transport write buffer is over the cap is skipped until the next
keyframe (frames are dropped, memory stays bounded); one that stays over the cap for
``slow_player_timeout`` seconds is disconnected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from marchproxy_common.wire.rtmp.chunks import MSG_AUDIO, MSG_DATA_AMF0, MSG_VIDEO, encode_message
from marchproxy_common.wire.rtmp.messages import (
    is_audio_sequence_header,
    is_video_keyframe,
    is_video_sequence_header,
)
from marchproxy_rtmp.hls import HlsMuxer

CSID_DATA = 5  # chunk stream ids used for media (as nginx-rtmp: amf 5, audio 6, video 7)
CSID_AUDIO = 6
CSID_VIDEO = 7
_CSID_BY_TYPE = {MSG_AUDIO: CSID_AUDIO, MSG_VIDEO: CSID_VIDEO}

#: a GOP cache larger than this is dropped (until the next keyframe) rather than kept growing
MAX_GOP_CACHE_BYTES = 16 << 20
MAX_GOP_CACHE_FRAMES = 2048
#: default cap of a player's transport write buffer before frames are skipped
DEFAULT_PLAYER_BUFFER_CAP = 1 << 20
DEFAULT_SLOW_PLAYER_TIMEOUT = 10.0
#: frames are batched this long before being written (one send per player per batch)
DEFAULT_FLUSH_INTERVAL = 0.04


class MediaFrame:
    """One audio/video/data message of a stream, encoded to chunks lazily and only once."""

    __slots__ = ("_encoded", "keyframe", "payload", "sequence_header", "timestamp", "type_id")

    def __init__(
        self,
        type_id: int,
        timestamp: int,
        payload: bytes,
        *,
        keyframe: bool = False,
        sequence_header: bool = False,
    ) -> None:
        self.type_id = type_id
        self.timestamp = timestamp
        self.payload = payload
        self.keyframe = keyframe
        self.sequence_header = sequence_header
        self._encoded: dict[tuple[int, int], bytes] = {}

    def encoded(self, chunk_size: int, stream_id: int) -> bytes:
        key = (chunk_size, stream_id)
        data = self._encoded.get(key)
        if data is None:
            csid = _CSID_BY_TYPE.get(self.type_id, CSID_DATA)
            data = encode_message(
                csid, self.type_id, stream_id, self.timestamp, self.payload, chunk_size
            )
            self._encoded[key] = data
        return data


class Transport(Protocol):
    """What a player writes to (asyncio.Transport fits)."""

    def write(self, data: bytes) -> None: ...

    def get_write_buffer_size(self) -> int: ...

    def is_closing(self) -> bool: ...


class PlayerOwner(Protocol):
    """The connection (or relay) behind a player: told when the stream ends or it is dropped."""

    def stream_ended(self, player: Player) -> None: ...

    def stream_restarted(self, player: Player) -> None:
        """A new publisher took the stream over; the player stays subscribed."""

    def stream_not_found(self, player: Player) -> None:
        """The stream could not be had (a pull gave up): end the player."""

    def player_dropped(self, player: Player, reason: str) -> None: ...


@dataclass(slots=True)
class DeliveryCounters:
    frames_sent: int = 0
    frames_skipped: int = 0
    bytes_out: int = 0
    players_dropped: int = 0


class Player:
    """A subscriber of a stream with its own delivery state (keyframe wait, slow-player timer)."""

    __slots__ = ("_clock", "_over_since", "buffer_cap", "bytes_out", "chunk_size", "counters",
                 "frames_sent", "frames_skipped", "owner", "peer", "slow_timeout", "started_at",
                 "stream", "stream_id", "transport", "waiting_keyframe")  # fmt: skip

    def __init__(
        self,
        transport: Transport,
        owner: PlayerOwner,
        *,
        stream_id: int,
        chunk_size: int,
        peer: str = "",
        buffer_cap: int = DEFAULT_PLAYER_BUFFER_CAP,
        slow_timeout: float = DEFAULT_SLOW_PLAYER_TIMEOUT,
        counters: DeliveryCounters | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.owner = owner
        self.stream_id = stream_id
        self.chunk_size = chunk_size
        self.peer = peer
        self.buffer_cap = buffer_cap
        self.slow_timeout = slow_timeout
        self.counters = counters if counters is not None else DeliveryCounters()
        self._clock = clock
        self._over_since: float | None = None
        self.waiting_keyframe = True
        self.frames_sent = 0
        self.frames_skipped = 0
        self.bytes_out = 0
        self.started_at = clock()
        self.stream: Stream | None = None

    def write_frame(self, frame: MediaFrame) -> None:
        self._write(frame.encoded(self.chunk_size, self.stream_id), 1)

    def _write(self, data: bytes, frames: int) -> None:
        self.transport.write(data)
        n = len(data)
        self.bytes_out += n
        self.frames_sent += frames
        c = self.counters
        c.bytes_out += n
        c.frames_sent += frames

    def _skip(self, n: int) -> None:
        self.frames_skipped += n
        self.counters.frames_skipped += n

    def deliver(self, batch: Batch) -> bool:
        """Write ``batch`` (one write) unless the player is too slow; False when it has been
        over its cap for too long and must be dropped (the stream tells its owner).

        A player over its buffer cap skips frames and then waits for a frame it may start on
        (a video keyframe, or any audio frame of a stream without video)."""
        if self.transport.get_write_buffer_size() > self.buffer_cap:
            now = self._clock()
            if self._over_since is None:
                self._over_since = now
            elif now - self._over_since > self.slow_timeout:
                self.counters.players_dropped += 1
                return False
            self.waiting_keyframe = True
            self._skip(len(batch.frames))
            return True
        self._over_since = None
        if not self.waiting_keyframe:
            self._write(batch.encoded(self.chunk_size, self.stream_id), len(batch.frames))
            return True
        parts: list[bytes] = []
        for frame, starts_gop in zip(batch.frames, batch.starts, strict=True):
            if self.waiting_keyframe and not frame.sequence_header:
                if not starts_gop:
                    self._skip(1)
                    continue
                self.waiting_keyframe = False
            parts.append(frame.encoded(self.chunk_size, self.stream_id))
        if parts:
            self._write(b"".join(parts), len(parts))
        return True


class Batch:
    """Frames fanned out together: each player gets them in one write, and the joined bytes are
    built once per (chunk size, stream id) for all players that are in sync."""

    __slots__ = ("_encoded", "frames", "starts")

    def __init__(self) -> None:
        self.frames: list[MediaFrame] = []
        self.starts: list[bool] = []
        self._encoded: dict[tuple[int, int], bytes] = {}

    def add(self, frame: MediaFrame, starts_gop: bool) -> None:
        self.frames.append(frame)
        self.starts.append(starts_gop)

    def encoded(self, chunk_size: int, stream_id: int) -> bytes:
        key = (chunk_size, stream_id)
        data = self._encoded.get(key)
        if data is None:
            frames = self.frames
            if len(frames) == 1:
                data = frames[0].encoded(chunk_size, stream_id)
            else:
                data = b"".join(f.encoded(chunk_size, stream_id) for f in frames)
            self._encoded[key] = data
        return data


@dataclass(slots=True)
class PublisherInfo:
    peer: str
    client_id: int
    close: Callable[[], None]


@dataclass
class Stream:
    app: str
    name: str
    gop_cache_enabled: bool = True
    publisher: PublisherInfo | None = None
    players: set[Player] = field(default_factory=set)
    metadata: MediaFrame | None = None
    video_header: MediaFrame | None = None
    audio_header: MediaFrame | None = None
    gop: list[MediaFrame] = field(default_factory=list)
    gop_bytes: int = 0
    has_video: bool = False
    published_at: float = 0.0
    bytes_in: int = 0
    video_frames: int = 0
    audio_frames: int = 0
    bitrate_bps: float = 0.0
    _rate_mark: float = 0.0
    _rate_bytes: int = 0
    #: extra sinks (push relays) that should not count as players
    relays: set[Player] = field(default_factory=set)
    meta_info: dict[str, Any] = field(default_factory=dict)
    #: seconds frames are collected before one write per player (fewer syscalls); 0 = next tick
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    _batch: Batch | None = None
    #: HLS output of this stream, when its application has ``hls: true``
    hls: HlsMuxer | None = None
    _flush_handle: asyncio.Handle | None = None

    # -- publisher side ------------------------------------------------------------------------

    def start(self, publisher: PublisherInfo, now: float) -> None:
        self.publisher = publisher
        self.published_at = now
        self._rate_mark = now
        self._rate_bytes = 0
        self.metadata = self.video_header = self.audio_header = None
        self.gop = []
        self.gop_bytes = 0
        self.has_video = False
        for p in self.players:
            p.waiting_keyframe = True

    def set_metadata(self, payload: bytes, info: dict[str, Any]) -> None:
        self.meta_info = info
        self.metadata = MediaFrame(MSG_DATA_AMF0, 0, payload, sequence_header=True)
        self._fan_out(self.metadata, starts_gop=False)

    def on_data(self, timestamp: int, payload: bytes) -> None:
        """A data message other than metadata (cue points, text): passed through as is."""
        self._fan_out(MediaFrame(MSG_DATA_AMF0, timestamp, payload), starts_gop=False)

    def on_media(self, type_id: int, timestamp: int, payload: bytes, now: float) -> None:
        if self.hls is not None:
            self.hls.on_media(type_id, timestamp, payload)
        size = len(payload)
        self.bytes_in += size
        self._rate_bytes += size
        if now - self._rate_mark >= 1.0:
            self.bitrate_bps = self._rate_bytes * 8 / (now - self._rate_mark)
            self._rate_mark = now
            self._rate_bytes = 0
        if type_id == MSG_VIDEO:
            self.has_video = True
            if is_video_sequence_header(payload):
                self.video_header = MediaFrame(type_id, timestamp, payload, sequence_header=True)
                self._fan_out(self.video_header, starts_gop=False)
                return
            key = is_video_keyframe(payload)
            frame = MediaFrame(type_id, timestamp, payload, keyframe=key)
            self.video_frames += 1
            starts = key
        else:
            if is_audio_sequence_header(payload):
                self.audio_header = MediaFrame(type_id, timestamp, payload, sequence_header=True)
                self._fan_out(self.audio_header, starts_gop=False)
                return
            frame = MediaFrame(type_id, timestamp, payload)
            self.audio_frames += 1
            starts = not self.has_video
        if self.gop_cache_enabled:
            self._cache(frame)
        self._fan_out(frame, starts)

    def _cache(self, frame: MediaFrame) -> None:
        if frame.keyframe:
            self.gop = [frame]
            self.gop_bytes = len(frame.payload)
            return
        if not self.gop:
            return  # no keyframe seen yet (or cache dropped): nothing a player could start on
        self.gop.append(frame)
        self.gop_bytes += len(frame.payload)
        if self.gop_bytes > MAX_GOP_CACHE_BYTES or len(self.gop) > MAX_GOP_CACHE_FRAMES:
            self.gop = []
            self.gop_bytes = 0

    def _fan_out(self, frame: MediaFrame, starts_gop: bool) -> None:
        if not self.players and not self.relays:
            return
        batch = self._batch
        if batch is None:
            batch = self._batch = Batch()
        batch.add(frame, starts_gop)
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            if self.flush_interval > 0:
                self._flush_handle = loop.call_later(self.flush_interval, self.flush)
            else:
                self._flush_handle = loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the pending batch to every player (one write each)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch = self._batch
        if batch is None:
            return
        self._batch = None
        dropped: list[Player] = []
        for p in self.players:
            if not p.deliver(batch):
                dropped.append(p)
        for p in self.relays:
            if not p.deliver(batch):
                dropped.append(p)
        for p in dropped:
            # after the loop: the owner unsubscribes it (server.stop_play), which changes the
            # sets iterated above and may end a pull or forget this stream
            p.owner.player_dropped(p, "slow")
            self.remove_player(p)

    def stop(self, *, keep_players: bool = False) -> list[Player]:
        """The publisher left: forget the media state; return the players to notify.

        ``keep_players``: another publisher takes over at once (a real one replacing a pull), so
        the players stay subscribed and wait for its first keyframe; only relays are returned."""
        self.flush()
        if self.hls is not None:
            self.hls.finish()
            self.hls = None
        self.publisher = None
        self.metadata = self.video_header = self.audio_header = None
        self.gop = []
        self.gop_bytes = 0
        ended = list(self.relays)
        self.relays.clear()
        if keep_players:
            for p in self.players:
                p.waiting_keyframe = True
        else:
            ended += self.players
            self.players.clear()
        for p in ended:
            p.stream = None
        return ended

    # -- player side ---------------------------------------------------------------------------

    def add_player(self, player: Player, *, relay: bool = False) -> None:
        """Subscribe ``player``: send what a late joiner needs, then the GOP cache."""
        self.flush()  # pending frames are in the GOP cache already: don't send them twice
        (self.relays if relay else self.players).add(player)
        player.stream = self
        player.waiting_keyframe = True
        if self.publisher is None:
            return
        for header in (self.metadata, self.video_header, self.audio_header):
            if header is not None:
                player.write_frame(header)
        if self.gop:
            player.waiting_keyframe = False
            cs, sid = player.chunk_size, player.stream_id
            player._write(b"".join(f.encoded(cs, sid) for f in self.gop), len(self.gop))

    def remove_player(self, player: Player) -> None:
        self.players.discard(player)
        self.relays.discard(player)
        player.stream = None

    @property
    def idle(self) -> bool:
        return self.publisher is None and not self.players and not self.relays

    def status(self, now: float) -> dict[str, Any]:
        pub = self.publisher
        return {
            "name": self.name,
            "publisher": (
                {"address": pub.peer, "client_id": pub.client_id} if pub is not None else None
            ),
            "publishing": pub is not None,
            "uptime_seconds": round(now - self.published_at, 3) if pub is not None else 0.0,
            "bitrate_bps": round(self.bitrate_bps),
            "bytes_in": self.bytes_in,
            "bytes_out": sum(p.bytes_out for p in self.players),
            "video_frames": self.video_frames,
            "audio_frames": self.audio_frames,
            "players": len(self.players),
            "relays": len(self.relays),
            "gop_cache_frames": len(self.gop),
            "meta": {k: v for k, v in self.meta_info.items() if isinstance(v, int | float | str)},
            "clients": [
                {
                    "address": p.peer,
                    "bytes_out": p.bytes_out,
                    "frames_sent": p.frames_sent,
                    "frames_skipped": p.frames_skipped,
                    "queued_bytes": p.transport.get_write_buffer_size(),
                }
                for p in list(self.players)[:100]
            ],
        }


class StreamRegistry:
    """All streams by (application, name)."""

    def __init__(self) -> None:
        self.streams: dict[tuple[str, str], Stream] = {}

    def get(self, app: str, name: str) -> Stream | None:
        return self.streams.get((app, name))

    def get_or_create(
        self,
        app: str,
        name: str,
        *,
        gop_cache: bool = True,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> Stream:
        s = self.streams.get((app, name))
        if s is None:
            s = Stream(app, name, gop_cache_enabled=gop_cache, flush_interval=flush_interval)
            self.streams[(app, name)] = s
        return s

    def discard_if_idle(self, stream: Stream) -> None:
        if stream.idle and self.streams.get((stream.app, stream.name)) is stream:
            del self.streams[(stream.app, stream.name)]

    def publishing(self) -> list[Stream]:
        return [s for s in self.streams.values() if s.publisher is not None]

    def player_count(self) -> int:
        return sum(len(s.players) for s in self.streams.values())
