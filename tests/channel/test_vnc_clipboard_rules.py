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


def relayed(cp, user, template, stream: bytes) -> bytes:
    """What reaches the agent of ``stream`` (which must end with a key event)."""
    agent = online_agent(cp)
    session = running_session(user, template)
    ws = viewer(cp, session.pk, jwt(user))
    tunnel = agent.expect("tunnel_open")["payload"]["tunnel_id"]
    agent.send("tunnel_ready", {"tunnel_id": tunnel})
    ws.send(stream)
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
