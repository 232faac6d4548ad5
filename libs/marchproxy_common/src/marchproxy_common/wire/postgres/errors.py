"""The one exception type of the Postgres codec."""

from __future__ import annotations

PROTOCOL_VIOLATION = "08P01"  # SQLSTATE protocol_violation (PostgreSQL Appendix A)


class RemoteProtocolError(Exception):
    """The peer broke the wire protocol; answer ``ErrorResponse`` with ``sqlstate`` and close."""

    def __init__(self, message: str, *, sqlstate: str = PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
