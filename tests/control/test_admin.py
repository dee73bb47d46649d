"""The operator's admin: sessions change only through the services, drains say what they
did, overcommit is shown and validated (issue 9, items 11, 12, 14). Driven with the
Django test client as a superuser, posting the admin's own forms and actions."""

import pytest

from agents_app.models import Agent, AgentCommand
from sessions_app import services
from sessions_app.models import Session
from sessions_app.states import State
from vnc_app.models import VNCConnection

pytestmark = pytest.mark.django_db

SESSIONS = "/admin/sessions_app/session/"
AGENTS = "/admin/agents_app/agent/"


@pytest.fixture
def live_session(alice, template, agent):
    """A running session made by the service (so it has its create command), with an audit row."""
    session = services.session_create(user=alice, template_slug=template.slug)
    Session.objects.filter(pk=session.pk).update(state=State.RUNNING)
    VNCConnection.objects.create(session=session, user=alice, client_address="127.0.0.1")
    return Session.objects.get(pk=session.pk)


def act(client, url, action, *objects):
    response = client.post(url, {"action": action, "_selected_action": [o.pk for o in objects]}, follow=True)
    assert response.status_code == 200
    return response.content.decode()


def test_a_live_session_cannot_be_deleted_and_keeps_its_audit_trail(admin_client, live_session):
    """Found: the admin's delete removed the row, its commands and its VNC connections, and
    left the container, network and volume running."""
    assert admin_client.get(f"{SESSIONS}{live_session.pk}/delete/").status_code == 403
    assert admin_client.post(f"{SESSIONS}{live_session.pk}/delete/", {"post": "yes"}).status_code == 403
    admin_client.post(SESSIONS, {"action": "delete_selected", "_selected_action": [live_session.pk], "post": "yes"})
    assert Session.objects.filter(pk=live_session.pk, state=State.RUNNING).exists()
    assert AgentCommand.objects.filter(session=live_session).count() == 1
    assert VNCConnection.objects.filter(session=live_session).count() == 1
    assert admin_client.get(f"{SESSIONS}add/").status_code == 403
    command = AgentCommand.objects.get(session=live_session)
    connection = VNCConnection.objects.get(session=live_session)
    for url in (
        f"/admin/agents_app/agentcommand/{command.pk}/delete/",
        f"/admin/vnc_app/vncconnection/{connection.pk}/delete/",
    ):
        assert admin_client.post(url, {"post": "yes"}).status_code == 403
    assert (
        AgentCommand.objects.filter(pk=command.pk).exists() and VNCConnection.objects.filter(pk=connection.pk).exists()
    )


def test_terminate_goes_through_the_service_and_says_what_it_did(admin_client, live_session):
    page = act(admin_client, SESSIONS, "terminate", live_session)
    assert "Terminating 1 session(s)" in page and str(live_session.pk)[:8] in page
    assert Session.objects.get(pk=live_session.pk).state == State.TERMINATING
    assert AgentCommand.objects.filter(session=live_session, type="terminate_session", status="pending").exists()
    page = act(admin_client, SESSIONS, "terminate", live_session)
    assert "already terminating" in page
    assert AgentCommand.objects.filter(session=live_session, type="terminate_session").count() == 1
    assert VNCConnection.objects.filter(session=live_session).exists()


def test_hibernate_and_wake_go_through_the_services_and_name_what_was_refused(admin_client, live_session, alice):
    ended = services.session_create(user=alice, template_slug=live_session.template.slug)
    Session.objects.filter(pk=ended.pk).update(state=State.TERMINATED)
    page = act(admin_client, SESSIONS, "hibernate", live_session, ended)
    assert "Hibernating 1 session(s)" in page
    assert "Refused for 1" in page and str(ended.pk)[:8] in page and "cannot go from terminated" in page
    assert Session.objects.get(pk=live_session.pk).state == State.HIBERNATING
    assert Session.objects.get(pk=ended.pk).state == State.TERMINATED
    assert AgentCommand.objects.filter(session=live_session, type="hibernate_session").count() == 1

    Session.objects.filter(pk=live_session.pk).update(state=State.HIBERNATED)
    page = act(admin_client, SESSIONS, "wake", live_session)
    assert "Waking 1 session(s)" in page
    assert Session.objects.get(pk=live_session.pk).state == State.WAKING
    assert AgentCommand.objects.filter(session=live_session, type="wake_session").count() == 1


def test_the_change_page_hides_the_vnc_password_and_fields_a_service_owns_are_read_only(
    admin_client, live_session, bob
):
    url = f"{SESSIONS}{live_session.pk}/change/"
    html = admin_client.get(url).content.decode()
    assert live_session.vnc_password and live_session.vnc_password not in html
    for field in ("state", "agent", "vnc_host", "vnc_port", "error_message", "cpu", "owner"):
        assert f'name="{field}"' not in html
    response = admin_client.post(
        url,
        {"tags": '["edited"]', "state": "terminated", "vnc_password": "x", "owner": bob.pk, "cpu": 9},
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    after = Session.objects.get(pk=live_session.pk)
    assert after.tags == ["edited"]
    assert (after.state, after.vnc_password, after.owner_id, after.cpu) == (
        State.RUNNING,
        live_session.vnc_password,
        live_session.owner_id,
        live_session.cpu,
    )


# --- agents ----------------------------------------------------------------------------


def test_the_agent_list_shows_drain_and_overcommit(admin_client, agent):
    html = admin_client.get(AGENTS).content.decode()
    assert "column-cpu_overcommit" in html and "column-memory_overcommit" in html
    assert "column-drain_requested" in html


def test_overcommit_is_editable_with_help_and_validated(admin_client, agent):
    url = f"{AGENTS}{agent.pk}/change/"
    html = admin_client.get(url).content.decode()
    assert 'name="cpu_overcommit"' in html and "idle desktops" in html.lower() and "OOM" in html
    form = {
        "agent_id": agent.agent_id,
        "platform": agent.platform,
        "region": agent.region,
        "metadata": "{}",
        "cpu_overcommit": "0.5",
        "memory_overcommit": "9",
    }
    html = admin_client.post(url, form).content.decode()
    assert "must be between 1 and 32" in html and "must be between 1 and 4" in html
    assert Agent.objects.get(pk=agent.pk).cpu_overcommit == 4.0
    response = admin_client.post(url, {**form, "cpu_overcommit": "2", "memory_overcommit": "1"})
    assert response.status_code == 302, response.content.decode()[:3000]
    saved = Agent.objects.get(pk=agent.pk)
    assert (saved.cpu_overcommit, saved.memory_overcommit) == (2.0, 1.0)


def test_the_drain_and_undrain_actions_say_what_they_did(admin_client, agent, live_session):
    other = Agent.objects.create(agent_id="agent-2", platform="docker", status="online", capacity={})
    page = act(admin_client, AGENTS, "drain", agent)
    assert "Draining agent-1" in page and "1 live session(s) keep running" in page and "no new sessions" in page
    assert Agent.objects.get(pk=agent.pk).drain_requested
    assert Session.objects.get(pk=live_session.pk).state == State.RUNNING
    page = act(admin_client, AGENTS, "undrain", agent, other)
    assert "Undrained agent-1" in page and "(not drained by an operator): agent-2" in page
    assert not Agent.objects.get(pk=agent.pk).drain_requested
    assert Agent.objects.get(pk=agent.pk).status == "online"


def test_the_agents_api_shows_drain_and_overcommit(as_carol, agent):
    agent.__class__.objects.filter(pk=agent.pk).update(drain_requested=True, cpu_overcommit=2.0)
    body = as_carol.get(f"/api/v1/agents/{agent.agent_id}").json()
    assert (body["drain_requested"], body["cpu_overcommit"], body["memory_overcommit"]) == (True, 2.0, 1.5)


def test_an_agent_holding_live_sessions_cannot_be_deleted(admin_client, agent, live_session):
    spare = Agent.objects.create(agent_id="spare", platform="docker", capacity={})
    assert admin_client.post(f"{AGENTS}{agent.pk}/delete/", {"post": "yes"}).status_code == 403
    assert Agent.objects.filter(pk=agent.pk).exists()
    assert Session.objects.get(pk=live_session.pk).agent_id == agent.pk
    assert admin_client.post(f"{AGENTS}{spare.pk}/delete/", {"post": "yes"}).status_code == 302
    assert not Agent.objects.filter(pk=spare.pk).exists()


# --- saving writes only what the operator changed ----------------------------------------


def test_saving_a_session_never_writes_back_a_state_a_service_moved_meanwhile(admin_client, live_session, monkeypatch):
    """Found by review: the admin saved the whole row it read, so a state the agent's answer
    moved while the form was being validated was overwritten with the stale one."""

    def agent_answer_lands(self, *args, **kwargs):
        Session.objects.filter(pk=self.pk).update(state=State.HIBERNATING)

    monkeypatch.setattr(Session, "clean", agent_answer_lands)
    response = admin_client.post(f"{SESSIONS}{live_session.pk}/change/", {"tags": '["edited"]'})
    assert response.status_code == 302, response.content.decode()[:2000]
    after = Session.objects.get(pk=live_session.pk)
    assert (after.tags, after.state) == (["edited"], State.HIBERNATING)


def test_saving_an_agent_never_writes_back_its_socket_or_heartbeat(admin_client, agent, monkeypatch):
    """Found by review: editing overcommit while the agent reconnected wrote the old socket's
    channel name back; fencing then took the new socket for a superseded one."""
    original_clean = Agent.clean

    def reconnect_lands(self, *args, **kwargs):
        Agent.objects.filter(pk=self.pk).update(channel_name="socket-after-reconnect", status="offline")
        return original_clean(self, *args, **kwargs)

    monkeypatch.setattr(Agent, "clean", reconnect_lands)
    form = {
        "agent_id": agent.agent_id,
        "platform": agent.platform,
        "region": agent.region,
        "metadata": "{}",
        "cpu_overcommit": "8",
        "memory_overcommit": "1.5",
    }
    response = admin_client.post(f"{AGENTS}{agent.pk}/change/", form)
    assert response.status_code == 302, response.content.decode()[:3000]
    after = Agent.objects.get(pk=agent.pk)
    assert (after.cpu_overcommit, after.channel_name, after.status) == (8.0, "socket-after-reconnect", "offline")


def test_the_command_page_masks_the_vnc_password(admin_client, live_session):
    """Found by review: the create command's payload, shown read-only, held the VNC password."""
    command = AgentCommand.objects.get(session=live_session, type="create_session")
    assert command.payload["vnc_password"] == live_session.vnc_password
    html = admin_client.get(f"/admin/agents_app/agentcommand/{command.pk}/change/").content.decode()
    assert "vnc_password" in html and "********" in html
    assert live_session.vnc_password not in html


def test_a_user_with_sessions_cannot_be_deleted_and_their_audit_trail_stays(admin_client, live_session, alice):
    """Found by review: deleting a user cascaded to their sessions, commands and VNC
    connections (the hole of deleting a session, reached another way)."""
    page = admin_client.post(f"/admin/auth/user/{alice.pk}/delete/", {"post": "yes"}, follow=True)
    assert "Cannot delete user" in page.content.decode()
    assert Session.objects.filter(pk=live_session.pk).exists()
    assert AgentCommand.objects.filter(session=live_session).exists()
    assert VNCConnection.objects.filter(session=live_session).exists()
