"""The relay holds the viewer's clipboard to the template's rules and the operator's
limits by itself (the desktop's Xvnc enforces them too: tests/browser/test_viewer_clipboard.py).
A protocol-level agent at the far end of the tunnel sees exactly what the relay lets through."""

import struct
import zlib

import pytest

from agent_clients import protocol
from sessions_app.models import Template
from tests.channel.test_agent_socket import jwt, online_agent
from tests.channel.test_vnc_relay import running_session, viewer
from tests.live import ControlPlane

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

HANDSHAKE = b"RFB 003.008\n" + b"\x02" + b"r" * 16 + b"\x01"
KEY = b"\x04\x01\x00\x00\x00\x00\x00\x61"
NOTIFY, PROVIDE, REQUEST = 1 << 27, 1 << 28, 1 << 25


def extended(flags: int, payload: bytes = b"") -> bytes:
    body = struct.pack(">I", flags | 1) + payload
    return struct.pack(">Bxxxi", 6, -len(body)) + body


def provide(text: str) -> bytes:
    data = text.encode() + b"\0"
    return extended(PROVIDE, zlib.compress(struct.pack(">I", len(data)) + data))


def legacy(text: bytes) -> bytes:
    return struct.pack(">BxxxI", 6, len(text)) + text


def relayed(cp, user, template, stream: bytes | list[bytes]) -> bytes:
    """What reaches the agent of ``stream`` (which must end with a key event), sent in one
    WebSocket message or one per item of a list."""
    agent = online_agent(cp)
    session = running_session(user, template)
    ws = viewer(cp, session.pk, jwt(user))
    tunnel = agent.expect("tunnel_open")["payload"]["tunnel_id"]
    agent.send("tunnel_ready", {"tunnel_id": tunnel})
    for message in [stream] if isinstance(stream, bytes) else stream:
        ws.send(message)
    got = b""
    while not got.endswith(KEY):
        got += protocol.unpack_data(agent.expect("binary")["bytes"])[1]
    ws.close()
    return got


@pytest.fixture(scope="module")
def limited_control_plane(django_db_setup, django_db_blocker):
    """A Daphne process whose operator allows 64 bytes per clipboard transfer."""
    cp = ControlPlane("daphne-clip", CLIPBOARD_MAX_TO_DESKTOP="64", CLIPBOARD_MAX_TO_BROWSER="64").start()
    yield cp
    cp.stop()


def test_with_the_clipboard_to_the_desktop_off_no_paste_reaches_the_desktop(control_plane, alice):
    sealed = Template.objects.create(slug="sealed", name="Sealed", image="img:1", clipboard_to_desktop=False)
    pastes = legacy(b"secret") + extended(NOTIFY) + provide("secret")
    got = relayed(control_plane, alice, sealed, HANDSHAKE + pastes + KEY)
    assert got == HANDSHAKE + KEY


def test_with_the_clipboard_to_the_browser_off_no_request_reaches_the_desktop(control_plane, alice):
    sealed = Template.objects.create(slug="sealed", name="Sealed", image="img:1", clipboard_to_browser=False)
    caps = extended(1 << 24 | REQUEST | NOTIFY | PROVIDE, struct.pack(">I", 0))
    got = relayed(control_plane, alice, sealed, HANDSHAKE + caps + extended(REQUEST) + KEY)
    assert got == HANDSHAKE + caps + KEY  # the Caps say 0 bytes unasked: Xvnc only announces


def test_the_operators_limit_drops_longer_pastes_and_lets_shorter_ones_through(limited_control_plane, alice):
    desktop = Template.objects.create(slug="desktop", name="Desktop", image="img:1")
    fits = legacy(b"x" * 64) + provide("é" * 32)
    too_long = legacy(b"x" * 65) + provide("é" * 33)
    caps = extended(1 << 24 | REQUEST | NOTIFY | PROVIDE, struct.pack(">I", 0))
    got = relayed(limited_control_plane, alice, desktop, HANDSHAKE + too_long + fits + caps + KEY)
    assert got == HANDSHAKE + fits + caps[:12] + struct.pack(">I", 64) + KEY


EXTENDED_CLIPBOARD, CAPS = -1063131698, 1 << 24  # the pseudo-encoding 0xC0A1E5CE; the Caps action


def test_a_viewer_that_announces_the_extended_clipboard_is_held_to_the_limit_without_sending_caps(
    limited_control_plane, alice
):
    """Xvnc would send such a viewer up to 20 MiB unasked until it sends Caps (which it
    need never do): the relay sends Caps with the operator's limit right after SetEncodings."""
    desktop = Template.objects.create(slug="desktop", name="Desktop", image="img:1")
    encodings = struct.pack(">BxHii", 2, 2, 7, EXTENDED_CLIPBOARD)
    got = relayed(limited_control_plane, alice, desktop, HANDSHAKE + encodings + KEY)
    assert got == HANDSHAKE + encodings + extended(CAPS | REQUEST | NOTIFY | PROVIDE, struct.pack(">I", 64)) + KEY


def test_caps_declared_megabytes_long_are_dropped_as_they_stream(control_plane, alice):
    """No valid Caps is longer than 76 bytes: 8 MiB of them, sent in 256 KiB messages, never
    reach the desktop nor pile up in the relay, and the key after them arrives."""
    desktop = Template.objects.create(slug="desktop", name="Desktop", image="img:1")
    size = 8 << 20
    chunks = [HANDSHAKE + struct.pack(">Bxxxi", 6, -(size + 4)) + struct.pack(">I", CAPS | 1)]
    chunks += [bytes(256 << 10)] * (size // (256 << 10)) + [KEY]
    assert relayed(control_plane, alice, desktop, chunks) == HANDSHAKE + KEY
