"""Know when a server's response to a command is complete (to reuse server connections safely).

Text and binary result sets: column count, column definitions, (EOF unless DEPRECATE_EOF), rows,
then EOF/OK whose status may say SERVER_MORE_RESULTS_EXISTS (MySQL Internals, "COM_QUERY
Response", "COM_STMT_PREPARE Response").
"""

from __future__ import annotations

import enum
import struct

from .errors import RemoteProtocolError
from .packets import (
    COM_FIELD_LIST,
    COM_QUERY,
    COM_QUIT,
    COM_STMT_CLOSE,
    COM_STMT_EXECUTE,
    COM_STMT_FETCH,
    COM_STMT_PREPARE,
    COM_STMT_SEND_LONG_DATA,
    EOF_HEADER,
    ERR_HEADER,
    LOCAL_INFILE_HEADER,
    MAX_PAYLOAD,
    OK_HEADER,
    SERVER_MORE_RESULTS_EXISTS,
    eof_status,
    ok_status,
    read_lenenc_int,
)

#: Commands the server does not answer.
NO_RESPONSE = frozenset({COM_QUIT, COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA})


class Phase(enum.Enum):
    IDLE = "idle"
    FIRST = "first"
    COLUMNS = "columns"
    COLUMNS_EOF = "columns_eof"
    ROWS = "rows"
    PARAMS = "params"
    PARAMS_EOF = "params_eof"
    FIELD_LIST = "field_list"
    SINGLE = "single"


class ResponseTracker:
    def __init__(self, *, deprecate_eof: bool) -> None:
        self.deprecate_eof = deprecate_eof
        self.phase = Phase.IDLE
        self._command = 0
        self._remaining = 0
        self._columns_after_params = 0

    @property
    def idle(self) -> bool:
        return self.phase is Phase.IDLE

    def start(self, command: int) -> None:
        if self.phase is not Phase.IDLE:
            raise RemoteProtocolError("command sent while a response is pending")
        if command in NO_RESPONSE:
            return
        self._command = command
        if command in (COM_QUERY, COM_STMT_EXECUTE, COM_STMT_PREPARE):
            self.phase = Phase.FIRST
        elif command == COM_STMT_FETCH:
            self.phase = Phase.ROWS
        elif command == COM_FIELD_LIST:
            self.phase = Phase.FIELD_LIST
        else:
            self.phase = Phase.SINGLE

    def _is_terminator(self, payload: bytes) -> bool:
        if not payload or payload[0] != EOF_HEADER:
            return False
        return len(payload) < (MAX_PAYLOAD if self.deprecate_eof else 9)

    def feed(self, payload: bytes) -> bool:
        """One logical packet from the server; True when the response is complete."""
        phase = self.phase
        if phase is Phase.IDLE:
            raise RemoteProtocolError("unexpected packet from server")
        if not payload:
            raise RemoteProtocolError("empty packet from server")
        head = payload[0]
        if head == ERR_HEADER and phase is not Phase.COLUMNS and phase is not Phase.PARAMS:
            self.phase = Phase.IDLE
            return True
        if phase is Phase.SINGLE:
            self.phase = Phase.IDLE
            return True
        if phase is Phase.FIRST:
            return self._first(payload)
        if phase is Phase.COLUMNS or phase is Phase.PARAMS:
            self._remaining -= 1
            if self._remaining == 0:
                if not self.deprecate_eof:
                    self.phase = Phase.COLUMNS_EOF if phase is Phase.COLUMNS else Phase.PARAMS_EOF
                else:
                    return self._after_definitions(phase)
            return False
        if phase is Phase.COLUMNS_EOF or phase is Phase.PARAMS_EOF:
            if not self._is_terminator(payload):
                raise RemoteProtocolError("expected EOF after definitions")
            return self._after_definitions(
                Phase.COLUMNS if phase is Phase.COLUMNS_EOF else Phase.PARAMS
            )
        if phase is Phase.FIELD_LIST:
            if self._is_terminator(payload):
                self.phase = Phase.IDLE
                return True
            return False
        # ROWS
        if self._is_terminator(payload):
            status = ok_status(payload) if self.deprecate_eof else eof_status(payload)
            return self._end_of_result(status)
        return False

    def _first(self, payload: bytes) -> bool:
        head = payload[0]
        if self._command == COM_STMT_PREPARE:
            if head != OK_HEADER or len(payload) < 12:
                raise RemoteProtocolError("bad COM_STMT_PREPARE response")
            columns, params = struct.unpack_from("<HH", payload, 5)
            self._columns_after_params = columns
            if params:
                self.phase, self._remaining = Phase.PARAMS, params
                return False
            return self._after_definitions(Phase.PARAMS)
        if head == OK_HEADER:
            return self._end_of_result(ok_status(payload))
        if head == LOCAL_INFILE_HEADER:
            raise RemoteProtocolError("LOCAL INFILE is not supported through the proxy")
        count, _ = read_lenenc_int(payload, 0)
        if count == 0:
            raise RemoteProtocolError("result set with no columns")
        self.phase, self._remaining = Phase.COLUMNS, count
        return False

    def _after_definitions(self, finished: Phase) -> bool:
        if finished is Phase.PARAMS:
            columns = self._columns_after_params
            self._columns_after_params = 0
            if columns:
                self.phase, self._remaining = Phase.COLUMNS, columns
                self._command = -1  # prepare: column defs end the response
                return False
            self.phase = Phase.IDLE
            return True
        if self._command == -1:
            self.phase = Phase.IDLE
            return True
        self.phase = Phase.ROWS
        return False

    def _end_of_result(self, status: int) -> bool:
        if status & SERVER_MORE_RESULTS_EXISTS:
            self.phase = Phase.FIRST
            return False
        self.phase = Phase.IDLE
        return True
