"""Spotting user input in the RFB stream a viewer sends.

The messages are built byte for byte as noVNC 1.7 builds them (``RFB.messages`` in
``node_modules/@novnc/novnc/core/rfb.js``)."""

import logging
import random
import struct

import pytest

from vnc_app.rfb import ClientStreamWatcher

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
