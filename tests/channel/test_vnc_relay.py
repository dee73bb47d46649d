"""The viewer socket and the relay, with a protocol-level agent at the far end of the
tunnel (the real agent runtime is exercised in tests/e2e)."""

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from agent_clients import protocol
from agents_app.models import Agent
from sessions_app.models import Session, Template
from sessions_app.states import State
from tests.channel.test_agent_socket import jwt, online_agent
from tests.live import wait_for
from vnc_app.models import VNCConnection

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def desktop(transactional_db):
    return Template.objects.create(slug="desktop", name="Desktop", image="img:1")


def running_session(owner, template, agent_id="agent-1", state=State.RUNNING):
    agent = Agent.objects.get(agent_id=agent_id)
    return Session.objects.create(owner=owner, template=template, agent=agent, cpu=1, memory_mb=64, state=state,
                                  sound=template.sound)  # fmt: skip


def viewer(cp, session_id, token=None):
    query = f"?token={token}" if token else ""
    return connect(f"{cp.ws_url}/api/v1/vnc/{session_id}{query}", subprotocols=["binary"], open_timeout=5).__enter__()


def closed_with(ws, timeout=5.0):
    try:
        while True:
            ws.recv(timeout=timeout)
    except ConnectionClosed as exc:
        return exc.rcvd.code, exc.rcvd.reason


@pytest.mark.parametrize("two_processes", [False, True], ids=["one-process", "two-processes"])
def test_bytes_flow_both_ways_through_the_relay(control_plane, control_plane_b, alice, desktop, two_processes):
    agent = online_agent(control_plane)
    session = running_session(alice, desktop)
    ws = viewer(control_plane_b if two_processes else control_plane, session.pk, jwt(alice))
    assert ws.subprotocol == "binary"
    opened = agent.expect("tunnel_open")["payload"]
    assert opened["session_id"] == str(session.pk)
    tunnel = opened["tunnel_id"]
    agent.send("tunnel_ready", {"tunnel_id": tunnel})
    agent.send_raw(protocol.pack_data(tunnel, b"RFB 003.008\n"))
    assert ws.recv(timeout=5) == b"RFB 003.008\n"
    ws.send(b"RFB 003.008\n")
    frame = agent.expect("binary")["bytes"]
    assert protocol.unpack_data(frame) == (tunnel, b"RFB 003.008\n")
    ws.close()
    closed = agent.expect("tunnel_close")["payload"]
    assert closed["tunnel_id"] == tunnel
    wait_for(lambda: VNCConnection.objects.filter(closed_at__isnull=False).exists(), 5, what="audit row closed")
    audit = VNCConnection.objects.get()
    assert audit.user == alice and audit.session_id == session.pk and audit.client_address == "127.0.0.1"
    assert (audit.bytes_to_client, audit.bytes_from_client) == (12, 12)


def test_other_users_and_anonymous_viewers_are_refused_before_any_tunnel(control_plane, alice, bob, desktop):
    agent = online_agent(control_plane)
    session = running_session(alice, desktop)
    assert closed_with(viewer(control_plane, session.pk, jwt(bob))) == (protocol.CLOSE_NOT_FOUND, "no such session")
    assert closed_with(viewer(control_plane, session.pk))[0] == protocol.CLOSE_UNAUTHORIZED
    assert closed_with(viewer(control_plane, session.pk, "forged.jwt.token"))[0] == protocol.CLOSE_UNAUTHORIZED
    assert agent.nothing_within(0.5, "tunnel_open")
    assert not VNCConnection.objects.exists()


def test_staff_may_view_any_session(control_plane, alice, carol, desktop):
    agent = online_agent(control_plane)
    session = running_session(alice, desktop)
    viewer(control_plane, session.pk, jwt(carol))
    assert agent.expect("tunnel_open")["payload"]["session_id"] == str(session.pk)


def test_a_hibernated_session_is_refused_with_its_state(control_plane, alice, desktop):
    online_agent(control_plane)
    session = running_session(alice, desktop, state=State.HIBERNATED)
    code, reason = closed_with(viewer(control_plane, session.pk, jwt(alice)))
    assert code == protocol.CLOSE_UNAVAILABLE and "hibernated" in reason


def test_the_viewer_is_closed_with_the_agents_reason(control_plane, alice, desktop):
    agent = online_agent(control_plane)
    session = running_session(alice, desktop)
    ws = viewer(control_plane, session.pk, jwt(alice))
    tunnel = agent.expect("tunnel_open")["payload"]["tunnel_id"]
    agent.send("tunnel_error", {"tunnel_id": tunnel, "error": "connection refused"})
    code, reason = closed_with(ws)
    assert code == protocol.CLOSE_GOING_AWAY and "connection refused" in reason
    wait_for(lambda: VNCConnection.objects.filter(closed_at__isnull=False).exists(), 5, what="audit closed")
    assert "connection refused" in VNCConnection.objects.get().close_reason


def test_an_agent_disconnect_closes_its_viewers(control_plane, control_plane_b, alice, desktop):
    agent = online_agent(control_plane)
    session = running_session(alice, desktop)
    ws = viewer(control_plane_b, session.pk, jwt(alice))
    agent.send("tunnel_ready", {"tunnel_id": agent.expect("tunnel_open")["payload"]["tunnel_id"]})
    agent.close()
    assert closed_with(ws) == (protocol.CLOSE_GOING_AWAY, "agent disconnected")


def test_key_and_pointer_input_updates_the_sessions_last_activity(control_plane, alice, desktop):
    agent = online_agent(control_plane)
    session = running_session(alice, desktop)
    ws = viewer(control_plane, session.pk, jwt(alice))
    agent.send("tunnel_ready", {"tunnel_id": agent.expect("tunnel_open")["payload"]["tunnel_id"]})
    ws.send(b"RFB 003.008\n" + b"\x02" + b"x" * 16 + b"\x01" + b"\x03\x01" + b"\x00" * 8)
    agent.expect("binary")
    assert Session.objects.get(pk=session.pk).last_activity is None  # no input yet
    ws.send(b"\x04\x01\x00\x00\x00\x00\x00\x61")  # a key press
    wait_for(lambda: Session.objects.get(pk=session.pk).last_activity is not None, 5, what="activity recorded")


def test_a_login_cookie_from_another_site_is_refused(control_plane, alice, desktop):
    """Cross-site WebSocket hijacking: a page elsewhere cannot ride on alice's login cookie."""
    from django.test import Client

    agent = online_agent(control_plane)
    session = running_session(alice, desktop)
    browser = Client()
    browser.force_login(alice)
    cookie = f"sessionid={browser.cookies['sessionid'].value}"
    url = f"{control_plane.ws_url}/api/v1/vnc/{session.pk}"
    evil = connect(url, additional_headers={"Cookie": cookie, "Origin": "https://evil.example"}).__enter__()
    assert closed_with(evil)[0] == protocol.CLOSE_FORBIDDEN
    own = connect(url, additional_headers={"Cookie": cookie, "Origin": control_plane.http_url}).__enter__()
    assert agent.expect("tunnel_open")["payload"]["session_id"] == str(session.pk)
    own.close()
