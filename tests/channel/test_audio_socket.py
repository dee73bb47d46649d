"""The sound socket (``WS /api/v1/audio/<session>``, vnc_app/audio.py) is let in exactly
as the desktop's: no login refused, another user's session "no such session" (by JWT and
by login cookie), a cookie from another site refused; a template without sound refused
with its own reason before any tunnel; the tunnel asks the agent for the "audio" stream,
the Ogg bytes reach the browser (across two Daphne processes) and what the browser sends
never reaches the desktop; the audit row says "audio". What cannot work by trying again
(the agent says so, or it relays something other than Ogg) closes with 4403, which the page
does not retry; sound is offered by the session (made with sound), not the template now;
a browser that stops reading is cut off past 256 KiB waiting in Daphne.

The agent is the wire-level fake of tests/channel/wire.py (the real agent and desktop are
tests/browser/test_viewer_sound.py)."""

import base64
import os
import socket
from urllib.parse import urlsplit

import pytest
from websockets.sync.client import connect

from agent_clients import protocol
from tests.channel.test_agent_socket import jwt, online_agent
from tests.channel.test_viewer_socket_auth import login_cookie
from tests.channel.test_vnc_relay import closed_with, running_session
from tests.live import wait_for
from vnc_app.audio import NO_SOUND, NOT_SOUND, TOO_SLOW
from vnc_app.models import VNCConnection

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

OGG_PAGE = b"OggS\x00\x02" + bytes(22)  # the start of a stream (what the desktop sends first)


@pytest.fixture
def sound_desktop(transactional_db):
    from sessions_app.models import Template

    return Template.objects.create(slug="sound", name="Sound", image="img:1", sound=True)


@pytest.fixture
def silent_desktop(transactional_db):
    from sessions_app.models import Template

    return Template.objects.create(slug="silent", name="Silent", image="img:1")


def audio(cp, session_id, token=None, headers=None):
    query = f"?token={token}" if token else ""
    url = f"{cp.ws_url}/api/v1/audio/{session_id}{query}"
    return connect(url, subprotocols=["binary"], additional_headers=headers or {}, open_timeout=5).__enter__()


def test_no_login_and_other_users_are_refused_before_any_tunnel(control_plane, alice, bob, sound_desktop):
    agent = online_agent(control_plane)
    session = running_session(alice, sound_desktop)
    assert closed_with(audio(control_plane, session.pk)) == (protocol.CLOSE_UNAUTHORIZED, "log in first")
    assert closed_with(audio(control_plane, session.pk, "not-a-jwt")) == (protocol.CLOSE_UNAUTHORIZED, "log in first")
    assert closed_with(audio(control_plane, session.pk, jwt(bob))) == (protocol.CLOSE_NOT_FOUND, "no such session")
    _, bobs_cookie = login_cookie(bob)
    by_cookie = audio(control_plane, session.pk, headers={"Cookie": bobs_cookie, "Origin": control_plane.http_url})
    assert closed_with(by_cookie) == (protocol.CLOSE_NOT_FOUND, "no such session")
    _, alices_cookie = login_cookie(alice)
    cross_site = audio(control_plane, session.pk, headers={"Cookie": alices_cookie, "Origin": "https://evil.example"})
    code, reason = closed_with(cross_site)
    assert code == protocol.CLOSE_FORBIDDEN and "cross-site" in reason, (code, reason)
    assert agent.nothing_within(0.5, "tunnel_open")
    assert not VNCConnection.objects.exists()


def test_a_template_without_sound_refuses_the_socket_with_a_reason(control_plane, alice, silent_desktop):
    agent = online_agent(control_plane)
    session = running_session(alice, silent_desktop)
    assert closed_with(audio(control_plane, session.pk, jwt(alice))) == (protocol.CLOSE_FORBIDDEN, NO_SOUND)
    assert agent.nothing_within(0.5, "tunnel_open")
    # The desktop's own socket is unaffected, and asks for no stream (what older agents read).
    with connect(f"{control_plane.ws_url}/api/v1/vnc/{session.pk}?token={jwt(alice)}", subprotocols=["binary"]):
        assert "stream" not in agent.expect("tunnel_open")["payload"]


@pytest.mark.parametrize("two_processes", [False, True], ids=["one-process", "two-processes"])
def test_sound_flows_one_way_through_an_audio_tunnel(control_plane, control_plane_b, alice, sound_desktop,
                                                     two_processes):  # fmt: skip
    agent = online_agent(control_plane)
    session = running_session(alice, sound_desktop)
    ws = audio(control_plane_b if two_processes else control_plane, session.pk, jwt(alice))
    opened = agent.expect("tunnel_open")["payload"]
    assert (opened["session_id"], opened["stream"]) == (str(session.pk), "audio")
    tunnel = opened["tunnel_id"]
    agent.send("tunnel_ready", {"tunnel_id": tunnel})
    agent.send_raw(protocol.pack_data(tunnel, OGG_PAGE))
    assert ws.recv(timeout=5) == OGG_PAGE
    ws.send(b"\x04\x01\x00\x00\x00\x00\x00\x20")  # a key event, as if it were VNC: dropped
    assert agent.nothing_within(0.5, "binary")
    ws.close()
    assert agent.expect("tunnel_close")["payload"]["tunnel_id"] == tunnel
    wait_for(lambda: VNCConnection.objects.filter(closed_at__isnull=False).exists(), 5, what="audit row closed")
    row = VNCConnection.objects.get()
    assert (row.stream, row.user, row.session_id) == ("audio", alice, session.pk)
    assert (row.bytes_to_client, row.bytes_from_client) == (len(OGG_PAGE), 0)


def test_an_agent_that_relays_vnc_instead_of_sound_is_cut_off(control_plane, alice, sound_desktop):
    """An agent from before sound ignores the stream and connects the VNC server."""
    agent = online_agent(control_plane)
    session = running_session(alice, sound_desktop)
    ws = audio(control_plane, session.pk, jwt(alice))
    tunnel = agent.expect("tunnel_open")["payload"]["tunnel_id"]
    agent.send("tunnel_ready", {"tunnel_id": tunnel})
    agent.send_raw(protocol.pack_data(tunnel, b"RFB 003.008\n"))
    assert closed_with(ws) == (protocol.CLOSE_FORBIDDEN, NOT_SOUND)  # final: the page does not retry


def test_the_first_bytes_may_arrive_a_few_at_a_time(control_plane, alice, sound_desktop):
    """TCP may hand the agent "Og" then "gS...": the check waits for four bytes."""
    agent = online_agent(control_plane)
    session = running_session(alice, sound_desktop)
    ws = audio(control_plane, session.pk, jwt(alice))
    tunnel = agent.expect("tunnel_open")["payload"]["tunnel_id"]
    agent.send("tunnel_ready", {"tunnel_id": tunnel})
    for chunk in (OGG_PAGE[:1], OGG_PAGE[1:3], OGG_PAGE[3:]):
        agent.send_raw(protocol.pack_data(tunnel, chunk))
    assert ws.recv(timeout=5) == OGG_PAGE  # the held bytes and the rest, in order
    agent.send_raw(protocol.pack_data(tunnel, b"Og"))  # later bytes are not checked
    assert ws.recv(timeout=5) == b"Og"
    ws.close()


@pytest.mark.parametrize(
    ("retryable", "code"),
    [(False, protocol.CLOSE_FORBIDDEN), (True, protocol.CLOSE_GOING_AWAY), (None, protocol.CLOSE_GOING_AWAY)],
    ids=["final", "retryable", "agent-older-than-the-field"],
)
def test_an_error_the_agent_calls_final_closes_with_a_code_the_page_does_not_retry(
    control_plane, alice, sound_desktop, retryable, code
):
    agent = online_agent(control_plane)
    session = running_session(alice, sound_desktop)
    ws = audio(control_plane, session.pk, jwt(alice))
    tunnel = agent.expect("tunnel_open")["payload"]["tunnel_id"]
    error = {"tunnel_id": tunnel, "error": "this platform does not carry sound"}
    agent.send("tunnel_error", error if retryable is None else {**error, "retryable": retryable})
    assert closed_with(ws) == (code, "the agent could not reach the desktop: this platform does not carry sound")


def test_sound_switched_on_after_the_session_was_made_is_not_offered(control_plane, alice, silent_desktop):
    """The desktop was made without a sound server: the template's value now changes nothing."""
    agent = online_agent(control_plane)
    session = running_session(alice, silent_desktop)
    silent_desktop.sound = True
    silent_desktop.save()
    assert closed_with(audio(control_plane, session.pk, jwt(alice))) == (protocol.CLOSE_FORBIDDEN, NO_SOUND)
    assert agent.nothing_within(0.5, "tunnel_open")


def test_a_browser_that_stops_reading_is_cut_off_instead_of_piling_up_latency(control_plane, alice, sound_desktop):
    """The browser is a raw socket that completes the WebSocket handshake, then never reads
    (a 4 KiB receive buffer). Daphne would hold what the agent sends without bound and the
    agent would be credited for it; past 256 KiB waiting the socket is closed with a reason."""
    agent = online_agent(control_plane)
    session = running_session(alice, sound_desktop)
    address = urlsplit(control_plane.ws_url)
    browser = socket.socket()
    browser.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    browser.connect((address.hostname, address.port))
    key = base64.b64encode(os.urandom(16)).decode()
    browser.sendall(
        f"GET /api/v1/audio/{session.pk}?token={jwt(alice)} HTTP/1.1\r\nHost: {address.netloc}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += browser.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    tunnel = agent.expect("tunnel_open")["payload"]["tunnel_id"]
    agent.send("tunnel_ready", {"tunnel_id": tunnel})
    chunk = OGG_PAGE + bytes(64 * 1024 - len(OGG_PAGE))
    for _ in range(48):  # 3 MiB: under the 4 MiB window, so the agent may send it all at once
        agent.send_raw(protocol.pack_data(tunnel, chunk))
    released = agent.expect("tunnel_close", timeout=10)["payload"]
    assert (released["tunnel_id"], released["reason"]) == (tunnel, TOO_SLOW)
    wait_for(lambda: VNCConnection.objects.filter(closed_at__isnull=False).exists(), 5, what="audit row closed")
    row = VNCConnection.objects.get()
    assert row.close_reason == TOO_SLOW and row.bytes_to_client < 48 * len(chunk), row.bytes_to_client
    browser.close()
