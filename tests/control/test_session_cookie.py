"""A forged login-session cookie is no session, never a 500 (found by review): a quoted
``sessionid="\\000..."`` is decoded into NUL characters, which PostgreSQL refuses. Through a
real Daphne: the API, a portal page and the viewer socket."""

import urllib.error
import urllib.request

import pytest
from websockets.sync.client import connect

pytestmark = pytest.mark.django_db(transaction=True)

NUL_COOKIE = 'sessionid="' + "\\000" * 8 + '"'


def get(cp, path):
    req = urllib.request.Request(cp.http_url + path, headers={"Cookie": NUL_COOKIE})  # noqa: S310 (loopback)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_a_nul_session_cookie_is_no_session_on_the_api_the_portal_and_the_socket(control_plane):
    status, headers, body = get(control_plane, "/api/v1/sessions")
    assert status == 401 and headers["Content-Type"].startswith("application/json"), body[:300]

    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(control_plane.http_url + "/", headers={"Cookie": NUL_COOKIE})  # noqa: S310
    try:
        status = opener.open(req, timeout=10).status
    except urllib.error.HTTPError as exc:
        status = exc.code
    assert status == 302  # to the login page, as for anyone without a session

    sid = "5b0c7e62-1f3a-4c2d-9e8f-7a6b5c4d3e2f"
    with (
        connect(
            f"{control_plane.ws_url}/api/v1/vnc/{sid}",
            additional_headers={"Cookie": NUL_COOKIE, "Origin": control_plane.http_url},
            subprotocols=["binary"],
            open_timeout=10,
        ) as ws,
        pytest.raises(Exception) as closed,
    ):
        ws.recv(timeout=10)
    assert ws.close_code == 4401, (ws.close_code, ws.close_reason, closed.value)
    assert "Traceback" not in control_plane.output()[-20000:]
