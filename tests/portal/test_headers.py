"""Security headers on every kind of page: the Content-Security-Policy (only our own
scripts, no inline script, no eval; our own socket; blob:/data: images; no framing),
nosniff and the referrer policy. tests/browser/test_csp.py checks that Chromium reports
no violation on the same pages."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def policy(response) -> dict[str, list[str]]:
    header = response.headers.get("Content-Security-Policy")
    assert header, f"no Content-Security-Policy on {response.request['PATH_INFO']}"
    directives = {}
    for part in header.split(";"):
        name, *sources = part.split()
        directives[name] = sources
    return directives


def assert_strict(response) -> dict[str, list[str]]:
    csp = policy(response)
    script_src = csp.get("script-src", csp.get("default-src"))
    assert script_src == ["'self'"], csp
    for directive, sources in csp.items():
        assert "'unsafe-inline'" not in sources, (directive, sources)
        assert "'unsafe-eval'" not in sources, (directive, sources)
    assert csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"]
    assert sorted(csp["img-src"]) == sorted(["'self'", "blob:", "data:"])
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["object-src"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"
    assert response.headers["X-Frame-Options"] == "DENY"
    return csp


def test_login_page(client):
    response = client.get("/accounts/login/")
    assert response.status_code == 200
    assert_strict(response)


def test_session_list(alice_client, alice, make_session):
    make_session(alice, "running")
    response = alice_client.get("/")
    assert response.status_code == 200 and b"session-rows" in response.content
    assert_strict(response)
    rows = alice_client.get("/sessions/rows")  # the fragment sessions.js swaps in
    assert rows.status_code == 200
    assert_strict(rows)


def test_viewer_page(alice_client, alice, make_session):
    session = make_session(alice, "running")
    response = alice_client.get(f"/vnc-viewer/{session.pk}")
    assert response.status_code == 200
    assert_strict(response)


def test_not_found_and_redirects(client, alice_client):
    assert_strict(alice_client.get("/vnc-viewer/00000000-0000-0000-0000-000000000000"))
    assert_strict(client.get("/"))  # the redirect to the login page


def test_admin_login_and_change_pages(client, admin_client, alice, make_session):
    response = client.get("/admin/login/")
    assert response.status_code == 200
    assert_strict(response)
    session = make_session(alice, "running")
    for url in (
        "/admin/",
        "/admin/sessions_app/session/",
        f"/admin/sessions_app/session/{session.pk}/change/",
        f"/admin/auth/user/{alice.pk}/change/",
        "/admin/sessions_app/template/add/",
    ):
        response = admin_client.get(url)
        assert response.status_code == 200, url
        assert_strict(response)


def test_api_docs_pages(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    assert_strict(response)
    html = response.content.decode()
    assert "<script>" not in html and "<style>" not in html, "an inline script or style on the docs page"
    assert 'src="/api/docs/?script="' in html
    script = client.get("/api/docs/?script=")
    assert script.status_code == 200 and b"SwaggerUIBundle(" in script.content
    # Swagger UI's validator badge is an image from validator.swagger.io (it skips it only on
    # localhost): blocked by img-src, and it would hand the schema's URL to a third party.
    assert b'"validatorUrl": null' in script.content
    assert script.headers["Content-Type"].startswith("application/javascript")
    schema = client.get("/api/schema/")
    assert schema.status_code == 200
    assert_strict(schema)


def test_api_responses(client):
    response = client.get("/api/v1/sessions")
    assert response.status_code == 401
    assert_strict(response)


def test_the_database_outage_page(settings):
    """The 503 page, rendered by the outermost-but-one middleware: a middleware at the
    bottom of the real stack raises the outage (as in test_database_outage_responses)."""
    from django.test import Client

    settings.MIDDLEWARE = [*settings.MIDDLEWARE, "tests.control.test_database_outage_responses.FailingMiddleware"]
    response = Client(raise_request_exception=False).get("/")
    assert response.status_code == 503 and b"temporarily unavailable" in response.content
    csp = policy(response)
    assert csp["script-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_dashboard_pages(carol_client, alice, make_session):
    session = make_session(alice, "running")
    agent_id = session.agent.agent_id
    for url in (
        "/dashboard/",
        "/dashboard/live",
        "/dashboard/sessions/",
        f"/dashboard/sessions/{session.pk}/",
        f"/dashboard/sessions/{session.pk}/terminate",
        f"/dashboard/agents/{agent_id}/",
        f"/dashboard/agents/{agent_id}/drain",
    ):
        response = carol_client.get(url)
        assert response.status_code == 200, url
        assert_strict(response)
        html = response.content.decode()
        assert "<script>" not in html and "<style" not in html and " style=" not in html, url
