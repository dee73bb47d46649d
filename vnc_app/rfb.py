"""Follows the RFB stream a viewer sends, to spot user input (key and pointer events) and
to hold the clipboard to the template's rules (``ClipboardRules``).

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

Clipboard (the extended clipboard of noVNC and TigerVNC: a ClientCutText with a negative
length, then 4 bytes of flags: actions in the top byte, formats in the low ones). The
watcher hands on (``take``) only what may cross; it holds back the bytes of a message
until the message is whole (small ones; a cut text it lets through streams on at once):

- to the desktop off: every cut text, legacy or extended Notify or Provide, is dropped;
  on: a legacy cut text longer than ``max_to_desktop`` is dropped as it streams, and an
  extended Provide is inflated (at most the limit) and dropped if its text is longer.
- to the browser: the viewer's extended Caps get the limit as the text size they accept
  unasked (noVNC says 0: "never unasked"), and every extended Request is dropped. So
  Xvnc sends a clipboard by itself only when it fits the limit, and only announces a
  larger one, which nobody can then ask for (TigerVNC's SConnection::announceClipboard).
  Off: the same, with a limit of 0, so nothing is ever sent (Xvnc's -SendCutText=0 too).

What cannot be followed (RFB 3.3, where the server alone picks the security type; a
security type that wraps the stream, such as VeNCrypt's TLS; a message type or QEMU
submessage not listed above, whose length is unknown) stops the watching for this
connection with one log line: a guessed length would misread every later byte. ``lost``
is set and from then on every byte is handed on untouched; the relay closes such a
connection when a clipboard direction is off (``ClipboardRules.restricts``), since it
could no longer drop what must not cross. Nothing here raises on any input.
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass

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


# Extended clipboard flags (top byte: actions; low bytes: formats, bit 0 = UTF-8 text).
CLIP_CAPS, CLIP_REQUEST, CLIP_PEEK, CLIP_NOTIFY, CLIP_PROVIDE = 1 << 24, 1 << 25, 1 << 26, 1 << 27, 1 << 28
CLIP_TEXT = 1
PROVIDE_SLACK = 1024  # deflate may grow incompressible text a little; beyond this it is too long anyway


@dataclass(frozen=True)
class ClipboardRules:
    """What a viewer's clipboard may carry, per direction (sessions_app.clipboard)."""

    to_desktop: bool = True
    to_browser: bool = True
    max_to_desktop: int = 1 << 20  # bytes of UTF-8 text
    max_to_browser: int = 1 << 20

    @property
    def restricts(self) -> bool:
        """A direction is off: a stream that cannot be followed must not be relayed."""
        return not (self.to_desktop and self.to_browser)


class _Unfollowable(Exception):
    """The stream can no longer be parsed; the message says why."""


class ClientStreamWatcher:
    def __init__(self, clipboard: ClipboardRules | None = None) -> None:
        self.rules = clipboard or ClipboardRules()
        self._buf = bytearray()
        self._out = bytearray()  # bytes that may go on to the desktop
        self._stage = "version"
        self._skip = 0  # bytes of a long cut text still to come, passed or dropped as they arrive
        self._skip_passes = False
        self._extended_pointer = False  # the viewer announced ExtendedMouseButtons
        self.lost = False  # True once the stream can no longer be followed
        self.dropped_cut_texts = 0  # clipboard messages the rules held back

    def take(self) -> bytes:
        """The bytes fed so far that may go on to the desktop (each handed out once)."""
        out, self._out = bytes(self._out), bytearray()
        return out

    def feed(self, data: bytes) -> bool:
        """Consume bytes the viewer sent; True if they held a key or pointer event."""
        if self.lost:
            self._out += data
            return False
        if self._skip:
            n = min(self._skip, len(data))
            if self._skip_passes:
                self._out += data[:n]
            self._skip -= n
            data = data[n:]
        self._buf += data
        saw_input = False
        try:
            while (step := self._step()) is not None:
                saw_input |= step
        except _Unfollowable as exc:
            log.warning("RFB watcher: stopped following a viewer's stream (%s); its input is no longer recorded", exc)
            self.lost = True
            self._out += self._buf
            self._buf = bytearray()
        return saw_input

    def _take(self, n: int) -> bytes | None:
        """The next n bytes, handed on to the desktop; None until they are all here."""
        if len(self._buf) < n:
            return None
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        self._out += chunk
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
        if kind == CLIENT_CUT_TEXT:
            return self._cut_text(length)
        message = self._take(length)
        if message is None:
            return None
        if kind == SET_ENCODINGS:
            count = (length - 4) // 4
            self._extended_pointer = ENCODING_EXTENDED_MOUSE_BUTTONS in struct.unpack_from(f">{count}i", message, 4)
        return kind in (KEY_EVENT, POINTER_EVENT, QEMU)

    def _cut_text(self, length: int) -> bool | None:
        """Pass, change or drop the cut text at the head of the buffer; None when more is needed."""
        rules, buf = self.rules, self._buf
        extended = struct.unpack_from(">i", buf, 4)[0] < 0
        if not extended:
            passes = rules.to_desktop and length - 8 <= rules.max_to_desktop
            return self._stream(length, passes)
        if len(buf) < 12:
            return None
        flags = struct.unpack_from(">I", buf, 8)[0]
        if flags & CLIP_CAPS:
            if len(buf) < length:
                return None
            message = bytearray(self._drop(length))
            if flags & CLIP_TEXT and length >= 16:
                # The text size the viewer accepts unasked: at most the limit (0 when off).
                limit = rules.max_to_browser if rules.to_browser else 0
                asked = struct.unpack_from(">I", message, 12)[0]
                struct.pack_into(">I", message, 12, min(asked, limit) if asked else limit)
            self._out += message
            return False
        if flags & CLIP_REQUEST:
            return self._stream(length, False)
        if flags & CLIP_NOTIFY:
            return self._stream(length, rules.to_desktop)
        if flags & CLIP_PROVIDE:
            if not rules.to_desktop or length - 12 > rules.max_to_desktop + PROVIDE_SLACK:
                return self._stream(length, False)
            if len(buf) < length:
                return None
            message = self._drop(length)
            if _provided_text_fits(message[12:], flags, rules.max_to_desktop):
                self._out += message
            else:
                self.dropped_cut_texts += 1
            return False
        return self._stream(length, True)  # Peek, or actions this watcher has no rule for

    def _stream(self, length: int, passes: bool) -> bool:
        """Hand on (or drop) a message of this length as its bytes arrive, never buffering it."""
        if not passes:
            self.dropped_cut_texts += 1
        here = min(length, len(self._buf))
        if passes:
            self._out += self._buf[:here]
        del self._buf[:here]
        self._skip, self._skip_passes = length - here, passes
        return False

    def _drop(self, n: int) -> bytes:
        """The next n bytes (all here), not handed on."""
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

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


def _provided_text_fits(deflated: bytes, flags: int, limit: int) -> bool:
    """True if an extended Provide carries UTF-8 text of at most ``limit`` bytes (and a NUL)."""
    if not flags & CLIP_TEXT:
        return True  # formats other than text: TigerVNC ignores them, and so do the rules
    inflater = zlib.decompressobj()
    try:
        head = inflater.decompress(deflated, 4)
        if len(head) < 4:
            return False
        (size,) = struct.unpack(">I", head)
        return size <= limit + 1  # the text's length counts its closing NUL
    except zlib.error:
        return False
