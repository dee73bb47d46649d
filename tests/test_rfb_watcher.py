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

from vnc_app.rfb import CLIP_CAPS, CLIP_NOTIFY, CLIP_PROVIDE, CLIP_REQUEST, ClientStreamWatcher, ClipboardRules

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
    expected = b"".join(rewritten_caps(m, TEXT_LIMIT) if (clip_flags(m) or 0) & CLIP_CAPS else m for m in MESSAGES)
    assert out == expected
    assert watcher.dropped_cut_texts == 0


def test_with_the_clipboard_to_the_desktop_off_its_notify_and_provide_are_dropped():
    watcher = ClientStreamWatcher(ClipboardRules(to_desktop=False))
    watcher.feed(CAPTURED)

    def offers_text(m):  # a Notify or a Provide (the Caps list those actions too)
        flags = clip_flags(m)
        return flags is not None and not flags & CLIP_CAPS and bool(flags & (CLIP_NOTIFY | CLIP_PROVIDE))

    kept = [m for m in MESSAGES if not offers_text(m)]
    assert len(kept) == len(MESSAGES) - 4
    assert watcher.take() == b"".join(rewritten_caps(m, TEXT_LIMIT) if clip_flags(m) else m for m in kept)
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
