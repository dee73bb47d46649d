"""The staff dashboard in Chromium, on a real Daphne process: its totals change by
themselves (no reload) when an agent connects and when a session starts; a plain user
gets 403; on a phone the page does not scroll sideways.

The agent is a real agent runtime process dialing the control plane's socket; only its
desktop backend is the test stand-in (tests/support/file_backend.py), because what the
dashboard shows is the control plane's rows, whatever runs the desktop."""

from __future__ import annotations

import pytest

from tests.browser.test_viewer_e2e import login
from tests.channel.test_agent_socket import jwt
from tests.conftest import make_agent
from tests.live import agent_process

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.browser]

CAROL_PASSWORD = "carol-password-1"
REFRESH_WAIT_MS = 30_000  # the page refreshes every 10 s; the agent's start and the session's on top


def card(page, name: str) -> str:
    return page.locator(f'[data-stat="{name}"]').inner_text()


def wait_for_card(page, name: str, value: str) -> None:
    page.wait_for_function(
        '([name, value]) => document.querySelector(`[data-stat="${name}"]`)?.textContent.trim() === value',
        arg=[name, value],
        timeout=REFRESH_WAIT_MS,
    )


def test_the_totals_change_by_themselves_when_an_agent_connects_and_a_session_starts(
    control_plane, carol, alice, new_context, tmp_path
):
    from agents_app.services import agent_register
    from sessions_app.models import Template

    Template.objects.create(slug="desktop", name="Desktop", image="img:1", default_cpu=0.5, default_memory_mb=512)
    base = control_plane.http_url
    context = new_context("carol")
    page = context.new_page()
    login(page, base, "carol", CAROL_PASSWORD)
    page.get_by_role("link", name="Dashboard").click()
    page.wait_for_url(f"{base}/dashboard/")
    assert (card(page, "agents_online"), card(page, "agents_total")) == ("0", "0")
    assert card(page, "sessions_running") == "0" and card(page, "users_active") == "0"
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads

    _, token, _ = agent_register(agent_id="dash-agent", platform="docker", region="test")
    proc = agent_process(
        control_plane,
        "dash-agent",
        token,
        backend="tests.support.file_backend:FileBackend",
        FILE_BACKEND_DIR=str(tmp_path / "dash-agent"),
    ).start()
    try:
        wait_for_card(page, "agents_online", "1")
        assert card(page, "agents_total") == "1"
        assert page.locator('tr[data-agent-id="dash-agent"]').count() == 1

        status, body = control_plane.request("POST", "/api/v1/sessions", jwt(alice), {"template": "desktop"})
        assert status == 201, body
        wait_for_card(page, "sessions_running", "1")
        wait_for_card(page, "users_active", "1")
        assert card(page, "cpu_docker").startswith("0.5 / ")
        assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
        assert context.problems == [], context.problems
    finally:
        proc.stop(10)


def test_a_plain_user_gets_403(control_plane, alice, new_context):
    base = control_plane.http_url
    page = new_context("alice").new_page()
    login(page, base, "alice", "alice-password-1")
    assert page.get_by_role("link", name="Dashboard").count() == 0
    assert page.goto(f"{base}/dashboard/").status == 403
    anonymous = new_context("anonymous").new_page()
    anonymous.goto(f"{base}/dashboard/sessions/")
    assert anonymous.url.startswith(f"{base}/accounts/login/?next=")


PHONE = {"width": 390, "height": 844}


def test_the_dashboard_pages_fit_a_phone(control_plane, carol, alice, template, new_context):
    from sessions_app.models import Session
    from sessions_app.states import State

    agent = make_agent("docker-host-eu-west-1-with-a-long-name", region="eu-west-1")
    session = Session.objects.create(
        owner=alice, template=template, agent=agent, platform="docker", state=State.RUNNING, cpu=1, memory_mb=1024
    )
    context = new_context("phone", viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=3)
    page = context.new_page()
    base = control_plane.http_url
    login(page, base, "carol", CAROL_PASSWORD)
    for url in ("/dashboard/", "/dashboard/sessions/", f"/dashboard/agents/{agent.agent_id}/",
                f"/dashboard/sessions/{session.pk}/"):  # fmt: skip
        page.goto(base + url)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"{url} scrolls sideways ({width} px)"
    page.goto(f"{base}/dashboard/sessions/")
    terminate = page.locator(f'tr[data-session-id="{session.pk}"] [data-action="terminate"]')
    box = terminate.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
    terminate.tap()
    page.get_by_role("button", name="Terminate").tap()
    page.wait_for_url(f"{base}/dashboard/sessions/{session.pk}/")
    assert Session.objects.get(pk=session.pk).state == State.TERMINATING


SET_VISIBILITY = """(state) => {
  Object.defineProperty(document, 'visibilityState', { get: () => state, configurable: true });
  Object.defineProperty(document, 'hidden', { get: () => state === 'hidden', configurable: true });
  document.dispatchEvent(new Event('visibilitychange'));
}"""


def test_the_refresh_runs_every_10_s_and_pauses_while_the_tab_is_hidden(control_plane, carol, new_context):
    """Playwright's fake clock drives the page's timers; a headless tab cannot be hidden
    for real, so the page is told it is (document.visibilityState and the
    visibilitychange event, as a browser does when the tab goes to the background)."""
    base = control_plane.http_url
    page = new_context("carol").new_page()
    login(page, base, "carol", CAROL_PASSWORD)
    page.clock.install()
    page.goto(f"{base}/dashboard/")
    refreshes = []
    page.on("request", lambda r: "/dashboard/live" in r.url and refreshes.append(r.url))

    with page.expect_request(lambda r: "/dashboard/live" in r.url):
        page.clock.run_for(10_500)
    page.wait_for_function("() => document.getElementById('live').dataset.refreshedAt")
    assert len(refreshes) == 1

    page.evaluate(SET_VISIBILITY, "hidden")
    page.clock.run_for(60_000)  # six refreshes' worth of time while hidden
    page.evaluate("() => new Promise((done) => setTimeout(done, 0))")  # let the page run its timers
    assert len(refreshes) == 1, refreshes

    with page.expect_request(lambda r: "/dashboard/live" in r.url):
        page.evaluate(SET_VISIBILITY, "visible")  # shown again: refreshed at once
        page.clock.run_for(100)
    assert len(refreshes) == 2
