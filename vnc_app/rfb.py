"""Follows the RFB stream a viewer sends, to spot user input (key and pointer events).

Only the client side is parsed: ProtocolVersion (12 bytes), the chosen security type
(1 byte), the VncAuth response (16 bytes, when type 2), ClientInit (1 byte), then client
messages. Security types other than None and VncAuth wrap the stream in something we
cannot follow; the parser then stops looking (bytes are still relayed untouched).
"""

from __future__ import annotations

import struct

SET_PIXEL_FORMAT, SET_ENCODINGS, FB_UPDATE_REQUEST, KEY_EVENT, POINTER_EVENT, CLIENT_CUT_TEXT = 0, 2, 3, 4, 5, 6
_FIXED = {SET_PIXEL_FORMAT: 20, FB_UPDATE_REQUEST: 10, KEY_EVENT: 8, POINTER_EVENT: 6}
INPUT_MESSAGES = frozenset({KEY_EVENT, POINTER_EVENT})


class ClientStreamWatcher:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._stage = "version"
        self.lost = False  # True once the stream can no longer be followed

    def feed(self, data: bytes) -> bool:
        """Consume bytes the viewer sent; True if they held a key or pointer event."""
        if self.lost:
            return False
        self._buf += data
        saw_input = False
        while True:
            step = self._step()
            if step is None:
                break
            saw_input |= step
        if len(self._buf) > 1 << 20:  # a cut-text message larger than this is not worth following
            self.lost, self._buf = True, bytearray()
        return saw_input

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    def _step(self) -> bool | None:
        """Consume one unit; None when more bytes are needed."""
        if self._stage == "version":
            if self._take(12) is None:
                return None
            self._stage = "security"
            return False
        if self._stage == "security":
            chosen = self._take(1)
            if chosen is None:
                return None
            if chosen[0] == 2:
                self._stage = "auth"
            elif chosen[0] == 1:
                self._stage = "init"
            else:
                self.lost, self._buf = True, bytearray()
                return None
            return False
        if self._stage == "auth":
            if self._take(16) is None:
                return None
            self._stage = "init"
            return False
        if self._stage == "init":
            if self._take(1) is None:
                return None
            self._stage = "messages"
            return False
        if not self._buf:
            return None
        kind = self._buf[0]
        if kind in _FIXED:
            return None if self._take(_FIXED[kind]) is None else kind in INPUT_MESSAGES
        if kind == SET_ENCODINGS:
            if len(self._buf) < 4:
                return None
            (count,) = struct.unpack_from(">H", self._buf, 2)
            return None if self._take(4 + 4 * count) is None else False
        if kind == CLIENT_CUT_TEXT:
            if len(self._buf) < 8:
                return None
            (length,) = struct.unpack_from(">I", self._buf, 4)
            return None if self._take(8 + length) is None else False
        self.lost, self._buf = True, bytearray()  # an extension we do not know
        return None
