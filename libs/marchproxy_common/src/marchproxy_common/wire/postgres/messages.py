"""Events and constants of the PostgreSQL v3 wire protocol (PostgreSQL docs, chapter 55)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

#: Postgres' own MAX_STARTUP_PACKET_LENGTH (src/include/libpq/pqcomm.h).
MAX_STARTUP_PACKET = 10_000
#: Postgres' PG_MAX_AUTH_TOKEN_LENGTH: the cap on authentication messages (auth.c).
MAX_AUTH_MESSAGE = 65_535
#: Postgres' PQ_LARGE_MESSAGE_LIMIT is MaxAllocSize - 1 (1 GiB); we default to a quarter of that
#: so one client cannot make the proxy buffer a gigabyte. Configurable per decoder.
DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024
#: Smallest valid length of a typed message: the int32 length counts itself.
MIN_MESSAGE_LEN = 4

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_3_0 = 196608  # (3 << 16) | 0


class DecoderState(enum.Enum):
    STARTUP = "startup"  # untyped packets: SSLRequest, GSSENCRequest, CancelRequest, Startup
    MESSAGES = "messages"  # typed messages: 1 byte type + int32 length incl. itself
    CLOSED = "closed"  # after CancelRequest or Terminate: nothing more is valid


class TransactionStatus(enum.Enum):
    IDLE = b"I"
    IN_TRANSACTION = b"T"
    FAILED = b"E"


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: int


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Message:
    """A typed message. ``body`` excludes the type byte and the length.

    Decoders may leave ``body`` empty for bulky types they were told not to materialise
    (``skip_bodies``); ``length`` is always the real body length.
    """

    type: int
    body: bytes
    length: int = -1

    @property
    def raw(self) -> bytes:
        return bytes((self.type,)) + (len(self.body) + 4).to_bytes(4, "big") + self.body


StartupEvent = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage
FrontendEvent = StartupEvent | Message

# Frontend (client -> server) message types.
F_BIND = ord("B")
F_CLOSE = ord("C")
F_COPY_DATA = ord("d")
F_COPY_DONE = ord("c")
F_COPY_FAIL = ord("f")
F_DESCRIBE = ord("D")
F_EXECUTE = ord("E")
F_FLUSH = ord("H")
F_FUNCTION_CALL = ord("F")
F_PARSE = ord("P")
F_PASSWORD = ord("p")  # also SASLInitialResponse / SASLResponse / GSSResponse
F_QUERY = ord("Q")
F_SYNC = ord("S")
F_TERMINATE = ord("X")

# Backend (server -> client) message types.
B_AUTHENTICATION = ord("R")
B_BACKEND_KEY_DATA = ord("K")
B_BIND_COMPLETE = ord("2")
B_CLOSE_COMPLETE = ord("3")
B_COMMAND_COMPLETE = ord("C")
B_COPY_IN = ord("G")
B_COPY_OUT = ord("H")
B_COPY_BOTH = ord("W")
B_COPY_DATA = ord("d")
B_COPY_DONE = ord("c")
B_DATA_ROW = ord("D")
B_EMPTY_QUERY = ord("I")
B_ERROR = ord("E")
B_NEGOTIATE_PROTOCOL = ord("v")
B_NO_DATA = ord("n")
B_NOTICE = ord("N")
B_NOTIFICATION = ord("A")
B_PARAMETER_DESCRIPTION = ord("t")
B_PARAMETER_STATUS = ord("S")
B_PARSE_COMPLETE = ord("1")
B_PORTAL_SUSPENDED = ord("s")
B_READY_FOR_QUERY = ord("Z")
B_ROW_DESCRIPTION = ord("T")

# Authentication request codes (the int32 after 'R').
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12
