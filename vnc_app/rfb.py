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
length, then 4 bytes of flags: actions in the top byte, formats in the low ones; the
action is read as TigerVNC's SMsgReader::readExtendedClipboard reads it: Caps by its bit,
Provide, Request, Peek and Notify by equality, and any other action, which Xvnc would
close the connection on, is dropped). The watcher hands on (``take``) only what may cross:

- to the desktop off: every cut text, legacy or extended Notify or Provide, is dropped;
  on: a legacy cut text longer than ``max_to_desktop`` is dropped as it streams, and an
  extended Provide is inflated (at most the limit) and dropped if its text is longer.
- to the browser: the viewer's extended Caps get the limit as the text size they accept
  unasked (noVNC says 0: "never unasked"; Caps that leave text out get it added, as Xvnc
  keeps 20 MiB for a format not listed), and every extended Request is dropped. A viewer
  that announces the extended clipboard in SetEncodings gets Caps with the limit sent
  for it right after them (Xvnc assumes 20 MiB unasked until the viewer's own Caps
  arrive, and a viewer may never send any). So Xvnc sends a clipboard by itself only
  when it fits the limit, and only announces a larger one, which nobody can then ask
  for (TigerVNC's SConnection::announceClipboard). Off: the same, with a limit of 0, so
  nothing is ever sent (Xvnc's -SendCutText=0 too).

What is held back until it is whole, and its bound (every other message, and a cut text
that is let through or dropped, streams on as its bytes arrive): a fixed-length message
(at most 20 bytes), SetEncodings (at most 4 + 4 x 65535 bytes), a fence (264), a
SetDesktopSize (4088), a Caps (at most 8 + 68 bytes; a longer one is no valid Caps and is
dropped as it streams), and an extended Provide that may cross (at most 12 bytes +
``max_to_desktop`` + PROVIDE_SLACK; a longer one is dropped as it streams).

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
CLIP_ACTIONS = 0xFF000000
CLIP_TEXT = 1
ENCODING_EXTENDED_CLIPBOARD = -1063131698  # 0xC0A1E5CE
MAX_CAPS = 4 + 4 * 16  # a Caps body: its flags, then one size per format listed (16 at most)
# What the relay says for a viewer that announces the extended clipboard: until its own
# Caps arrive, Xvnc would assume these actions and 20 MiB of text taken unasked.
SYNTHETIC_CAPS_ACTIONS = CLIP_CAPS | CLIP_REQUEST | CLIP_NOTIFY | CLIP_PROVIDE
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
        self._caps_said = False  # Caps were sent for a viewer that announced the extended clipboard
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
            encodings = struct.unpack_from(f">{(length - 4) // 4}i", message, 4)
            self._extended_pointer = ENCODING_EXTENDED_MOUSE_BUTTONS in encodings
            if ENCODING_EXTENDED_CLIPBOARD in encodings and not self._caps_said:
                # Xvnc's default for such a viewer is 20 MiB unasked: say the limit at once.
                self._caps_said = True
                self._out += self._caps(struct.pack(">I", SYNTHETIC_CAPS_ACTIONS | CLIP_TEXT) + bytes(4))
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
        action = flags & CLIP_ACTIONS
        # Dispatched as TigerVNC's SMsgReader::readExtendedClipboard does: Caps by its bit,
        # every other action by equality (Xvnc closes the connection on any other value).
        if action & CLIP_CAPS:
            if length - 8 > MAX_CAPS:
                return self._stream(length, False)  # no valid Caps is this long: never buffered
            if len(buf) < length:
                return None
            caps = self._caps(self._drop(length)[8:])
            if caps is None:
                self.dropped_cut_texts += 1
            else:
                self._out += caps
            return False
        if action == CLIP_PROVIDE:
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
        if action == CLIP_NOTIFY:
            return self._stream(length, rules.to_desktop)
        if action == CLIP_PEEK:
            return self._stream(length, True)  # asks the desktop to announce its clipboard
        return self._stream(length, False)  # a Request, or an action Xvnc does not know

    def _caps(self, body: bytes) -> bytes | None:
        """The viewer's Caps as they go on: the UTF-8 text size the viewer takes unasked is
        at most the limit (0 when off), text listed or not (Xvnc keeps its default of 20 MiB
        for a format the Caps leave out). None if the sizes are missing (Xvnc would close)."""
        flags = struct.unpack_from(">I", body)[0]
        formats = [i for i in range(16) if flags & (1 << i)]
        if len(body) < 4 + 4 * len(formats):
            return None
        sizes = dict(zip(formats, struct.unpack_from(f">{len(formats)}I", body, 4), strict=True))
        limit = self.rules.max_to_browser if self.rules.to_browser else 0
        asked = sizes.get(0, 0)
        sizes[0] = min(asked, limit) if asked else limit
        return _extended(flags | CLIP_TEXT, [sizes[i] for i in sorted(sizes)])

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


def _extended(flags: int, values: list[int]) -> bytes:
    """An extended clipboard message: a ClientCutText of negative length, flags, then values."""
    body = struct.pack(f">I{len(values)}I", flags, *values)
    return struct.pack(">Bxxxi", CLIENT_CUT_TEXT, -len(body)) + body


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
