"""Who may open the viewer socket with the login cookie (what the viewer page uses: its
socket URL carries no credential). Another user's cookie reaches nothing, a cookie of a
logged-out session is refused, and a page of another origin cannot ride on the cookie:
not another site, not another port of the same host (a same-site page, whose requests
the browser sends the cookie with), not an opaque ``null`` origin. Each close has a code
and a reason. API clients' ``?token=<JWT>`` is tests/channel/test_vnc_relay.py."""

import pytest
from django.test import Client
from websockets.sync.client import connect

from agent_clients import protocol
from tests.channel.test_agent_socket import jwt, online_agent
from tests.channel.test_vnc_relay import closed_with, running_session
from tests.live import free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def desktop(transactional_db):
    from sessions_app.models import Template

    return Template.objects.create(slug="desktop", name="Desktop", image="img:1")


def login_cookie(user) -> tuple[Client, str]:
    browser = Client()
    browser.force_login(user)
    return browser, f"sessionid={browser.cookies['sessionid'].value}"


def socket(cp, session, cookie, origin):
    headers = {"Cookie": cookie, "Origin": origin}
    url = f"{cp.ws_url}/api/v1/vnc/{session.pk}"
    return connect(url, subprotocols=["binary"], additional_headers=headers, open_timeout=5).__enter__()


def test_another_users_cookie_does_not_open_my_session(control_plane, alice, bob, desktop):
    agent = online_agent(control_plane)
    session = running_session(alice, desktop)
    _, bobs = login_cookie(bob)
    assert closed_with(socket(control_plane, session, bobs, control_plane.http_url)) == (
        protocol.CLOSE_NOT_FOUND,
        "no such session",
    )
    _, alices = login_cookie(alice)
    own = socket(control_plane, session, alices, control_plane.http_url)
    assert agent.expect("tunnel_open")["payload"]["session_id"] == str(session.pk)  # the only tunnel asked for
    own.close()


def test_a_cookie_is_worth_nothing_after_logging_out(control_plane, alice, desktop):
    online_agent(control_plane)
    session = running_session(alice, desktop)
    browser, cookie = login_cookie(alice)
    browser.logout()  # the server forgets the session; the cookie is still in hand
    assert closed_with(socket(control_plane, session, cookie, control_plane.http_url)) == (
        protocol.CLOSE_UNAUTHORIZED,
        "log in first",
    )


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example", "http://127.0.0.1:{other_port}", "null", "http://127.0.0.1.evil.example:{port}"],
    ids=["other-site", "same-host-other-port", "opaque", "lookalike-host"],
)
def test_a_page_of_another_origin_cannot_use_the_cookie(control_plane, alice, desktop, origin):
    """Cross-site WebSocket hijacking: alice's cookie rides along, the socket is refused
    before any tunnel, with a reason (and the refusal is not 'log in first': the cookie did
    authenticate)."""
    online_agent(control_plane)
    session = running_session(alice, desktop)
    _, cookie = login_cookie(alice)
    origin = origin.format(other_port=free_port(), port=control_plane.port)
    code, reason = closed_with(socket(control_plane, session, cookie, origin))
    assert code == protocol.CLOSE_FORBIDDEN and "cross-site" in reason, (code, reason)


def test_an_api_client_may_send_its_jwt_in_a_header_instead_of_the_url(control_plane, alice, bob, desktop):
    """No credential in the URL at all for clients that can set headers; a forged or
    another user's JWT is refused as in the query string."""
    agent = online_agent(control_plane)
    session = running_session(alice, desktop)
    url = f"{control_plane.ws_url}/api/v1/vnc/{session.pk}"

    def with_header(value):
        return connect(url, subprotocols=["binary"], additional_headers={"Authorization": value}, open_timeout=5)

    assert closed_with(with_header("Bearer not-a-jwt").__enter__()) == (protocol.CLOSE_UNAUTHORIZED, "log in first")
    assert closed_with(with_header(f"Bearer {jwt(bob)}").__enter__()) == (protocol.CLOSE_NOT_FOUND, "no such session")
    ws = with_header(f"Bearer {jwt(alice)}").__enter__()
    assert agent.expect("tunnel_open")["payload"]["session_id"] == str(session.pk)
    ws.close()
