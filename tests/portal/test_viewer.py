"""The viewer page: who may open it, and what it hands to noVNC."""

import uuid

import pytest

from tests.portal.conftest import json_script, page

pytestmark = pytest.mark.django_db


def test_the_owner_gets_the_viewer_with_socket_url_and_password(alice_client, alice, make_session):
    session = make_session(alice, "running")
    response = alice_client.get(f"/vnc-viewer/{session.pk}")
    assert response.status_code == 200
    config = json_script(page(response), "viewer-config")
    assert config["session_id"] == str(session.pk)
    assert config["ws_url"] == f"ws://testserver/api/v1/vnc/{session.pk}"
    assert config["password"] == session.vnc_password and len(session.vnc_password) == 8
    assert config["state"] == "running"
    assert config["session_url"] == f"/api/v1/sessions/{session.pk}"
    assert config["wake_url"] == f"/api/v1/sessions/{session.pk}/wake"
    assert config["csrf_token"]
    assert config["rfb_module_url"] == "/static/novnc/core/rfb.js"
    assert config["login_url"] == f"/accounts/login/?next=%2Fvnc-viewer%2F{session.pk}"


def test_the_page_loads_novnc_and_the_viewer_script_from_here(alice_client, alice, make_session):
    session = make_session(alice, "running")
    html = page(alice_client.get(f"/vnc-viewer/{session.pk}"))
    assert '<script type="module" src="/static/js/viewer.js">' in html
    assert 'href="/static/novnc/core/rfb.js"' in html
    assert 'id="viewer-status"' in html and 'data-state="loading"' in html
    assert "http://" not in html.replace("http://testserver", "") and "https://" not in html  # no CDN


def test_over_https_the_socket_is_wss(alice_client, alice, make_session):
    session = make_session(alice, "running")
    config = json_script(page(alice_client.get(f"/vnc-viewer/{session.pk}", secure=True)), "viewer-config")
    assert config["ws_url"] == f"wss://testserver/api/v1/vnc/{session.pk}"


def test_the_password_is_never_cached(alice_client, alice, make_session):
    session = make_session(alice, "running")
    response = alice_client.get(f"/vnc-viewer/{session.pk}")
    assert "no-store" in response.headers["Cache-Control"]
    assert response.headers["X-Frame-Options"] in ("DENY", "SAMEORIGIN")


def test_a_hibernated_session_opens_so_the_page_can_wake_it(alice_client, alice, make_session):
    session = make_session(alice, "hibernated")
    config = json_script(page(alice_client.get(f"/vnc-viewer/{session.pk}")), "viewer-config")
    assert config["state"] == "hibernated"


def test_staff_may_open_anyones_viewer(carol_client, alice, make_session):
    session = make_session(alice, "running")
    response = carol_client.get(f"/vnc-viewer/{session.pk}")
    assert response.status_code == 200
    assert json_script(page(response), "viewer-config")["password"] == session.vnc_password


def test_another_user_gets_404_and_no_password(bob_client, alice, make_session):
    session = make_session(alice, "running")
    response = bob_client.get(f"/vnc-viewer/{session.pk}")
    assert response.status_code == 404
    assert session.vnc_password not in page(response)


@pytest.mark.parametrize("session_id", [str(uuid.uuid4()), "not-a-uuid"])
def test_unknown_sessions_are_404(alice_client, session_id):
    assert alice_client.get(f"/vnc-viewer/{session_id}").status_code == 404


def test_anonymous_users_go_to_the_login_page(client, alice, make_session):
    session = make_session(alice, "running")
    response = client.get(f"/vnc-viewer/{session.pk}")
    assert response.status_code == 302
    assert response.url == f"/accounts/login/?next=/vnc-viewer/{session.pk}"


def test_the_viewer_is_get_only(alice_client, alice, make_session):
    session = make_session(alice, "running")
    assert alice_client.post(f"/vnc-viewer/{session.pk}").status_code == 405
