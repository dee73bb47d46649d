"""Hibernate from the portal while the viewer is open in another tab: the hibernation
stands, the viewer says so and offers Wake, and the portal's "Hibernating…" message goes
once the session has moved on.

Real noVNC in Chromium, Daphne B for the browser, Daphne A holding the real Docker agent,
a desktop container on the local engine. (The viewer once woke the session again within
a second: it auto-woke whenever it found the session hibernated.)"""

from __future__ import annotations

import pytest

from tests.browser.test_viewer_e2e import (
    VIEWER_CONNECTED,
    containers_of,
    login,
    session_row,
    state_of,
    wait_row_state,
)
from tests.live import wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.docker,
    pytest.mark.browser,
]

ALICE_PASSWORD = "alice-password-1"
VIEWER_HIBERNATED = "() => window.streamspaceViewer && window.streamspaceViewer.state === 'hibernated'"


def test_hibernate_with_the_viewer_open_stands_until_the_viewer_wakes_it(
    control_plane, control_plane_b, docker_agent, docker_client, desktop_template, alice, new_context
):
    from agents_app.models import AgentCommand

    base = control_plane_b.http_url
    portal = new_context("alice").new_page()
    login(portal, base, "alice", ALICE_PASSWORD)
    portal.locator('li.template[data-template="desktop"]').get_by_role("button", name="Launch").click()
    session_id = portal.locator("tr[data-session-id]").get_attribute("data-session-id")
    wait_row_state(portal, session_id, "running", 60)
    # The launch message goes once the session has moved on from the state it announced.
    portal.locator(".message", has_text="Launching").wait_for(state="detached", timeout=5_000)

    with portal.context.expect_page() as opened:
        session_row(portal, session_id).get_by_role("link", name="Open viewer").click()
    viewer = opened.value
    viewer.wait_for_function(VIEWER_CONNECTED, timeout=30_000)

    # Hibernate in the portal tab, the viewer still open in its own.
    portal.bring_to_front()
    session_row(portal, session_id).get_by_role("button", name="Hibernate").click()
    portal.wait_for_url(f"{base}/#sessions")
    wait_row_state(portal, session_id, "hibernated", 30)
    portal.locator(".message", has_text="Hibernating").wait_for(state="detached", timeout=5_000)

    # The viewer notices (its desktop socket closes, or its state check), says so, offers Wake...
    viewer.wait_for_function(VIEWER_HIBERNATED, timeout=20_000)
    wake_button = viewer.get_by_role("button", name="Wake")
    assert wake_button.is_visible()
    assert "hibernated" in viewer.locator("#viewer-status").inner_text().lower()
    # ... and wakes nothing by itself: the hibernation stands, the container stays stopped.
    assert not AgentCommand.objects.filter(session_id=session_id, type=AgentCommand.Type.WAKE_SESSION).exists()
    assert state_of(session_id) == "hibernated"
    (container,) = containers_of(docker_client, session_id)
    container.reload()
    assert container.status == "exited", container.status
    assert viewer.evaluate("window.streamspaceViewer.state") == "hibernated"

    # The user's Wake in the viewer wakes it, and the viewer connects again.
    wake_button.click()
    viewer.wait_for_function(
        "() => window.streamspaceViewer.state === 'connected' && window.streamspaceViewer.connects === 2",
        timeout=45_000,
    )
    assert not wake_button.is_visible()
    assert state_of(session_id) == "running"
    wake = AgentCommand.objects.get(session_id=session_id, type=AgentCommand.Type.WAKE_SESSION)
    assert wake.status == AgentCommand.Status.COMPLETED
    wait_for(lambda: containers_of(docker_client, session_id)[0].status == "running", 10, 0.2, what="container up")
