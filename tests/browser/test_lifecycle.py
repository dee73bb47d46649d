"""Lifecycle policies on the real stack, with timeouts of seconds: real noVNC in Chromium
(through Daphne B), Daphne A holding the real Docker agent, a desktop container on the
local engine, and two real Celery workers with beat sweeping at once (SWEEP_INTERVAL
0.5 s, SESSION_ACTIVITY_INTERVAL 1 s: tests/live.py).

The policy is on the template (read live by the workers and the viewer's API): idle
timeout 16 s, so the warning comes 8 s before the action (half the timeout): long enough
for a viewer polling every few seconds on a loaded machine to show it (with 10 s, so 5 s of
warning, a run beside other load missed it)."""

from __future__ import annotations

import time

import pytest

from tests.browser.test_viewer_e2e import VIEWER_CONNECTED, login, session_row, state_of, wait_row_state
from tests.live import sweeping_celery_worker, wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.docker,
    pytest.mark.browser,
]

ALICE_PASSWORD = "alice-password-1"
IDLE_TIMEOUT = 16
INPUT_EVERY_MS = 2000  # "input every few seconds": well inside the timeout
IDLE_WARNING_SHOWN = "() => { const w = window.streamspaceViewer.warning; return w && w.can_stay; }"
WARNING_GONE = "() => window.streamspaceViewer.warning === null"
BUSY_FOR = IDLE_TIMEOUT + 8  # seconds of input every INPUT_EVERY_MS that must not be touched


@pytest.fixture
def sweepers(control_plane):
    """Two Celery workers, each with its own beat: every sweep runs twice as often, from
    two processes at once."""
    workers = [sweeping_celery_worker(), sweeping_celery_worker()]
    yield workers
    for worker in workers:
        worker.stop()


def launch_and_open_viewer(page, base: str):
    login(page, base, "alice", ALICE_PASSWORD)
    page.locator('li.template[data-template="desktop"]').get_by_role("button", name="Launch").click()
    session_id = page.locator("tr[data-session-id]").get_attribute("data-session-id")
    wait_row_state(page, session_id, "running", 60)
    with page.context.expect_page() as opened:
        session_row(page, session_id).get_by_role("link", name="Open viewer").click()
    viewer = opened.value
    viewer.wait_for_function(VIEWER_CONNECTED, timeout=30_000)
    return session_id, viewer


def events(session_id: str) -> list[tuple[str, str, str]]:
    from sessions_app.models import SessionEvent

    return list(SessionEvent.objects.filter(session_id=session_id).values_list("from_state", "to_state", "reason"))


def test_an_open_viewer_without_input_is_warned_then_hibernated(
    control_plane, control_plane_b, docker_agent, desktop_template, alice, new_context, sweepers
):
    from agents_app.models import AgentCommand

    desktop_template.idle_timeout = IDLE_TIMEOUT
    desktop_template.save()
    base = control_plane_b.http_url
    portal = new_context("alice").new_page()
    session_id, viewer = launch_and_open_viewer(portal, base)

    # No input: the viewer warns, with a way to stay...
    viewer.wait_for_function(IDLE_WARNING_SHOWN, timeout=40_000)
    warning = viewer.get_by_role("alertdialog", name="Still there?")
    assert warning.is_visible()
    assert "This desktop will be hibernated in" in warning.inner_text()
    assert viewer.get_by_role("button", name="Stay").is_visible()
    # ... then the session is hibernated, and the viewer says why.
    viewer.wait_for_function("() => window.streamspaceViewer.state === 'hibernated'", timeout=30_000)
    reason = f"hibernated after {IDLE_TIMEOUT} s without input"
    assert reason in viewer.locator("#viewer-status").inner_text()
    assert not warning.is_visible()
    wait_for(lambda: state_of(session_id) == "hibernated", 30, 0.2, what="the session hibernated")
    assert ("running", "hibernating", reason) in events(session_id)
    # Two workers swept it: one hibernation, one command.
    assert [e[1] for e in events(session_id)].count("hibernating") == 1
    assert AgentCommand.objects.filter(session_id=session_id, type=AgentCommand.Type.HIBERNATE_SESSION).count() == 1

    # The portal's row says it too.
    portal.bring_to_front()
    wait_row_state(portal, session_id, "hibernated", 30)
    assert f"Hibernated after {IDLE_TIMEOUT} s without input" in session_row(portal, session_id).inner_text()


def test_stay_and_typing_keep_a_session_input_every_few_seconds_is_never_touched_max_lifetime_ends_it(
    control_plane, control_plane_b, docker_agent, desktop_template, alice, new_context, sweepers
):
    from django.utils import timezone

    from sessions_app.lifecycle import human_duration
    from sessions_app.models import Session

    desktop_template.idle_timeout = IDLE_TIMEOUT
    desktop_template.save()
    base = control_plane_b.http_url
    session_id, viewer = launch_and_open_viewer(new_context("alice").new_page(), base)

    # Warned: "Stay" keeps it.
    viewer.wait_for_function(IDLE_WARNING_SHOWN, timeout=40_000)
    viewer.get_by_role("button", name="Stay").click()
    viewer.wait_for_function(WARNING_GONE, timeout=5_000)
    # Warned again: typing in the desktop keeps it.
    viewer.wait_for_function(IDLE_WARNING_SHOWN, timeout=40_000)
    viewer.keyboard.type("true", delay=15)
    viewer.keyboard.press("Enter")
    viewer.wait_for_function(WARNING_GONE, timeout=5_000)
    assert state_of(session_id) == "running"

    # Input every few seconds for longer than the timeout: never warned, never touched.
    busy_until = time.monotonic() + BUSY_FOR
    while time.monotonic() < busy_until:
        viewer.wait_for_timeout(INPUT_EVERY_MS)  # the user's pace, not a wait for the system
        viewer.keyboard.press("Shift")
        session = Session.objects.get(pk=session_id)
        assert session.state == "running" and session.idle_warned_at is None
        assert viewer.evaluate("window.streamspaceViewer.warning") is None

    # A maximum lifetime ends it, busy as it is: the viewer announces it (no Stay), then it ends.
    lifetime = int((timezone.now() - Session.objects.get(pk=session_id).started_at).total_seconds()) + 10
    desktop_template.max_lifetime = lifetime
    desktop_template.save()
    announced = False
    for _ in range(40):  # bounded: the session ends within some 10 s
        if state_of(session_id) != "running":
            break
        warning = viewer.evaluate("window.streamspaceViewer.warning")
        announced |= bool(warning and warning["action"] == "terminate" and not warning["can_stay"])
        viewer.keyboard.press("Shift")
        viewer.wait_for_timeout(INPUT_EVERY_MS // 2)
    reason = f"terminated after {human_duration(lifetime)}, its maximum lifetime"
    wait_for(lambda: state_of(session_id) == "terminated", 30, 0.2, what="the session terminated")
    assert announced, "the viewer never announced the end of the lifetime"
    assert ("running", "terminating", reason) in events(session_id)
    assert "hibernating" not in [e[1] for e in events(session_id)]
    viewer.wait_for_function("() => window.streamspaceViewer.state === 'ended'", timeout=20_000)
    assert reason in viewer.locator("#viewer-status").inner_text()
