"""No ``?token=`` value in the logs we write: Daphne's access log (HTTP requests and
WebSocket handshakes, as a real Daphne process prints them) and every line through the
project's logging handlers."""

from __future__ import annotations

import logging
import urllib.request
import uuid

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from streamspace.log_redaction import RedactQueryTokens, redact
from tests.live import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJlLXNlY3JldA"  # shaped like a JWT


def test_daphnes_access_log_never_prints_a_token(control_plane):
    session_id = uuid.uuid4()
    url = f"{control_plane.http_url}/vnc-viewer/{session_id}?token={SECRET}&x=1"
    with urllib.request.urlopen(url, timeout=10) as page:  # noqa: S310 (loopback)
        assert "/accounts/login/" in page.url  # not logged in: the login page (urllib follows the redirect)
    status, _ = control_plane.request("GET", f"/api/v1/sessions?access_token={SECRET}")
    assert status == 401
    ws_url = f"{control_plane.ws_url}/api/v1/vnc/{session_id}?token={SECRET}"
    with connect(ws_url, open_timeout=5) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=5)
    assert closed.value.rcvd.code == 4401  # the forged token is refused
    wait_for(lambda: "WSDISCONNECT" in control_plane.output(), 5, what=f"the access log\n{control_plane.output()}")
    log = control_plane.output()
    assert f"GET /vnc-viewer/{session_id}?token=[redacted]&x=1" in log, log
    assert f"GET /accounts/login/?next=/vnc-viewer/{session_id}%3Ftoken%3D[redacted]%26x%3D1" in log, log
    assert "GET /api/v1/sessions?access_token=[redacted]" in log, log
    assert SECRET not in log and SECRET[-12:] not in log, log


def test_every_logging_handler_redacts_tokens_in_what_it_writes():
    """The project's handlers (settings.LOGGING) carry the filter, and the filter rewrites
    the formatted line: a message quoting a URL loses the token, the rest stays."""
    from django.conf import settings

    for name, handler in settings.LOGGING["handlers"].items():
        assert "redact_tokens" in handler.get("filters", []), name
    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "GET %s from %s", (f"/a?token={SECRET}&b=2", "c"), None
    )
    assert RedactQueryTokens().filter(record) is True
    assert record.getMessage() == "GET /a?token=[redacted]&b=2 from c"
    assert redact("GET /api/v1/sessions?state=running") == "GET /api/v1/sessions?state=running"
