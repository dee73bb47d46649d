"""Cross-site WebSocket hijacking in real Chromium: alice is logged in; a page on another
port of the same host (same site, so Chromium sends her host-scoped login cookie with
its requests) opens the viewer socket of her session, and is refused with 4403 and a
reason; the same script from her own portal page reaches the desktop's tunnel.

The far end is a protocol-level agent (tests/channel/wire.py): only the handshake and
the tunnel request matter here, no desktop is needed."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.browser.test_viewer_e2e import ALICE_PASSWORD, OPEN_SOCKET, login
from tests.channel.test_agent_socket import online_agent
from tests.channel.test_vnc_relay import running_session

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.browser]


class AttackerPage(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"<!doctype html><title>another site</title><p>nothing to see</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def attacker_site():
    server = ThreadingHTTPServer(("127.0.0.1", 0), AttackerPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def desktop(transactional_db):
    from sessions_app.models import Template

    return Template.objects.create(slug="desktop", name="Desktop", image="img:1")


def test_a_page_of_another_origin_cannot_open_my_viewer_socket(
    control_plane, alice, desktop, attacker_site, new_context
):
    agent = online_agent(control_plane)
    session = running_session(alice, desktop)
    socket_url = f"{control_plane.ws_url}/api/v1/vnc/{session.pk}"
    context = new_context("alice")
    page = context.new_page()
    login(page, control_plane.http_url, "alice", ALICE_PASSWORD)

    page.goto(attacker_site)
    hijack = page.evaluate(OPEN_SOCKET, socket_url)
    # 4403, not 4401: Chromium did send the cookie, and the origin check refused it.
    assert hijack["code"] == 4403 and "cross-site" in hijack["reason"], hijack
    assert hijack["received"] == 0

    page.goto(f"{control_plane.http_url}/")
    page.evaluate(f"() => {{ window.__own = new WebSocket({socket_url!r}, ['binary']); }}")
    assert agent.expect("tunnel_open")["payload"]["session_id"] == str(session.pk)  # the first tunnel asked for
