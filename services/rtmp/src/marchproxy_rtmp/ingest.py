"""One asyncio Protocol per RTMP connection: drives the sans-IO handshake and chunk machines,
answers commands, and plugs publishers and players into :mod:`streams`."""

from __future__ import annotations

import asyncio
import itertools
import socket
from typing import TYPE_CHECKING, cast
from urllib.parse import parse_qs

import structlog

from marchproxy_common.net.proxied import client_address
from marchproxy_common.wire.rtmp import amf0
from marchproxy_common.wire.rtmp.chunks import (
    MSG_ACK,
    MSG_AGGREGATE,
    MSG_AUDIO,
    MSG_COMMAND_AMF0,
    MSG_COMMAND_AMF3,
    MSG_DATA_AMF0,
    MSG_DATA_AMF3,
    MSG_SET_PEER_BANDWIDTH,
    MSG_USER_CONTROL,
    MSG_VIDEO,
    MSG_WINDOW_ACK_SIZE,
    ChunkStreamDecoder,
    ChunkWriter,
    MessageReceived,
)
from marchproxy_common.wire.rtmp.errors import RtmpProtocolError
from marchproxy_common.wire.rtmp.handshake import ServerHandshake
from marchproxy_common.wire.rtmp.messages import (
    Command,
    UserControl,
    UserControlEvent,
    encode_command,
    encode_data,
    encode_on_status,
    encode_peer_bandwidth,
    encode_u32,
    encode_user_control,
    parse_command,
    parse_data,
    parse_user_control,
    split_aggregate,
    status_info,
)
from marchproxy_rtmp.streams import Player, PublisherInfo, Stream

if TYPE_CHECKING:
    from marchproxy_rtmp.server import RtmpServer

_log = structlog.get_logger("marchproxy.rtmp")

CSID_CONTROL = 2
CSID_COMMAND = 3
SERVER_WINDOW_ACK = 5_000_000  # what nginx-rtmp announces
#: a connection closed after a final status message is aborted if it has not flushed by then
CLOSE_FLUSH_TIMEOUT = 5.0
_client_ids = itertools.count(1)


def split_stream_name(raw: str) -> tuple[str, dict[str, str]]:
    """``"name?key=abc"`` -> ("name", {"key": "abc"})."""
    name, _, query = raw.partition("?")
    args = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    return name, args


class RtmpConnection(asyncio.Protocol):
    def __init__(self, server: RtmpServer) -> None:
        self.server = server
        self.client_id = next(_client_ids)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self._hs = ServerHandshake()
        self._decoder = ChunkStreamDecoder()
        self._writer = ChunkWriter()
        self._timer: asyncio.TimerHandle | None = None
        self.app = ""
        self.tc_url = ""
        #: the client sends commands as AMF3 command messages (type 17): answer in kind
        self._amf3 = False
        self._next_stream_id = 1
        self.publishing: dict[int, Stream] = {}  # message stream id -> stream we publish
        self.players: dict[int, Player] = {}  # message stream id -> our player
        self._closing = False
        self.bytes_in = 0
        self.last_media_at = 0.0

    # -- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: cast, don't assert
        self.transport = cast(asyncio.Transport, transport)
        host, port = client_address(transport)
        self.peer = f"{host}:{port}"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.server.connection_opened(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(
            self.server.settings.rtmp_handshake_timeout, self._handshake_timeout
        )

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.server.counters.bytes_in += len(data)
        try:
            if not self._hs.done:
                out = self._hs.feed(data)
                if out:
                    self._write(out)
                if not self._hs.done:
                    return
                if self._hs.client_digest is not None:
                    self.server.counters.digest_handshakes += 1
                data = self._hs.leftover
                if not data:
                    return
            for ev in self._decoder.feed(data):
                self._on_message(ev)
            ack = self._decoder.ack_due()
            if ack is not None:
                self._send(CSID_CONTROL, MSG_ACK, 0, encode_u32(ack))
        except RtmpProtocolError as exc:
            self.server.counters.protocol_errors += 1
            _log.info("rtmp_protocol_error", peer=self.peer, error=str(exc))
            self.abort()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sid in list(self.publishing):
            self._unpublish(sid)
        for sid in list(self.players):
            self._stop_playing(sid)
        self.server.connection_closed(self)

    # -- helpers -------------------------------------------------------------------------------

    def _handshake_timeout(self) -> None:
        self._timer = None
        if not self.app:
            _log.info("rtmp_connect_timeout", peer=self.peer)
            self.abort()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self.server.counters.bytes_out += len(data)

    def _send(self, csid: int, type_id: int, stream_id: int, payload: bytes) -> None:
        self._write(self._writer.write(csid, type_id, stream_id, 0, payload))

    def _command(self, stream_id: int, payload: bytes) -> None:
        """A command message: type 20, or for AMF3 clients type 17 (RTMP spec 7.1.1: a format
        byte 0, then the same AMF0 values, as FMS answers objectEncoding 3 clients)."""
        if self._amf3:
            self._send(CSID_COMMAND, MSG_COMMAND_AMF3, stream_id, b"\x00" + payload)
        else:
            self._send(CSID_COMMAND, MSG_COMMAND_AMF0, stream_id, payload)

    def _reply(self, tid: float, name: str, obj: amf0.AmfValue, *args: amf0.AmfValue) -> None:
        self._command(0, encode_command(name, tid, obj, *args))

    def _status(self, stream_id: int, level: str, code: str, description: str) -> None:
        self._command(stream_id, encode_on_status(level, code, description))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close_after_flush(self) -> None:
        """Close once queued bytes are written; abort if the peer does not read them."""
        if self.transport is None or self._closing:
            return
        self._closing = True
        self.transport.close()
        asyncio.get_running_loop().call_later(CLOSE_FLUSH_TIMEOUT, self.abort)

    # -- dispatch ------------------------------------------------------------------------------

    def _on_message(self, ev: MessageReceived) -> None:
        t = ev.type_id
        if t in (MSG_VIDEO, MSG_AUDIO):
            stream = self.publishing.get(ev.stream_id)
            if stream is not None:
                now = self.last_media_at = self.server.clock()
                stream.on_media(t, ev.timestamp, ev.payload, now)
        elif t in (MSG_COMMAND_AMF0, MSG_COMMAND_AMF3):
            self._amf3 = self._amf3 or t == MSG_COMMAND_AMF3
            self._on_command(parse_command(t, ev.payload), ev.stream_id)
        elif t in (MSG_DATA_AMF0, MSG_DATA_AMF3):
            stream = self.publishing.get(ev.stream_id)
            if stream is not None:
                self._on_data(stream, ev)
        elif t == MSG_AGGREGATE:
            stream = self.publishing.get(ev.stream_id)
            if stream is not None:
                now = self.last_media_at = self.server.clock()
                for sub_type, ts, data in split_aggregate(ev.payload, ev.timestamp):
                    if sub_type in (MSG_VIDEO, MSG_AUDIO):
                        stream.on_media(sub_type, ts, data, now)
        elif t == MSG_USER_CONTROL:
            uc = parse_user_control(ev.payload)
            if uc.event == UserControl.PING_REQUEST:
                reply = UserControlEvent(UserControl.PING_RESPONSE, 0, uc.value)
                self._send(CSID_CONTROL, MSG_USER_CONTROL, 0, encode_user_control(reply))

    def _on_data(self, stream: Stream, ev: MessageReceived) -> None:
        values = parse_data(ev.type_id, ev.payload)
        if values and values[0] == "@setDataFrame":
            values = values[1:]
        if values and values[0] == "onMetaData":
            meta = values[1] if len(values) > 1 and isinstance(values[1], dict) else {}
            stream.set_metadata(encode_data("onMetaData", *values[1:]), dict(meta))
        elif values:
            stream.on_data(ev.timestamp, encode_data(*values))

    def _on_command(self, cmd: Command, stream_id: int) -> None:
        name = cmd.name
        if name == "connect":
            self._on_connect(cmd)
            return
        if not self.app:
            raise RtmpProtocolError(f"{name} before connect")
        if name == "createStream":
            sid = self._next_stream_id
            self._next_stream_id += 1
            if sid > 64:
                raise RtmpProtocolError("too many streams on one connection")
            self._reply(cmd.transaction_id, "_result", None, float(sid))
        elif name == "publish":
            self._on_publish(cmd, stream_id)
        elif name in ("play", "play2"):
            self._on_play(cmd, stream_id)
        elif name in ("deleteStream", "closeStream"):
            target = stream_id
            if name == "deleteStream" and cmd.args and isinstance(cmd.args[0], float | int):
                target = int(cmd.args[0])
            self._unpublish(target)
            self._stop_playing(target)
        elif name == "FCUnpublish":
            pass  # the stream ends with deleteStream / the connection
        elif name in ("releaseStream", "FCPublish", "getStreamLength", "_checkbw"):
            if cmd.transaction_id:
                self._reply(cmd.transaction_id, "_result", None)
            if name == "FCPublish":
                args = [a for a in cmd.args if isinstance(a, str)]
                info = status_info("status", "NetStream.Publish.Start", args[0] if args else "")
                self._command(0, encode_command("onFCPublish", 0, None, info))

    # -- commands ------------------------------------------------------------------------------

    def _on_connect(self, cmd: Command) -> None:
        obj = cmd.command_object if isinstance(cmd.command_object, dict) else {}
        app_raw = obj.get("app")
        app = app_raw.partition("?")[0].strip("/") if isinstance(app_raw, str) else ""
        tc = obj.get("tcUrl")
        self.tc_url = tc if isinstance(tc, str) else ""
        encoding = obj.get("objectEncoding")
        if self.server.config.app(app) is None:
            self.server.counters.rejected_connects += 1
            info = status_info("error", "NetConnection.Connect.Rejected", f"no application {app}")
            self._reply(cmd.transaction_id, "_error", None, info)
            self.close_after_flush()
            return
        self.app = app
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._send(CSID_CONTROL, MSG_WINDOW_ACK_SIZE, 0, encode_u32(SERVER_WINDOW_ACK))
        self._send(
            CSID_CONTROL, MSG_SET_PEER_BANDWIDTH, 0, encode_peer_bandwidth(SERVER_WINDOW_ACK)
        )
        self._write(self._writer.set_chunk_size(self.server.config.chunk_size))
        props: dict[str, amf0.AmfValue] = {"fmsVer": "FMS/3,0,1,123", "capabilities": 31.0}
        info = status_info(
            "status",
            "NetConnection.Connect.Success",
            "Connection succeeded.",
            objectEncoding=float(encoding) if isinstance(encoding, float | int) else 0.0,
        )
        self._reply(cmd.transaction_id, "_result", props, info)

    def _on_publish(self, cmd: Command, stream_id: int) -> None:
        raw = next((a for a in cmd.args if isinstance(a, str)), "")
        name, args = split_stream_name(raw)
        if not name or stream_id in self.publishing or stream_id in self.players:
            self._status(stream_id, "error", "NetStream.Publish.BadName", "bad stream name")
            self.close_after_flush()
            return
        self.server.authorize_publish(self, stream_id, name, args)

    def publish_authorized(self, stream_id: int, name: str, allowed: bool, reason: str) -> None:
        """Called by the server once publish authentication has decided."""
        if self.transport is None or self.transport.is_closing():
            return
        if not allowed:
            self.server.counters.publish_rejected += 1
            # no stream name: with encoder-style stream keys the name may be a key
            _log.info("rtmp_publish_refused", peer=self.peer, app=self.app, reason=reason)
            self._status(stream_id, "error", "NetStream.Publish.Unauthorized", reason)
            self.close_after_flush()
            return
        pub = PublisherInfo(self.peer, self.client_id, self.abort)
        stream = self.server.start_publish(self.app, name, pub)
        if stream is None:
            self._status(stream_id, "error", "NetStream.Publish.BadName", "already publishing")
            self.close_after_flush()
            return
        self.publishing[stream_id] = stream
        self.last_media_at = self.server.clock()
        begin = UserControlEvent(UserControl.STREAM_BEGIN, stream_id)
        self._send(CSID_CONTROL, MSG_USER_CONTROL, 0, encode_user_control(begin))
        self._status(stream_id, "status", "NetStream.Publish.Start", f"{name} is now published.")
        _log.info("rtmp_publish_start", peer=self.peer, app=self.app, stream=name)

    def _unpublish(self, stream_id: int) -> None:
        stream = self.publishing.pop(stream_id, None)
        if stream is not None:
            _log.info("rtmp_publish_stop", peer=self.peer, app=self.app, stream=stream.name)
            self.server.stop_publish(stream)

    def _on_play(self, cmd: Command, stream_id: int) -> None:
        raw = next((a for a in cmd.args if isinstance(a, str)), "")
        name, _ = split_stream_name(raw)
        app_cfg = self.server.config.app(self.app)
        if (
            not name
            or app_cfg is None
            or not app_cfg.play
            or stream_id in self.players
            or stream_id in self.publishing
        ):
            self._status(stream_id, "error", "NetStream.Play.StreamNotFound", "cannot play")
            self.close_after_flush()
            return
        assert self.transport is not None
        player = Player(
            self.transport,
            self,
            stream_id=stream_id,
            chunk_size=self._writer.chunk_size,
            peer=self.peer,
            buffer_cap=self.server.config.player_buffer_bytes,
            slow_timeout=self.server.config.slow_player_timeout,
            counters=self.server.counters.delivery,
        )
        if not self.server.can_add_player(self.app, name):
            self._status(stream_id, "error", "NetStream.Play.Failed", "too many players")
            self.close_after_flush()
            return
        self.players[stream_id] = player
        begin = UserControlEvent(UserControl.STREAM_BEGIN, stream_id)
        self._send(CSID_CONTROL, MSG_USER_CONTROL, 0, encode_user_control(begin))
        self._status(stream_id, "status", "NetStream.Play.Reset", f"Playing and resetting {name}.")
        self._status(stream_id, "status", "NetStream.Play.Start", f"Started playing {name}.")
        access = encode_data("|RtmpSampleAccess", True, True)
        self._send(CSID_COMMAND, MSG_DATA_AMF0, stream_id, access)
        self.server.start_play(self.app, name, player)

    def _stop_playing(self, stream_id: int) -> None:
        player = self.players.pop(stream_id, None)
        if player is not None:
            self.server.stop_play(player)

    # -- PlayerOwner ---------------------------------------------------------------------------

    def stream_ended(self, player: Player) -> None:
        sid = player.stream_id
        if self.players.pop(sid, None) is None:
            return
        eof = UserControlEvent(UserControl.STREAM_EOF, sid)
        self._send(CSID_CONTROL, MSG_USER_CONTROL, 0, encode_user_control(eof))
        self._status(sid, "status", "NetStream.Play.UnpublishNotify", "stream is unpublished")
        self._status(sid, "status", "NetStream.Play.Stop", "stopped")
        if not self.players and not self.publishing:
            self.close_after_flush()

    def stream_not_found(self, player: Player) -> None:
        sid = player.stream_id
        if self.players.pop(sid, None) is None:
            return
        self.server.stop_play(player)
        eof = UserControlEvent(UserControl.STREAM_EOF, sid)
        self._send(CSID_CONTROL, MSG_USER_CONTROL, 0, encode_user_control(eof))
        self._status(sid, "error", "NetStream.Play.StreamNotFound", "stream not found")
        if not self.players and not self.publishing:
            self.close_after_flush()

    def stream_restarted(self, player: Player) -> None:
        sid = player.stream_id
        begin = UserControlEvent(UserControl.STREAM_BEGIN, sid)
        self._send(CSID_CONTROL, MSG_USER_CONTROL, 0, encode_user_control(begin))
        self._status(sid, "status", "NetStream.Play.PublishNotify", "stream is now published")

    def player_dropped(self, player: Player, reason: str) -> None:
        _log.info("rtmp_player_dropped", peer=self.peer, reason=reason)
        if self.players.pop(player.stream_id, None) is not None:
            self.server.stop_play(player)
        self.abort()
