"""Input activity from the platform's own viewer: real noVNC in Chromium, through Daphne B
→ Redis → Daphne A → the real Docker agent → Xvnc in a desktop container.

noVNC 1.7 sends TigerVNC a ClientFence, EnableContinuousUpdates and QEMU extended key
events; the relay's RFB watcher (``vnc_app/rfb.py``) once stopped following the stream
at the first of them, so typing never moved ``Session.last_activity``."""

from __future__ import annotations

import pytest

from tests.browser.test_viewer_e2e import VIEWER_CONNECTED, login, session_row, wait_row_state
from tests.live import wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.docker,
    pytest.mark.browser,
]

ALICE_PASSWORD = "alice-password-1"
IDLE_MS = 2000  # how long the open viewer sits idle before the check that nothing was recorded

# The type byte of every message noVNC sends on its socket (one flush per message).
RECORD_SENT_TYPES = """(() => {
  const sent = (window.__rfbSentTypes = []);
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    if (ArrayBuffer.isView(data) && data.byteLength) sent.push(new Uint8Array(data.buffer, data.byteOffset, 1)[0]);
    return send.call(this, data);
  };
})();"""
CLIENT_FENCE, ENABLE_CONTINUOUS_UPDATES = 248, 150


def last_activity(session_id: str):
    from sessions_app.models import Session

    return Session.objects.get(pk=session_id).last_activity


def test_typing_in_the_viewer_records_activity_and_an_idle_tab_does_not(
    control_plane, control_plane_b, docker_agent, desktop_template, alice, new_context
):
    base = control_plane_b.http_url
    context = new_context("alice")
    context.add_init_script(RECORD_SENT_TYPES)
    page = context.new_page()
    login(page, base, "alice", ALICE_PASSWORD)
    page.locator('li.template[data-template="desktop"]').get_by_role("button", name="Launch").click()
    session_id = page.locator("tr[data-session-id]").get_attribute("data-session-id")
    wait_row_state(page, session_id, "running", 60)

    with page.context.expect_page() as opened:
        session_row(page, session_id).get_by_role("link", name="Open viewer").click()
    viewer = opened.value
    viewer.wait_for_function(VIEWER_CONNECTED, timeout=30_000)
    # noVNC's set-up (SetPixelFormat, SetEncodings, update requests) and its answers to
    # TigerVNC's fence and continuous updates, where the watcher once stopped; then the
    # tab sits idle, and nothing is recorded.
    viewer.wait_for_function(
        f"() => window.__rfbSentTypes.includes({CLIENT_FENCE}) && "
        f"window.__rfbSentTypes.includes({ENABLE_CONTINUOUS_UPDATES})",
        timeout=20_000,
    )
    viewer.wait_for_timeout(IDLE_MS)
    assert last_activity(session_id) is None, "an idle viewer recorded input activity"

    # The first input is written at once (later ones at most every SESSION_ACTIVITY_INTERVAL).
    viewer.keyboard.type("true", delay=15)
    viewer.keyboard.press("Enter")
    wait_for(lambda: last_activity(session_id) is not None, 10, 0.2, what="typing recorded as input activity")
