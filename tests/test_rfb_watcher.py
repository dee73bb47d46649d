"""Spotting user input in the RFB stream a viewer sends."""

import struct

from vnc_app.rfb import ClientStreamWatcher

HANDSHAKE = b"RFB 003.008\n" + b"\x02" + b"r" * 16 + b"\x01"
SET_ENCODINGS = b"\x02\x00" + struct.pack(">H", 3) + b"\x00\x00\x00\x07" * 3
UPDATE_REQUEST = b"\x03\x01" + b"\x00" * 8
KEY = b"\x04\x01\x00\x00" + struct.pack(">I", 0x61)
POINTER = b"\x05\x00" + struct.pack(">HH", 10, 20)


def test_handshake_and_update_requests_are_not_input():
    watcher = ClientStreamWatcher()
    assert watcher.feed(HANDSHAKE + SET_ENCODINGS + UPDATE_REQUEST) is False
    assert not watcher.lost


def test_key_and_pointer_events_are_input_even_when_split_across_frames():
    watcher = ClientStreamWatcher()
    watcher.feed(HANDSHAKE + UPDATE_REQUEST)
    assert watcher.feed(KEY[:3]) is False
    assert watcher.feed(KEY[3:]) is True
    assert watcher.feed(UPDATE_REQUEST + POINTER) is True


def test_cut_text_is_skipped_by_its_length():
    watcher = ClientStreamWatcher()
    watcher.feed(HANDSHAKE)
    cut = b"\x06\x00\x00\x00" + struct.pack(">I", 5) + b"\x04\x04\x04\x04\x04"  # payload looks like key events
    assert watcher.feed(cut) is False
    assert watcher.feed(KEY) is True


def test_an_unknown_security_type_stops_the_watching():
    watcher = ClientStreamWatcher()
    assert watcher.feed(b"RFB 003.008\n" + b"\x13" + KEY) is False
    assert watcher.lost


def test_security_none_has_no_auth_response():
    watcher = ClientStreamWatcher()
    assert watcher.feed(b"RFB 003.008\n\x01\x01" + POINTER) is True
