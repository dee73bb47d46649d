"""The portal: login, the catalog, launching, "My sessions" and its action forms."""

import re
import uuid

import pytest
from django.test import Client

from agents_app.models import Agent, AgentCommand
from sessions_app.models import Quota, Session, Template
from sessions_app.states import State
from tests.portal.conftest import client_for, json_script, page

pytestmark = pytest.mark.django_db


def rows_of(html: str) -> set[str]:
    """Session ids with a row in "My sessions"."""
    return set(re.findall(r'data-session-id="([0-9a-f-]+)"', html))


def actions_in_row(html: str, session_id) -> set[str]:
    row = re.search(rf'<tr id="session-{session_id}".*?</tr>', html, re.S)
    assert row, f"no row for {session_id}"
    return set(re.findall(r'data-action="(\w+)"', row.group(0)))


# --- login and the frame ------------------------------------------------------------------


def test_login_page_renders(client):
    response = client.get("/accounts/login/")
    assert response.status_code == 200
    assert 'name="username"' in page(response) and 'name="password"' in page(response)


def test_it_logs_in_with_a_password_and_goes_home(client, alice):
    response = client.post("/accounts/login/", {"username": "alice", "password": "alice-password-1"})
    assert response.status_code == 302 and response.url == "/"
    assert client.get("/").status_code == 200


def test_a_wrong_password_shows_an_error(client, alice):
    response = client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert 'role="alert"' in page(response)
    assert client.get("/").status_code == 302


def test_logout_is_a_post(alice_client):
    assert alice_client.get("/accounts/logout/").status_code == 405
    response = alice_client.post("/accounts/logout/")
    assert response.status_code == 302 and response.url == "/accounts/login/"
    assert alice_client.get("/").status_code == 302


@pytest.mark.parametrize(
    "method,path",
    [
        ("get", "/"),
        ("get", "/sessions/rows"),
        ("post", "/sessions/launch"),
        ("post", "/sessions/00000000-0000-0000-0000-000000000000/terminate"),
        ("get", "/vnc-viewer/00000000-0000-0000-0000-000000000000"),
    ],
)
def test_every_page_requires_login(client, method, path):
    response = getattr(client, method)(path)
    assert response.status_code == 302
    assert response.url.startswith("/accounts/login/?next=")


def test_header_names_the_user_and_offers_admin_to_staff_only(alice_client, carol_client):
    html = page(alice_client.get("/"))
    assert "alice" in html and "My sessions" in html and "Catalog" in html
    assert 'action="/accounts/logout/"' in html
    assert "/admin/" not in html
    assert 'href="/admin/"' in page(carol_client.get("/"))


def test_pages_refuse_framing_by_other_sites(alice_client):
    assert alice_client.get("/").headers["X-Frame-Options"] in ("DENY", "SAMEORIGIN")


# --- catalog and launch -------------------------------------------------------------------


def test_catalog_lists_enabled_templates_only(alice_client, template):
    template.description = "Xfce on Debian"
    template.save()
    Template.objects.create(slug="hidden", name="Hidden Desktop", image="x:1", enabled=False)
    html = page(alice_client.get("/"))
    assert 'data-template="desktop"' in html
    assert "Xfce on Debian" in html
    assert "1 core" in html and "1024 MB" in html
    assert "Hidden Desktop" not in html and 'data-template="hidden"' not in html


def test_launch_creates_a_session_and_its_command(alice_client, alice, template, agent):
    response = alice_client.post("/sessions/launch", {"template": "desktop"}, follow=True)
    assert response.status_code == 200
    session = Session.objects.get(owner=alice)
    assert session.state == State.PENDING and session.agent == agent
    command = AgentCommand.objects.get(session=session)
    assert command.type == AgentCommand.Type.CREATE_SESSION and command.status == AgentCommand.Status.PENDING
    html = page(response)
    assert "Launching Desktop" in html
    assert str(session.pk) in rows_of(html)


def test_launch_needs_a_csrf_token(alice, template, agent):
    client = client_for(alice, enforce_csrf_checks=True)
    assert client.post("/sessions/launch", {"template": "desktop"}).status_code == 403
    assert not Session.objects.exists()


def test_launch_is_post_only(alice_client, template, agent):
    assert alice_client.get("/sessions/launch").status_code == 405


def test_launch_without_an_agent_shows_why_and_writes_nothing(alice_client, template):
    response = alice_client.post("/sessions/launch", {"template": "desktop"}, follow=True)
    assert response.status_code == 200
    assert "message-error" in page(response)
    assert "agent" in page(response).lower()
    assert not Session.objects.exists() and not AgentCommand.objects.exists()


def test_launch_with_an_offline_agent_only_shows_why(alice_client, template):
    Agent.objects.create(agent_id="gone", platform="docker", status=Agent.Status.OFFLINE, capacity={})
    response = alice_client.post("/sessions/launch", {"template": "desktop"}, follow=True)
    assert "message-error" in page(response)
    assert not Session.objects.exists()


def test_launch_over_quota_shows_why_and_writes_nothing(alice_client, alice, make_session):
    make_session(alice, "running")
    Quota.objects.create(user=alice, max_sessions=1)
    response = alice_client.post("/sessions/launch", {"template": "desktop"}, follow=True)
    assert "message-error" in page(response)
    assert "quota allows 1 live sessions" in page(response)
    assert Session.objects.filter(owner=alice).count() == 1
    assert AgentCommand.objects.count() == 1


@pytest.mark.parametrize("slug", ["hidden", "no-such-template", ""])
def test_launch_of_a_template_not_offered_shows_why(alice_client, template, agent, slug):
    Template.objects.create(slug="hidden", name="Hidden", image="x:1", enabled=False)
    response = alice_client.post("/sessions/launch", {"template": slug}, follow=True)
    assert "message-error" in page(response)
    assert "no enabled template" in page(response)
    assert not Session.objects.exists()


# --- my sessions --------------------------------------------------------------------------


def test_my_sessions_lists_only_the_users_own(alice, bob, carol, make_session):
    mine = make_session(alice)
    theirs = make_session(bob)
    staff_own = make_session(carol)
    assert rows_of(page(client_for(alice).get("/"))) == {str(mine.pk)}
    assert rows_of(page(client_for(bob).get("/"))) == {str(theirs.pk)}
    # the portal shows staff their own sessions; everyone's are in the admin
    assert rows_of(page(client_for(carol).get("/"))) == {str(staff_own.pk)}


def test_my_sessions_shows_the_details_of_each_session(alice_client, alice, make_session):
    session = make_session(alice, "running")
    html = page(alice_client.get("/"))
    assert f'data-state="{State.RUNNING}"' in html
    assert ">Running<" in html  # the state as text, not only a colour
    assert "agent-1" in html and "docker" in html and "eu" in html
    assert session.created_at.strftime("%Y-%m-%d") in html


def test_a_transitional_state_reads_as_in_progress(alice_client, alice, make_session):
    make_session(alice, "starting")
    html = page(alice_client.get("/"))
    assert "Starting…" in html and "<progress" in html


def test_a_failed_session_shows_its_error(alice_client, alice, make_session):
    session = make_session(alice, "failed")
    Session.objects.filter(pk=session.pk).update(error_message="create session failed: image not found")
    assert "image not found" in page(alice_client.get("/"))


def test_terminated_sessions_are_left_out(alice_client, alice, make_session):
    make_session(alice, "terminated")
    html = page(alice_client.get("/"))
    assert rows_of(html) == set()
    assert "No sessions yet" in html


@pytest.mark.parametrize(
    "state,actions",
    [
        ("pending", {"terminate"}),
        ("starting", {"terminate"}),
        ("running", {"open", "hibernate", "terminate"}),
        ("hibernating", {"terminate"}),
        ("hibernated", {"wake", "terminate"}),
        ("waking", {"terminate"}),
        ("degraded", {"terminate"}),
        ("terminating", set()),
        ("failed", {"terminate"}),
    ],
)
def test_actions_offered_follow_the_state(alice_client, alice, make_session, state, actions):
    session = make_session(alice, state)
    assert actions_in_row(page(alice_client.get("/")), session.pk) == actions


def test_open_links_to_the_viewer_in_a_new_tab(alice_client, alice, make_session):
    session = make_session(alice, "running")
    html = page(alice_client.get("/"))
    assert f'href="/vnc-viewer/{session.pk}" target="_blank" rel="noopener"' in html


def test_rows_fragment_holds_the_same_rows(alice_client, bob, alice, make_session):
    mine = make_session(alice)
    make_session(bob)
    response = alice_client.get("/sessions/rows")
    assert response.status_code == 200
    assert rows_of(page(response)) == {str(mine.pk)}
    assert "<html" not in page(response)


def test_page_hands_its_script_what_polling_needs(alice_client):
    html = page(alice_client.get("/"))
    config = json_script(html, "portal-config")
    assert config["username"] == "alice"
    assert config["api_sessions_url"] == "/api/v1/sessions"
    assert config["rows_url"] == "/sessions/rows"
    assert set(config["transitional_states"]) == {"pending", "starting", "hibernating", "waking", "terminating"}
    assert 'id="session-announcer"' in html and 'aria-live="polite"' in html
    assert "/static/js/sessions.js" in html


def test_the_api_the_script_polls_accepts_the_login_cookie(alice_client, alice, make_session):
    session = make_session(alice)
    response = alice_client.get("/api/v1/sessions")
    assert response.status_code == 200
    assert [s["id"] for s in response.json()] == [str(session.pk)]


# --- actions ------------------------------------------------------------------------------


def commands(session) -> list[str]:
    return list(AgentCommand.objects.filter(session=session).order_by("created_at").values_list("type", flat=True))


def test_hibernate_a_running_session(alice_client, alice, make_session):
    session = make_session(alice, "running")
    response = alice_client.post(f"/sessions/{session.pk}/hibernate", follow=True)
    # The message names its session and the state it describes: the page's script drops it
    # once the session has moved on (tests/browser/test_viewer_hibernate.py).
    assert (
        f'<li class="message message-success" data-session-id="{session.pk}" data-session-state="hibernating">'
        "Hibernating Desktop.</li>" in page(response)
    )
    session.refresh_from_db()
    assert session.state == State.HIBERNATING
    assert commands(session) == ["create_session", "hibernate_session"]


def test_wake_a_hibernated_session(alice_client, alice, make_session):
    session = make_session(alice, "hibernated")
    alice_client.post(f"/sessions/{session.pk}/wake")
    session.refresh_from_db()
    assert session.state == State.WAKING
    assert commands(session) == ["create_session", "wake_session"]


def test_terminate_a_running_session(alice_client, alice, make_session):
    session = make_session(alice, "running")
    response = alice_client.post(f"/sessions/{session.pk}/terminate")
    assert response.status_code == 302 and response.url == "/#sessions"
    session.refresh_from_db()
    assert session.state == State.TERMINATING
    assert commands(session) == ["create_session", "terminate_session"]


def test_terminate_before_delivery_cancels_the_create(alice_client, alice, make_session):
    session = make_session(alice, "pending")
    alice_client.post(f"/sessions/{session.pk}/terminate")
    session.refresh_from_db()
    assert session.state == State.TERMINATED
    assert AgentCommand.objects.get(session=session).status == AgentCommand.Status.FAILED


@pytest.mark.parametrize(
    "state,action",
    [("running", "wake"), ("hibernated", "hibernate"), ("starting", "hibernate"), ("terminated", "wake")],
)
def test_an_illegal_action_shows_why_and_changes_nothing(alice_client, alice, make_session, state, action):
    session = make_session(alice, state)
    response = alice_client.post(f"/sessions/{session.pk}/{action}", follow=True)
    assert "message-error" in page(response)
    assert f"cannot go from {state}" in page(response)
    session.refresh_from_db()
    assert session.state == state
    assert commands(session) == ["create_session"]


def test_wake_over_quota_shows_why_and_changes_nothing(alice_client, alice, make_session):
    session = make_session(alice, "hibernated")
    make_session(alice, "running")
    Quota.objects.create(user=alice, max_cpu=1.0)
    response = alice_client.post(f"/sessions/{session.pk}/wake", follow=True)
    assert "quota allows 1 CPU" in page(response)
    session.refresh_from_db()
    assert session.state == State.HIBERNATED


@pytest.mark.parametrize("action", ["hibernate", "wake", "terminate"])
def test_it_validates_ownership_on_every_action(bob_client, carol_client, alice, make_session, action):
    state = "hibernated" if action == "wake" else "running"
    session = make_session(alice, state)
    assert bob_client.post(f"/sessions/{session.pk}/{action}").status_code == 404
    session.refresh_from_db()
    assert session.state == state
    assert commands(session) == ["create_session"]
    # staff reach it
    assert carol_client.post(f"/sessions/{session.pk}/{action}").status_code == 302
    session.refresh_from_db()
    assert session.state != state


def test_actions_need_a_csrf_token(alice, make_session):
    session = make_session(alice, "running")
    client = client_for(alice, enforce_csrf_checks=True)
    assert client.post(f"/sessions/{session.pk}/terminate").status_code == 403
    session.refresh_from_db()
    assert session.state == State.RUNNING


def test_actions_are_post_only(alice_client, alice, make_session):
    session = make_session(alice, "running")
    assert alice_client.get(f"/sessions/{session.pk}/terminate").status_code == 405
    session.refresh_from_db()
    assert session.state == State.RUNNING


@pytest.mark.parametrize("path", [f"/sessions/{uuid.uuid4()}/terminate", "/sessions/not-a-uuid/terminate"])
def test_unknown_sessions_are_404(alice_client, path):
    assert alice_client.post(path).status_code == 404


def test_unknown_actions_are_404(alice_client, alice, make_session):
    session = make_session(alice, "running")
    assert alice_client.post(f"/sessions/{session.pk}/explode").status_code == 404
    session.refresh_from_db()
    assert session.state == State.RUNNING


def test_anonymous_posts_change_nothing(alice, make_session):
    session = make_session(alice, "running")
    response = Client().post(f"/sessions/{session.pk}/terminate")
    assert response.status_code == 302
    session.refresh_from_db()
    assert session.state == State.RUNNING
