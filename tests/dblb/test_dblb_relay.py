"""The relay in transaction mode, over fake transports (no loop, no sockets): whatever way a
reply is cut into reads, the client gets its exact bytes, what the relay observes
(ReadyForQuery, ParameterStatus, DISCARD) is applied, and the server goes back to the pool at
the last ReadyForQuery, not before; whatever way queries are cut, the server gets them whole."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from marchproxy_common.wire.postgres import encoder as enc
from marchproxy_dblb.config import DblbConfig, DblbSettings
from marchproxy_dblb.frontends.postgres import PostgresClient
from marchproxy_dblb.module import DblbHooks
from marchproxy_dblb.pool import ServerConnection


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


def _linked_pair(
    **config_kw: Any,
) -> tuple[PostgresClient, ServerConnection, FakeTransport, FakeTransport]:
    """A ready client of a transaction-mode pool with one idle server (not linked yet)."""
    config = DblbConfig.model_validate(
        {
            "pool_mode": "transaction",
            "databases": {"db": {"host": "127.0.0.1", "port": 5432}},
            **config_kw,
        }
    )
    hooks = DblbHooks(DblbSettings(register_with_nlb=False), config)
    pool = hooks.manager.pool_for("db", "alice", {})
    assert pool is not None
    server = ServerConnection(pool)
    server_side = FakeTransport()
    server.connection_made(server_side)  # type: ignore[arg-type]
    server.state = "idle"
    server.params = {"server_version": "16.0", "application_name": ""}
    pool.servers.add(server)
    pool.server_params = dict(server.params)
    pool.release(server)
    client = PostgresClient(hooks)
    client_side = FakeTransport()
    client.connection_made(client_side)  # type: ignore[arg-type]
    client.data_received(enc.startup_message({"user": "alice", "database": "db"}))
    assert client.state == "ready"
    client_side.data.clear()
    return client, server, client_side, server_side


SELECT_REPLY = (
    enc.row_description([("abalance", 23)])
    + enc.data_row([b"x" * 3000])
    + enc.command_complete("SELECT 1")
)
#: ``SELECT ...; SET application_name = 'bench'``, then a second query of the same read
REPLY = (
    SELECT_REPLY
    + enc.parameter_status("application_name", "bench")
    + enc.command_complete("SET")
    + enc.ready_for_query(b"I")
    + SELECT_REPLY
    + enc.ready_for_query(b"I")
)


@given(st.lists(st.integers(min_value=0, max_value=len(REPLY)), max_size=8))
def test_any_split_of_a_reply_is_relayed_whole_and_releases_at_the_last_ready(
    cuts: list[int],
) -> None:
    client, server, client_side, server_side = _linked_pair()
    client.data_received(enc.query("SELECT 1; SET application_name = 'bench'") + enc.query("S"))
    assert client.server is server
    bounds = sorted({0, *cuts, len(REPLY)})
    for start, end in itertools.pairwise(bounds):
        assert client.server is server  # nothing released before the last ReadyForQuery
        server.data_received(REPLY[start:end])
    assert bytes(client_side.data) == REPLY
    assert client.server is None and server.client is None
    assert server in server.pool.idle and server.state == "idle"
    assert server.outstanding == 0 and not server.expect
    assert server.params["application_name"] == "bench"
    assert client.tracked_params["application_name"] == "bench"
    assert server.pool.stats.xact_count == 1
    assert not server_side.closed


def test_discard_all_makes_the_relay_forget_prepared_statements() -> None:
    client, server, _, _ = _linked_pair()
    server.prepared.add(b"mp_0123")
    client.data_received(enc.query("DISCARD ALL"))
    server.data_received(enc.command_complete("DISCARD ALL") + enc.ready_for_query(b"I"))
    assert not server.prepared
    assert client.server is None


def test_a_reply_inside_a_transaction_keeps_the_server() -> None:
    client, server, client_side, _ = _linked_pair()
    client.data_received(enc.query("BEGIN"))
    server.data_received(enc.command_complete("BEGIN") + enc.ready_for_query(b"T"))
    assert client.server is server
    assert bytes(client_side.data).endswith(enc.ready_for_query(b"T"))


def test_an_invalid_message_length_closes_the_server_and_forwards_nothing() -> None:
    client, server, client_side, server_side = _linked_pair()
    client.data_received(enc.query("SELECT 1"))
    server.data_received(SELECT_REPLY + b"Z\x00\x00\x00\x02")
    assert server_side.closed
    assert not client_side.data


QUERIES = [enc.query("SELECT 1"), enc.query("SELECT 'a longer one' || repeat('x', 100)")]


@given(
    st.lists(st.sampled_from(QUERIES), min_size=1, max_size=4),
    st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_queries_cut_anywhere_reach_the_server_whole(queries: list[bytes], cuts: list[int]) -> None:
    client, server, client_side, server_side = _linked_pair()
    stream = b"".join(queries)
    bounds = sorted({0, *(c for c in cuts if c < len(stream)), len(stream)})
    for start, end in itertools.pairwise(bounds):
        client.data_received(stream[start:end])
        assert len(server_side.data) <= end
    assert bytes(server_side.data) == stream
    assert server.outstanding == len(queries)
    assert not client_side.closed


def test_a_whole_query_over_max_packet_size_is_refused_after_a_clean_read() -> None:
    client, server, client_side, server_side = _linked_pair(max_packet_size=1024)
    client.data_received(enc.query("SELECT 1"))  # the decoder is known to hold nothing now
    server.data_received(enc.command_complete("SELECT 1") + enc.ready_for_query(b"I"))
    server_side.data.clear()
    client.data_received(enc.query("SELECT '" + "x" * 2000 + "'"))
    assert client_side.closed
    assert b"08P01" in client_side.data
    assert not server_side.data


def _server_view(server: ServerConnection) -> tuple[Any, ...]:
    stats = server.pool.stats
    return (
        server.state,
        server.outstanding,
        list(server.expect),
        server.last_kind,
        stats.query_count,
        stats.bytes_sent,
        stats.wait_count,
    )


def test_a_lone_query_takes_the_idle_server_as_the_general_path_does() -> None:
    # one read holding one whole Query (the fast path), against the same query cut in two
    # reads (the decoder's path): the same server state, stats and bytes either way
    fast, fast_server, _, fast_side = _linked_pair()
    general, general_server, _, general_side = _linked_pair()
    query = enc.query("SELECT abalance FROM pgbench_accounts WHERE aid = 1")
    fast.data_received(query)
    general.data_received(query[:3])
    general.data_received(query[3:])
    assert fast.server is fast_server and general.server is general_server
    assert _server_view(fast_server) == _server_view(general_server)
    assert bytes(fast_side.data) == bytes(general_side.data) == query
    fast_server.data_received(SELECT_REPLY + enc.ready_for_query(b"I"))
    assert fast.server is None and fast_server in fast_server.pool.idle


def test_queries_we_may_answer_ourselves_leave_the_fast_path() -> None:
    client, _server, client_side, server_side = _linked_pair()
    client.statements[b"s1"] = (b"mp_1", b"SELECT 1", b"")
    client.data_received(enc.query("  deallocate s1"))
    assert client.server is None and not server_side.data
    assert bytes(client_side.data) == enc.command_complete("DEALLOCATE") + enc.ready_for_query(b"I")


async def test_a_lone_query_waits_when_no_server_is_idle() -> None:
    client, server, _, server_side = _linked_pair(default_pool_size=1)  # (no server to open)
    other = PostgresClient(client.hooks)
    other.connection_made(FakeTransport())  # type: ignore[arg-type]
    other.data_received(enc.startup_message({"user": "alice", "database": "db"}))
    other.data_received(enc.query("SELECT 1"))
    assert other.server is server
    client.data_received(enc.query("SELECT 2"))
    assert client.server is None and client.waiting and len(client.pending) == 1
    server.data_received(enc.command_complete("SELECT 1") + enc.ready_for_query(b"I"))
    assert client.server is server  # handed over at the other's ReadyForQuery
    assert bytes(server_side.data) == enc.query("SELECT 1") + enc.query("SELECT 2")
