"""The one exception type of the MySQL codec."""

from __future__ import annotations

ER_NET_PACKETS_OUT_OF_ORDER = 1156
ER_HANDSHAKE_ERROR = 1043  # "Bad handshake", SQLSTATE 08S01


class RemoteProtocolError(Exception):
    """The peer broke the MySQL protocol; answer an ERR packet with ``code``/``sqlstate``."""

    def __init__(
        self, message: str, *, code: int = ER_HANDSHAKE_ERROR, sqlstate: str = "08S01"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.sqlstate = sqlstate
