"""The portal on a 390 px phone (Chromium emulating a mobile viewport of 390 x 844): every
action of every session row is on screen, without scrolling sideways, and takes the tap.

The sessions are rows made in the database in each state the portal lists, on an agent
row: the layout depends on the states and their buttons, not on a desktop running, so
no Docker agent is needed. The portal is served by a real Daphne process."""

from __future__ import annotations

import pytest

from tests.browser.test_viewer_e2e import login
from tests.conftest import make_agent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.browser]

ALICE_PASSWORD = "alice-password-1"
PHONE = {"width": 390, "height": 844}

# Where a tap at the middle of an element lands: the action (and row) it reaches.
HIT = """(el) => {
  const r = el.getBoundingClientRect();
  const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  const action = hit && hit.closest('[data-action]');
  return action ? [action.closest('tr').dataset.sessionId, action.dataset.action] : null;
}"""


def test_every_action_of_every_session_row_is_on_screen_and_tappable_on_a_phone(
    control_plane_b, alice, template, new_context
):
    from sessions_app.models import Session
    from sessions_app.states import State

    agent = make_agent("docker-host-eu-west-1", region="eu-west-1")
    for state in (State.RUNNING, State.HIBERNATED, State.PENDING, State.DEGRADED, State.FAILED, State.WAKING):
        Session.objects.create(
            owner=alice, template=template, agent=agent, platform="docker", region=agent.region,
            state=state, cpu=1.0, memory_mb=1024,
            error_message="the agent reported: the container exited with code 137 (out of memory)"
            if state == State.FAILED else None,
        )  # fmt: skip

    context = new_context("phone", viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=3)
    page = context.new_page()
    login(page, control_plane_b.http_url, "alice", ALICE_PASSWORD)
    assert page.locator("tr[data-session-id]").count() == 6
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], "the page scrolls sideways"

    actions = page.locator("tr[data-session-id] [data-action]")
    seen = set()
    for i in range(actions.count()):
        action = actions.nth(i)
        name = action.get_attribute("data-action")
        session_id = action.evaluate("e => e.closest('tr').dataset.sessionId")
        # Scroll the page down to it (a phone scrolls vertically), never sideways.
        action.evaluate("e => window.scrollTo(0, window.scrollY + e.getBoundingClientRect().top - 300)")
        box = action.bounding_box()
        where = f"{name} of {session_id}: {box}"
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], f"off-screen sideways: {where}"
        assert box["y"] >= 0 and box["y"] + box["height"] <= PHONE["height"], f"off-screen: {where}"
        assert action.evaluate(HIT) == [session_id, name], f"a tap on {name} of {session_id} lands elsewhere"
        action.click(trial=True, timeout=2_000)  # Playwright's own checks: visible, stable, enabled, hit
        assert page.evaluate("[window.scrollX, document.querySelector('.table-wrap').scrollLeft]") == [0, 0]
        seen.add(name)
    assert seen == {"open", "hibernate", "wake", "terminate"}
