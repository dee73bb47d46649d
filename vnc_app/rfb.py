"""Follows the RFB stream a viewer sends, to spot user input (key and pointer events).

Only the client side is parsed: ProtocolVersion (12 bytes), the chosen security type
(1 byte), the VncAuth response (16 bytes, when type 2), ClientInit (1 byte), then client
messages, each skipped by its length. Every client message noVNC 1.7 sends is known
(``node_modules/@novnc/novnc/core/rfb.js``, ``RFB.messages``), and the common
extensions besides:

    type  message                        length
    0     SetPixelFormat                 20
    2     SetEncodings                   4 + 4 x count
    3     FramebufferUpdateRequest       10
    4     KeyEvent                       8              input
    5     PointerEvent                   6, or 7 when extended (see below)   input
    6     ClientCutText                  8 + |length|   (negative length: extended clipboard)
    150   EnableContinuousUpdates        10
    248   ClientFence                    9 + payload length
    250   xvp                            4
    251   SetDesktopSize                 8 + 16 x screens
    255   QEMU: 0 extended key event     12             input

An ExtendedMouseButtons pointer event (7 bytes) has the top bit of its button mask set;
a client may send it only after announcing the pseudo-encoding -316 in SetEncodings, so
without that announcement the top bit is button 8 of a plain 6-byte event.

What cannot be followed (RFB 3.3, where the server alone picks the security type; a
security type that wraps the stream, such as VeNCrypt's TLS; a message type or QEMU
submessage not listed above, whose length is unknown) stops the watching for this
connection with one log line: a guessed length would misread every later byte. The bytes
are still relayed untouched; only input activity is no longer recorded for that viewer.
Nothing here raises on any input: the relay never depends on the stream being well formed.
"""

from __future__ import annotations

import logging
import struct

log = logging.getLogger(__name__)

SET_PIXEL_FORMAT, SET_ENCODINGS, FB_UPDATE_REQUEST, KEY_EVENT, POINTER_EVENT, CLIENT_CUT_TEXT = 0, 2, 3, 4, 5, 6
ENABLE_CONTINUOUS_UPDATES, CLIENT_FENCE, XVP, SET_DESKTOP_SIZE, QEMU = 150, 248, 250, 251, 255
QEMU_EXTENDED_KEY_EVENT = 0
ENCODING_EXTENDED_MOUSE_BUTTONS = -316

_FIXED = {
    SET_PIXEL_FORMAT: 20,
    FB_UPDATE_REQUEST: 10,
    KEY_EVENT: 8,
    ENABLE_CONTINUOUS_UPDATES: 10,
    XVP: 4,
}
# Messages whose length is in their header: how many bytes of header say it.
_HEADER = {SET_ENCODINGS: 4, CLIENT_CUT_TEXT: 8, POINTER_EVENT: 2, CLIENT_FENCE: 9, SET_DESKTOP_SIZE: 8, QEMU: 2}


class _Unfollowable(Exception):
    """The stream can no longer be parsed; the message says why."""


class ClientStreamWatcher:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._stage = "version"
        self._skip = 0  # bytes of a long cut text still to come, dropped as they arrive
        self._extended_pointer = False  # the viewer announced ExtendedMouseButtons
        self.lost = False  # True once the stream can no longer be followed

    def feed(self, data: bytes) -> bool:
        """Consume bytes the viewer sent; True if they held a key or pointer event."""
        if self.lost:
            return False
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        self._buf += data
        saw_input = False
        try:
            while (step := self._step()) is not None:
                saw_input |= step
        except _Unfollowable as exc:
            log.warning("RFB watcher: stopped following a viewer's stream (%s); its input is no longer recorded", exc)
            self.lost, self._buf = True, bytearray()
        return saw_input

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    def _step(self) -> bool | None:
        """Consume one unit; True/False whether it was input, None when more bytes are needed."""
        if self._stage == "messages":
            return self._message()
        if self._stage == "version":
            version = self._take(12)
            if version is None:
                return None
            if not version.startswith(b"RFB ") or version[4:11] == b"003.003":
                raise _Unfollowable(f"protocol version {version!r}: the server alone picks the security type")
            self._stage = "security"
        elif self._stage == "security":
            chosen = self._take(1)
            if chosen is None:
                return None
            if chosen[0] not in (1, 2):
                raise _Unfollowable(f"security type {chosen[0]} wraps the stream")
            self._stage = "auth" if chosen[0] == 2 else "init"
        elif self._stage == "auth":
            if self._take(16) is None:
                return None
            self._stage = "init"
        elif self._stage == "init":
            if self._take(1) is None:
                return None
            self._stage = "messages"
        return False

    def _message(self) -> bool | None:
        length = self._length()
        if length is None:
            return None
        kind = self._buf[0]
        if kind == CLIENT_CUT_TEXT and len(self._buf) < length:
            # Up to 2 GiB of clipboard we never read: drop it as it streams, never buffer it.
            self._skip = length - len(self._buf)
            self._buf.clear()
            return False
        message = self._take(length)
        if message is None:
            return None
        if kind == SET_ENCODINGS:
            count = (length - 4) // 4
            self._extended_pointer = ENCODING_EXTENDED_MOUSE_BUTTONS in struct.unpack_from(f">{count}i", message, 4)
        return kind in (KEY_EVENT, POINTER_EVENT, QEMU)

    def _length(self) -> int | None:
        """The whole length of the message at the head of the buffer; None if its header is incomplete."""
        buf = self._buf
        if not buf:
            return None
        kind = buf[0]
        if kind in _FIXED:
            return _FIXED[kind]
        if kind not in _HEADER:
            raise _Unfollowable(f"unknown client message type {kind}")
        if len(buf) < _HEADER[kind]:
            return None
        if kind == SET_ENCODINGS:
            return 4 + 4 * struct.unpack_from(">H", buf, 2)[0]
        if kind == CLIENT_CUT_TEXT:
            return 8 + abs(struct.unpack_from(">i", buf, 4)[0])
        if kind == POINTER_EVENT:
            return 7 if self._extended_pointer and buf[1] & 0x80 else 6
        if kind == CLIENT_FENCE:
            return 9 + buf[8]
        if kind == SET_DESKTOP_SIZE:
            return 8 + 16 * buf[6]
        if buf[1] != QEMU_EXTENDED_KEY_EVENT:
            raise _Unfollowable(f"unknown QEMU client submessage {buf[1]}")
        return 12
