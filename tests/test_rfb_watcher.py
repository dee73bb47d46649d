"""Spotting user input in the RFB stream a viewer sends, and holding its clipboard to the rules.

The messages are built byte for byte as noVNC 1.7 builds them (``RFB.messages`` in
``node_modules/@novnc/novnc/core/rfb.js``), and a stream real noVNC sent is replayed."""

import base64
import logging
import random
import struct
import zlib
from collections import Counter
from pathlib import Path

import pytest

from vnc_app.rfb import (
    CLIP_CAPS,
    CLIP_NOTIFY,
    CLIP_PEEK,
    CLIP_PROVIDE,
    CLIP_REQUEST,
    ClientStreamWatcher,
    ClipboardRules,
)

HANDSHAKE = b"RFB 003.008\n" + b"\x02" + b"r" * 16 + b"\x01"


def set_pixel_format(depth=24):
    bits = depth // 3
    return (
        b"\x00\x00\x00\x00"
        + bytes([32, depth, 0, 1])
        + struct.pack(">HHH", (1 << bits) - 1, (1 << bits) - 1, (1 << bits) - 1)
        + bytes([0, bits, 2 * bits])
        + b"\x00\x00\x00"
    )


def set_encodings(*encodings):
    return b"\x02\x00" + struct.pack(">H", len(encodings)) + b"".join(struct.pack(">i", e) for e in encodings)


def update_request(incremental=True):
    return b"\x03" + bytes([incremental]) + struct.pack(">HHHH", 0, 0, 1280, 800)


def key_event(keysym=0x61, down=True):
    return b"\x04" + bytes([down]) + b"\x00\x00" + struct.pack(">I", keysym)


def qemu_key_event(keysym=0x61, down=True, keycode=0x1E):
    return b"\xff\x00" + struct.pack(">HII", down, keysym, keycode)


def pointer_event(x=10, y=20, mask=0):
    return b"\x05" + bytes([mask & 0x7F]) + struct.pack(">HH", x, y)


def extended_pointer_event(x=10, y=20, mask=0x100):
    return b"\x05" + bytes([(mask & 0x7F) | 0x80]) + struct.pack(">HH", x, y) + bytes([(mask >> 7) & 0xFF])


def cut_text(data: bytes, extended=False):
    length = (-len(data)) & 0xFFFFFFFF if extended else len(data)
    return b"\x06\x00\x00\x00" + struct.pack(">I", length) + data


def enable_continuous_updates(enable=True):
    return b"\x96" + bytes([enable]) + struct.pack(">HHHH", 0, 0, 1280, 800)


def client_fence(flags=0x80000002, payload=b"\x04"):
    return b"\xf8\x00\x00\x00" + struct.pack(">I", flags) + bytes([len(payload)]) + payload


def xvp(op=2):
    return b"\xfa\x00\x01" + bytes([op])


def set_desktop_size(width=1366, height=900, screens=1):
    screen = struct.pack(">IHHHHI", 0, 0, 0, width, height, 0)
    return b"\xfb\x00" + struct.pack(">HH", width, height) + bytes([screens, 0]) + screen * screens


# What noVNC 1.7 sends TigerVNC's Xvnc before any input (its connect sequence, the
# extended-clipboard caps answer, then the fence and continuous-updates exchange).
NOVNC_SETUP = (
    HANDSHAKE
    + set_pixel_format()
    + set_encodings(7, 16, 5, 1, 0, -260, -258, -261, -307, -308, -309, -312, -313, -316, -239, 0x574D5664)
    + update_request(incremental=False)
    + cut_text(b"\x1f\x00\x00\x01" + b"\x00\x00\x10\x00", extended=True)
    + client_fence()
    + enable_continuous_updates()
)

NOT_INPUT = {
    "SetPixelFormat": set_pixel_format(),
    "SetEncodings": set_encodings(7, 16, -258, -312, -313),
    "FramebufferUpdateRequest": update_request(),
    "ClientCutText": cut_text(b"\x04\x04\x04\x04\x04"),  # the payload looks like key events
    "ClientCutText extended": cut_text(b"\x10\x00\x00\x01" + b"x\x9c" + b"\x05" * 12, extended=True),
    "EnableContinuousUpdates": enable_continuous_updates(),
    "ClientFence": client_fence(payload=b"\x05" * 10),
    "ClientFence empty": client_fence(payload=b""),
    "xvp": xvp(),
    "SetDesktopSize": set_desktop_size(),
    "SetDesktopSize two screens": set_desktop_size(screens=2),
}

INPUT = {
    "KeyEvent": key_event(),
    "PointerEvent": pointer_event(),
    "QEMU extended key event": qemu_key_event(),
}


@pytest.mark.parametrize("message", NOT_INPUT.values(), ids=NOT_INPUT.keys())
def test_every_message_novnc_sends_is_skipped_by_its_length(message):
    watcher = ClientStreamWatcher()
    watcher.feed(HANDSHAKE)
    assert watcher.feed(message) is False
    assert watcher.feed(key_event()) is True  # still in step with the stream
    assert not watcher.lost


@pytest.mark.parametrize("message", NOT_INPUT.values(), ids=NOT_INPUT.keys())
def test_messages_split_into_single_bytes_are_followed(message):
    watcher = ClientStreamWatcher()
    stream = HANDSHAKE + message + pointer_event()
    seen = [watcher.feed(stream[i : i + 1]) for i in range(len(stream))]
    assert seen == [False] * (len(stream) - 1) + [True]


@pytest.mark.parametrize("message", INPUT.values(), ids=INPUT.keys())
def test_key_pointer_and_qemu_key_events_are_input(message):
    watcher = ClientStreamWatcher()
    assert watcher.feed(NOVNC_SETUP) is False
    assert watcher.feed(message[:3]) is False
    assert watcher.feed(message[3:]) is True
    assert watcher.feed(update_request() + client_fence()) is False
    assert not watcher.lost


def test_novnc_setup_then_typing_is_followed():
    """The stream the watcher once stopped at (the fence): setup, then QEMU key events."""
    watcher = ClientStreamWatcher()
    assert watcher.feed(NOVNC_SETUP) is False
    assert watcher.feed(qemu_key_event(down=True) + qemu_key_event(down=False)) is True
    assert not watcher.lost


def test_an_extended_pointer_event_is_seven_bytes_once_announced():
    watcher = ClientStreamWatcher()
    watcher.feed(HANDSHAKE + set_encodings(7, -316))
    assert watcher.feed(extended_pointer_event()) is True
    assert watcher.feed(key_event()) is True
    assert not watcher.lost


def test_without_the_announcement_the_top_mask_bit_is_button_8_of_a_plain_event():
    watcher = ClientStreamWatcher()
    watcher.feed(HANDSHAKE + set_encodings(7))
    assert watcher.feed(b"\x05\x80" + struct.pack(">HH", 1, 2)) is True
    assert watcher.feed(update_request()) is False
    assert watcher.feed(key_event()) is True
    assert not watcher.lost


def test_a_long_cut_text_is_dropped_as_it_streams_not_buffered():
    watcher = ClientStreamWatcher()
    watcher.feed(HANDSHAKE)
    size = 3 << 20
    assert watcher.feed(cut_text(b"")[:4] + struct.pack(">I", size)) is False
    chunk = key_event() * 8192  # 64 KiB that look like key events
    for _ in range(size // len(chunk)):
        assert watcher.feed(chunk) is False
        assert len(watcher._buf) == 0
    assert watcher.feed(key_event()) is True
    assert not watcher.lost


@pytest.mark.parametrize(
    "stream, why",
    [
        (HANDSHAKE + b"\x07\x00\x00\x00", "unknown client message type 7"),
        (HANDSHAKE + b"\xff\x01\x00\x00", "unknown QEMU client submessage 1"),
        (b"RFB 003.008\n" + b"\x13", "security type 19 wraps the stream"),
        (b"RFB 003.003\n" + b"r" * 16, "the server alone picks the security type"),
    ],
    ids=["unknown type", "unknown QEMU submessage", "VeNCrypt", "RFB 3.3"],
)
def test_what_cannot_be_followed_stops_the_watching_with_one_log_line(stream, why, caplog):
    watcher = ClientStreamWatcher()
    with caplog.at_level(logging.WARNING, logger="vnc_app.rfb"):
        assert watcher.feed(stream + key_event()) is False
        assert watcher.feed(key_event()) is False
    assert watcher.lost
    assert [why in r.getMessage() for r in caplog.records] == [True]


def test_security_none_has_no_auth_response():
    watcher = ClientStreamWatcher()
    assert watcher.feed(b"RFB 003.008\n\x01\x01" + pointer_event()) is True


def test_any_bytes_at_all_never_raise():
    rng = random.Random(9)
    for _ in range(300):
        watcher = ClientStreamWatcher()
        stream = HANDSHAKE + rng.randbytes(rng.randrange(1, 400))
        while stream:
            cut = rng.randrange(1, 40)
            watcher.feed(stream[:cut])
            stream = stream[cut:]


# --- what real noVNC sent, and the clipboard rules -----------------------------------------

# Every byte noVNC 1.7 in Chromium sent TigerVNC 1.12 through the relay in
# tests/browser/test_viewer_clipboard.py (STREAMSPACE_CAPTURE_RFB=<file> writes it):
# the handshake, 49 SetDesktopSize as the window was resized and made full screen,
# 108 EnableContinuousUpdates and 87 fences, the extended clipboard (Caps, Notify,
# Provide both ways), QEMU extended key events and pointer events.
CAPTURED = base64.b64decode((Path(__file__).parent / "data" / "novnc-client-stream.b64").read_bytes())
TEXT_LIMIT = 1 << 20


def split_messages(stream: bytes) -> list[bytes]:
    """The captured client messages, cut by lengths written out here (not the watcher's)."""
    rest, out = stream[30:], [stream[:30]]  # version, security type, VncAuth response, ClientInit
    fixed = {0: 20, 3: 10, 4: 8, 150: 10, 255: 12, 5: 6}
    while rest:
        kind = rest[0]
        if kind in fixed:
            n = fixed[kind]
        elif kind == 2:
            n = 4 + 4 * struct.unpack_from(">H", rest, 2)[0]
        elif kind == 6:
            n = 8 + abs(struct.unpack_from(">i", rest, 4)[0])
        elif kind == 248:
            n = 9 + rest[8]
        elif kind == 251:
            n = 8 + 16 * rest[6]
        else:
            raise AssertionError(f"message type {kind} in the capture")
        out.append(rest[:n])
        rest = rest[n:]
    return out


MESSAGES = split_messages(CAPTURED)


def clip_flags(message: bytes) -> int | None:
    """The extended clipboard flags of a message, None for any other message."""
    if message[0] != 6 or struct.unpack_from(">i", message, 4)[0] >= 0:
        return None
    return struct.unpack_from(">I", message, 8)[0]


def rewritten_caps(message: bytes, size: int) -> bytes:
    return message[:12] + struct.pack(">I", size) + message[16:]


def synthetic_caps(size: int) -> bytes:
    """The Caps the watcher sends after the SetEncodings that announce the extended clipboard."""
    body = struct.pack(">II", CLIP_CAPS | CLIP_REQUEST | CLIP_NOTIFY | CLIP_PROVIDE | 1, size)
    return b"\x06\x00\x00\x00" + struct.pack(">i", -len(body)) + body


def as_relayed(messages: list[bytes], size: int) -> bytes:
    """The capture as the watcher hands it on: the Caps say ``size``, and synthetic Caps
    follow the (first) SetEncodings, which announce the extended clipboard."""
    out = b""
    for m in messages:
        out += rewritten_caps(m, size) if (clip_flags(m) or 0) & CLIP_CAPS else m
        if m[0] == 2 and m is next(x for x in messages if x[0] == 2):
            out += synthetic_caps(size)
    return out


def test_the_capture_holds_what_the_brief_says_novnc_sends():
    kinds = Counter(m[0] for m in MESSAGES[1:])
    assert {251, 150, 248, 255, 6, 5} <= set(kinds), kinds
    actions = [clip_flags(m) >> 24 for m in MESSAGES if clip_flags(m) is not None]
    assert 0x1F in actions and 0x08 in actions and 0x10 in actions  # Caps, Notify, Provide


@pytest.mark.parametrize("chunk", [len(CAPTURED), 1, 7, 100], ids=lambda n: f"{n}-byte chunks")
def test_the_real_novnc_stream_is_followed_to_its_end_and_handed_on(chunk):
    watcher = ClientStreamWatcher()
    out, saw = b"", False
    for i in range(0, len(CAPTURED), chunk):
        saw |= watcher.feed(CAPTURED[i : i + chunk])
        out += watcher.take()
    assert saw and not watcher.lost and watcher._stage == "messages" and not watcher._buf
    # Everything goes on untouched, but for the Caps: the text noVNC takes unasked is the limit.
    assert out == as_relayed(MESSAGES, TEXT_LIMIT)
    assert watcher.dropped_cut_texts == 0


def test_with_the_clipboard_to_the_desktop_off_its_notify_and_provide_are_dropped():
    watcher = ClientStreamWatcher(ClipboardRules(to_desktop=False))
    watcher.feed(CAPTURED)

    def offers_text(m):  # a Notify or a Provide (the Caps list those actions too)
        flags = clip_flags(m)
        return flags is not None and not flags & CLIP_CAPS and bool(flags & (CLIP_NOTIFY | CLIP_PROVIDE))

    kept = [m for m in MESSAGES if not offers_text(m)]
    assert len(kept) == len(MESSAGES) - 4
    assert watcher.take() == as_relayed(kept, TEXT_LIMIT)
    assert watcher.feed(key_event()) and watcher.take() == key_event()  # still in step


def test_with_the_clipboard_to_the_browser_off_the_caps_accept_nothing_and_requests_are_dropped():
    rules = ClipboardRules(to_browser=False)
    watcher = ClientStreamWatcher(rules)
    request = cut_text(struct.pack(">I", CLIP_REQUEST | 1), extended=True)
    watcher.feed(CAPTURED + request + key_event())
    out = watcher.take()
    assert out.endswith(key_event()) and request not in out
    caps = next(m for m in MESSAGES if (clip_flags(m) or 0) & CLIP_CAPS)
    assert rewritten_caps(caps, 0) in out


def test_a_request_for_the_desktops_clipboard_is_always_dropped():
    """Xvnc sends its clipboard unasked when it fits the Caps' limit; a larger one it only
    announces, and the viewer's Request for it never reaches Xvnc."""
    watcher = ClientStreamWatcher()
    request = cut_text(struct.pack(">I", CLIP_REQUEST | 1), extended=True)
    watcher.feed(HANDSHAKE + request + pointer_event())
    assert watcher.take() == HANDSHAKE + pointer_event()


def provide(text: bytes) -> bytes:
    deflated = zlib.compress(struct.pack(">I", len(text) + 1) + text + b"\0")
    return cut_text(struct.pack(">I", CLIP_PROVIDE | 1) + deflated, extended=True)


def test_a_provide_longer_than_the_limit_is_dropped_however_well_it_compresses():
    watcher = ClientStreamWatcher(ClipboardRules(max_to_desktop=1000))
    fits, too_long = provide("é".encode() * 500), provide(b"a" * 1001)
    assert len(too_long) < 100  # deflated: only the text's own length tells
    watcher.feed(HANDSHAKE + fits + too_long + key_event())
    assert watcher.take() == HANDSHAKE + fits + key_event()
    assert watcher.dropped_cut_texts == 1


def test_a_legacy_cut_text_over_the_limit_is_dropped_as_it_streams():
    watcher = ClientStreamWatcher(ClipboardRules(max_to_desktop=1000))
    watcher.feed(HANDSHAKE)
    watcher.take()
    watcher.feed(cut_text(b"x" * 1000))
    assert watcher.take() == cut_text(b"x" * 1000)
    watcher.feed(cut_text(b"")[:4] + struct.pack(">I", 5000) + b"y" * 3000)
    assert watcher.take() == b"" and not watcher._buf
    watcher.feed(b"y" * 2000 + key_event())
    assert watcher.take() == key_event()


def test_a_stream_that_cannot_be_followed_is_handed_on_untouched():
    watcher = ClientStreamWatcher()
    watcher.feed(b"RFB 003.003\n" + b"r" * 16)
    watcher.feed(b"anything")
    assert watcher.lost and watcher.take() == b"RFB 003.003\n" + b"r" * 16 + b"anything"
    assert not watcher.rules.restricts and ClipboardRules(to_browser=False).restricts


# --- bounds: nothing a viewer sends is buffered without a hard cap ---------------------------

CAPS_HEADER = cut_text(b"")[:4]


def test_a_caps_longer_than_any_valid_one_is_dropped_as_it_streams_not_buffered():
    """Declared 16 MiB long, then streamed: the watcher holds none of it and stays in step."""
    watcher = ClientStreamWatcher()
    watcher.feed(HANDSHAKE)
    watcher.take()
    size = 16 << 20
    watcher.feed(CAPS_HEADER + struct.pack(">i", -(size + 4)) + struct.pack(">I", CLIP_CAPS | 1))
    chunk = key_event() * 8192
    for _ in range(size // len(chunk)):
        assert watcher.feed(chunk) is False
        assert len(watcher._buf) < 100 and watcher.take() == b""
    assert watcher.feed(key_event()) is True and watcher.take() == key_event()
    assert watcher.dropped_cut_texts == 1 and not watcher.lost


def bounds():
    """Each message the watcher buffers whole, at its largest, and the most it may hold of it."""
    rules = ClipboardRules(max_to_desktop=1000)
    provide_bound = 8 + 4 + rules.max_to_desktop + 1024

    def extended_header(flags, body_length):
        return CAPS_HEADER + struct.pack(">iI", -body_length, flags | 1)

    return rules, [
        ("SetEncodings", b"\x02\x00\xff\xff", 4 + 4 * 0xFFFF),
        ("ClientFence", b"\xf8\x00\x00\x00" + struct.pack(">I", 0) + b"\xff", 9 + 255),
        ("SetDesktopSize", b"\xfb\x00" + struct.pack(">HH", 1, 1) + b"\xff\x00", 8 + 16 * 255),
        ("Caps", extended_header(CLIP_CAPS | 0xFFFF, 68), 8 + 68),
        ("Caps too long", extended_header(CLIP_CAPS, 1 << 24), 12),
        ("Provide", extended_header(CLIP_PROVIDE, provide_bound - 8), provide_bound),
        ("Provide too long", extended_header(CLIP_PROVIDE, 1 << 24), 12),
        ("Notify|Provide", extended_header(CLIP_NOTIFY | CLIP_PROVIDE, 1 << 24), 12),
        ("legacy", CAPS_HEADER + struct.pack(">I", 1 << 24), 8),
    ]  # fmt: skip


@pytest.mark.parametrize("name", [b[0] for b in bounds()[1]])
def test_every_message_held_whole_has_a_hard_cap(name):
    rules, cases = bounds()
    header, bound = next((h, b) for n, h, b in cases if n == name)
    watcher = ClientStreamWatcher(rules)
    watcher.feed(HANDSHAKE + header)
    most = 0
    for _ in range(300):  # 300 x 1 KiB of zeros, more than any bound but the 256 KiB SetEncodings
        watcher.feed(bytes(1024))
        most = max(most, len(watcher._buf))
    assert most <= bound and not watcher.lost


def test_notify_and_provide_together_is_no_action_xvnc_knows_and_is_dropped():
    """TigerVNC dispatches Provide, Request, Peek and Notify by equality (and closes the
    connection on any other action); a paste flagged Notify|Provide never crosses."""
    watcher = ClientStreamWatcher()
    both = cut_text(struct.pack(">I", CLIP_NOTIFY | CLIP_PROVIDE | 1) + b"\x00" * 20, extended=True)
    unknown = cut_text(struct.pack(">I", (1 << 29) | 1), extended=True)
    peek = cut_text(struct.pack(">I", CLIP_PEEK), extended=True)
    watcher.feed(HANDSHAKE + both + unknown + peek + key_event())
    assert watcher.take() == HANDSHAKE + peek + key_event()
    assert watcher.dropped_cut_texts == 2


def caps_message(flags, *sizes):
    body = struct.pack(">I", flags) + b"".join(struct.pack(">I", s) for s in sizes)
    return cut_text(body, extended=True)


def test_announcing_the_extended_clipboard_gets_caps_with_the_limit_before_the_viewer_says_any():
    """Xvnc assumes 20 MiB of text unasked for a viewer that announces the extended
    clipboard and never sends Caps: the watcher says the limit right after SetEncodings."""
    watcher = ClientStreamWatcher(ClipboardRules(max_to_browser=5000))
    announce = set_encodings(7, -1063131698)
    watcher.feed(HANDSHAKE + announce + key_event() + announce)
    synthetic = caps_message(CLIP_CAPS | CLIP_REQUEST | CLIP_NOTIFY | CLIP_PROVIDE | 1, 5000)
    assert watcher.take() == HANDSHAKE + announce + synthetic + key_event() + announce  # once
    watcher = ClientStreamWatcher(ClipboardRules(to_browser=False))
    watcher.feed(HANDSHAKE + set_encodings(7))
    watcher.feed(announce)
    assert watcher.take().endswith(announce + synthetic[:12] + struct.pack(">I", 0))


def test_caps_that_leave_out_text_get_it_with_the_limit():
    """Xvnc keeps its 20 MiB default for a format the Caps do not list."""
    watcher = ClientStreamWatcher(ClipboardRules(max_to_browser=5000))
    watcher.feed(HANDSHAKE + caps_message(CLIP_CAPS | CLIP_PROVIDE | 0b110, 7, 9) + caps_message(CLIP_CAPS | 1))
    assert watcher.take() == HANDSHAKE + caps_message(CLIP_CAPS | CLIP_PROVIDE | 0b111, 5000, 7, 9)
    assert watcher.dropped_cut_texts == 1  # the second lists text but carries no size
