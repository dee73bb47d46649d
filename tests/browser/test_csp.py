"""The Content-Security-Policy in real Chromium: every kind of page (login, the session
list, the viewer with a real desktop, the admin, the API docs) works under it and the
browser reports no violation; an inline script injected into a page is refused (so the
policy is enforced and the listener hears it). The viewer's socket carries no credential
in its URL: the page authenticates it with the login cookie.

Violations are collected two ways on every page of the context: the
``securitypolicyviolation`` DOM event (reported through an exposed function, so
navigations lose nothing) and Chromium's console errors about the policy."""

from __future__ import annotations

import pytest

from tests.browser.test_viewer_e2e import (
    ALICE_PASSWORD,
    DESKTOP_FOLLOWS_WINDOW,
    SCREEN_SHAPE,
    VIEWER_CONNECTED,
    desktop_frame,
    login,
)
from tests.conftest import make_agent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.browser]

ADMIN_PASSWORD = "admin-password-1"

REPORT_VIOLATIONS = """document.addEventListener('securitypolicyviolation', (e) => {
  window.__reportCspViolation(`${location.pathname}: ${e.violatedDirective} blocked ${e.blockedURI || 'inline'}` +
    ` (${e.sourceFile || ''}:${e.lineNumber})`);
});"""


def watched_context(new_context, name: str):
    """A browser context that records every CSP violation on any of its pages."""
    context = new_context(name)
    violations: list[str] = []
    context.expose_function("__reportCspViolation", lambda text: violations.append(text))
    context.add_init_script(REPORT_VIOLATIONS)
    context.on(
        "console",
        lambda m: "Content Security Policy" in m.text and violations.append(f"console: {m.text}"),
    )
    context.violations = violations
    return context


def visit(page, url: str, ready: str) -> None:
    response = page.goto(url)
    assert response.status < 400, (url, response.status)
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_selector(ready)


def test_portal_admin_and_docs_pages_run_without_a_violation(control_plane, alice, template, new_context):
    from django.contrib.auth import get_user_model

    from sessions_app.models import Session
    from sessions_app.states import State

    agent = make_agent("docker-csp-1")
    session = Session.objects.create(
        owner=alice, template=template, agent=agent, platform="docker", state=State.RUNNING, cpu=1, memory_mb=512
    )
    get_user_model().objects.create_superuser("admin", password=ADMIN_PASSWORD)
    base = control_plane.http_url

    context = watched_context(new_context, "alice")
    page = context.new_page()
    visit(page, f"{base}/accounts/login/", "#id_username")
    login(page, base, "alice", ALICE_PASSWORD)
    page.wait_for_selector(f'tr[data-session-id="{session.pk}"]')
    # sessions.js runs (it refreshes the rows by itself): wait for one refresh to land.
    page.wait_for_function(
        "() => performance.getEntriesByType('resource').some((r) => r.name.includes('/api/v1/sessions'))"
    )
    assert context.violations == [], context.violations

    # The policy is enforced, and the listener hears it: an injected inline script is refused.
    page.evaluate("""() => {
      const s = document.createElement('script');
      s.textContent = 'window.__inlineRan = true';
      document.body.append(s);
    }""")
    page.wait_for_function("() => true")  # let the violation event be dispatched
    assert page.evaluate("window.__inlineRan === undefined")
    assert any("script-src" in v for v in context.violations), context.violations
    context.violations.clear()

    admin = watched_context(new_context, "admin")
    page = admin.new_page()
    visit(page, f"{base}/admin/login/", "#id_username")
    page.fill("#id_username", "admin")
    page.fill("#id_password", ADMIN_PASSWORD)
    page.locator("input[type=submit]").click()
    page.wait_for_url(f"{base}/admin/")
    for url, ready in (
        ("/admin/", "#content-main"),
        ("/admin/sessions_app/session/", "#result_list"),
        (f"/admin/sessions_app/session/{session.pk}/change/", "#session_form"),
        ("/admin/sessions_app/template/add/", "#template_form"),
        (f"/admin/auth/user/{alice.pk}/change/", "#user_form"),
        ("/admin/vnc_app/vncconnection/", "#changelist"),
        ("/dashboard/", "#live"),
        ("/dashboard/sessions/", "table.sessions"),
        (f"/dashboard/sessions/{session.pk}/", ".timeline"),
        (f"/dashboard/sessions/{session.pk}/terminate", ".consequence"),
        (f"/dashboard/agents/{agent.agent_id}/", ".facts"),
    ):
        visit(page, base + url, ready)
    # The admin's own scripts run: the theme toggle and the select-all checkbox of the change list.
    visit(page, f"{base}/admin/sessions_app/session/", "#action-toggle")
    page.check("#action-toggle")
    assert page.locator("tr.selected").count() == 1
    assert admin.violations == [], admin.violations

    # The API docs: Swagger UI renders the schema (its start-up script is /api/docs/?script).
    missing = []
    page.on("response", lambda r: r.status == 404 and missing.append(r.url))
    visit(page, f"{base}/api/docs/", ".swagger-ui .information-container")
    page.wait_for_selector('.opblock-summary-path[data-path="/api/v1/sessions"]')
    assert missing == [], missing
    assert admin.violations == [], admin.violations


@pytest.mark.docker
def test_the_viewer_connects_and_shows_the_desktop_without_a_violation(
    control_plane, docker_agent, desktop_template, alice, new_context
):
    from sessions_app.models import Session

    base = control_plane.http_url
    context = watched_context(new_context, "alice")
    portal = context.new_page()
    login(portal, base, "alice", ALICE_PASSWORD)
    portal.locator('li.template[data-template="desktop"]').get_by_role("button", name="Launch").click()
    portal.wait_for_url(f"{base}/#sessions")
    session_id = portal.locator("tr[data-session-id]").get_attribute("data-session-id")
    portal.wait_for_selector(f'tr[data-session-id="{session_id}"][data-state="running"]', timeout=60_000)

    viewer = context.new_page()
    sockets = []
    viewer.on("websocket", lambda ws: sockets.append(ws.url))
    response = viewer.goto(f"{base}/vnc-viewer/{session_id}")
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    viewer.wait_for_function(VIEWER_CONNECTED, timeout=30_000)
    viewer.wait_for_function(DESKTOP_FOLLOWS_WINDOW, timeout=20_000)
    frame = desktop_frame(viewer, 20)
    assert list(frame.rgb.shape) == viewer.evaluate(SCREEN_SHAPE)
    # The page's socket is same-origin and carries no credential: the login cookie decides.
    assert sockets == [f"ws://127.0.0.1:{control_plane.port}/api/v1/vnc/{session_id}"], sockets
    assert context.violations == [], context.violations
    assert Session.objects.get(pk=session_id).state == "running"
    portal.reload()
    portal.locator(f'tr[data-session-id="{session_id}"]').get_by_role("button", name="Terminate").click()
    portal.wait_for_url(f"{base}/#sessions")
