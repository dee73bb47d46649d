"""The sessions and templates API: happy paths, ownership, quotas, bad input."""

import uuid

import pytest
from django.contrib.auth.models import Group

from agents_app.models import AgentCommand
from sessions_app.models import Quota, Session
from sessions_app.states import State
from tests.conftest import make_agent

pytestmark = pytest.mark.django_db


def create(client, **body):
    body.setdefault("template", "desktop")
    return client.post("/api/v1/sessions", body, format="json")


def test_templates_lists_enabled_templates(as_alice, template):
    from sessions_app.models import Template

    Template.objects.create(slug="hidden", name="Hidden", image="x:1", enabled=False)
    response = as_alice.get("/api/v1/templates")
    assert response.status_code == 200
    assert [t["slug"] for t in response.json()] == ["desktop"]


def test_it_creates_a_session_and_its_command_together(as_alice, template, agent):
    response = create(as_alice, tags=["work", "demo"], cpu=2, memory_mb=2048)
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["state"] == "pending"
    assert body["agent_id"] == "agent-1"
    assert body["platform"] == "docker" and body["region"] == "eu"
    assert body["tags"] == ["work", "demo"]
    assert body["cpu"] == 2.0 and body["memory_mb"] == 2048
    command = AgentCommand.objects.get(session_id=body["id"])
    assert command.type == "create_session" and command.status == "pending"
    assert command.payload["template"]["image"] == "streamspace/desktop:bookworm-3"
    assert command.payload["owner"] == "alice"
    assert len(command.payload["vnc_password"]) == 8


def test_template_defaults_apply_when_cpu_and_memory_are_omitted(as_alice, template, agent):
    body = create(as_alice).json()
    assert body["cpu"] == 1.0 and body["memory_mb"] == 1024


def test_it_lists_only_the_users_own_sessions(as_alice, as_bob, as_carol, template, agent):
    mine = create(as_alice).json()["id"]
    theirs = create(as_bob).json()["id"]
    assert [s["id"] for s in as_alice.get("/api/v1/sessions").json()] == [mine]
    assert [s["id"] for s in as_bob.get("/api/v1/sessions").json()] == [theirs]
    assert {s["id"] for s in as_carol.get("/api/v1/sessions").json()} == {mine, theirs}


def test_it_filters_the_list_by_state(as_alice, template, agent):
    create(as_alice)
    assert len(as_alice.get("/api/v1/sessions?state=pending").json()) == 1
    assert as_alice.get("/api/v1/sessions?state=running").json() == []


@pytest.mark.parametrize(
    "method,suffix",
    [("get", ""), ("delete", ""), ("post", "/hibernate"), ("post", "/wake")],
)
def test_it_validates_ownership_on_every_session_endpoint(as_alice, as_bob, as_carol, template, agent, method, suffix):
    session_id = create(as_alice).json()["id"]
    Session.objects.filter(pk=session_id).update(state=State.RUNNING)
    response = getattr(as_bob, method)(f"/api/v1/sessions/{session_id}{suffix}")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    # bob's attempt changed nothing
    assert Session.objects.get(pk=session_id).state == State.RUNNING
    assert AgentCommand.objects.filter(session_id=session_id).count() == 1
    # staff reach it
    response = getattr(as_carol, method)(f"/api/v1/sessions/{session_id}{suffix}")
    assert response.status_code in (200, 202, 409)
    if method == "get":
        assert response.json()["id"] == session_id


def test_owner_gets_the_session(as_alice, template, agent):
    session_id = create(as_alice).json()["id"]
    body = as_alice.get(f"/api/v1/sessions/{session_id}").json()
    assert body["id"] == session_id and body["owner"] == "alice" and body["agent_id"] == "agent-1"


def test_unknown_and_malformed_session_ids_are_404(as_alice):
    assert as_alice.get(f"/api/v1/sessions/{uuid.uuid4()}").status_code == 404
    assert as_alice.get("/api/v1/sessions/not-a-uuid").status_code == 404


def test_hibernate_then_wake_queue_commands_and_move_state(as_alice, template, agent):
    session_id = create(as_alice).json()["id"]
    Session.objects.filter(pk=session_id).update(state=State.RUNNING)
    response = as_alice.post(f"/api/v1/sessions/{session_id}/hibernate")
    assert response.status_code == 202 and response.json()["state"] == "hibernating"
    Session.objects.filter(pk=session_id).update(state=State.HIBERNATED)
    response = as_alice.post(f"/api/v1/sessions/{session_id}/wake")
    assert response.status_code == 202 and response.json()["state"] == "waking"
    types = list(AgentCommand.objects.filter(session_id=session_id).values_list("type", flat=True))
    assert types == ["create_session", "hibernate_session", "wake_session"]


def test_hibernating_a_session_that_is_not_running_is_a_conflict(as_alice, template, agent):
    session_id = create(as_alice).json()["id"]
    response = as_alice.post(f"/api/v1/sessions/{session_id}/hibernate")
    assert response.status_code == 409
    assert "pending" in response.json()["detail"]
    assert AgentCommand.objects.filter(session_id=session_id).count() == 1


def test_terminate_queues_a_terminate_command(as_alice, template, agent):
    session_id = create(as_alice, keep_home=True).json()["id"]
    Session.objects.filter(pk=session_id).update(state=State.RUNNING)
    response = as_alice.delete(f"/api/v1/sessions/{session_id}")
    assert response.status_code == 202 and response.json()["state"] == "terminating"
    command = AgentCommand.objects.filter(session_id=session_id, type="terminate_session").get()
    assert command.payload == {"keep_home": True}
    # repeating is harmless
    assert as_alice.delete(f"/api/v1/sessions/{session_id}").status_code == 202
    assert AgentCommand.objects.filter(session_id=session_id, type="terminate_session").count() == 1


def test_terminating_before_the_agent_got_the_create_cancels_it(as_alice, template, agent):
    session_id = create(as_alice).json()["id"]
    response = as_alice.delete(f"/api/v1/sessions/{session_id}")
    assert response.status_code == 200 and response.json()["state"] == "terminated"
    command = AgentCommand.objects.get(session_id=session_id)
    assert command.status == "failed" and "cancelled" in command.error_message


# --- bad input: a 4xx with a JSON body that names the problem, and no row behind -----


@pytest.mark.parametrize(
    "body,field",
    [
        ({"template": "nope"}, "template"),
        ({"cpu": -1}, "cpu"),
        ({"cpu": 0}, "cpu"),
        ({"cpu": 10_000}, "cpu"),
        ({"cpu": "lots"}, "cpu"),
        ({"cpu": True}, "cpu"),
        ({"memory_mb": 1}, "memory_mb"),
        ({"memory_mb": 10**9}, "memory_mb"),
        ({"memory_mb": 512.5}, "memory_mb"),
        ({"tags": "work"}, "tags"),
        ({"tags": [1, 2]}, "tags"),
        ({"tags": ["x" * 65]}, "tags"),
        ({"tags": [""]}, "tags"),
        ({"tags": [f"t{i}" for i in range(21)]}, "tags"),
        ({"keep_home": "yes"}, "keep_home"),
    ],
)
def test_bad_create_input_is_a_400_naming_the_field(as_alice, template, agent, body, field):
    response = create(as_alice, **body)
    assert response.status_code == 400, response.json()
    assert response.json()["field"] == field
    assert Session.objects.count() == 0 and AgentCommand.objects.count() == 0


def test_missing_template_is_a_400(as_alice, template, agent):
    response = as_alice.post("/api/v1/sessions", {}, format="json")
    assert response.status_code == 400
    assert "template" in response.json()["fields"]
    assert Session.objects.count() == 0


def test_malformed_json_is_a_400(as_alice, template, agent):
    response = as_alice.post("/api/v1/sessions", "{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"] == "malformed"
    assert Session.objects.count() == 0


def test_a_json_array_body_is_a_400(as_alice, template, agent):
    response = as_alice.post("/api/v1/sessions", [1, 2], format="json")
    assert response.status_code == 400 and response.json()["error"] == "invalid"


def test_no_agent_with_capacity_is_a_503_and_writes_nothing(as_alice, bob, template, db):
    tiny = make_agent("tiny", max_sessions=1)
    Session.objects.create(owner=bob, template=template, cpu=1, memory_mb=64, state=State.RUNNING, agent=tiny)
    response = create(as_alice)
    assert response.status_code == 503
    assert response.json()["error"] == "no_agent_available"
    assert Session.objects.count() == 1 and AgentCommand.objects.count() == 0


def test_offline_agents_are_never_chosen(as_alice, template, db):
    make_agent("down", online=False)
    response = create(as_alice)
    assert response.status_code == 503
    assert "No agent is online" in response.json()["detail"]


def test_unauthenticated_requests_are_401(client, template):
    response = client.get("/api/v1/sessions")
    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"


def test_a_forged_jwt_is_401(client, alice, template):
    from rest_framework.test import APIClient

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION="Bearer eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyX2lkIjoxfQ.c2lnbmF0dXJl")
    response = api.get("/api/v1/sessions")
    assert response.status_code == 401 and response.json()["error"] in ("token_not_valid", "authentication_failed")


def test_an_expired_jwt_is_401(alice, template):
    from datetime import timedelta

    from rest_framework.test import APIClient
    from rest_framework_simplejwt.tokens import AccessToken

    token = AccessToken.for_user(alice)
    token.set_exp(lifetime=-timedelta(seconds=1))
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    response = api.get("/api/v1/sessions")
    assert response.status_code == 401
    assert "expired" in response.json()["detail"].lower() or response.json()["error"] == "token_not_valid"


# --- quotas -------------------------------------------------------------------------------


def test_user_quota_on_sessions_is_enforced_on_create(as_alice, alice, template, agent):
    Quota.objects.create(user=alice, max_sessions=1, max_cpu=8, max_memory_mb=8192)
    assert create(as_alice).status_code == 201
    response = create(as_alice)
    assert response.status_code == 403
    assert response.json()["error"] == "quota_exceeded"
    assert "1 live sessions" in response.json()["detail"]
    assert Session.objects.count() == 1


def test_user_quota_on_cpu_and_memory_is_enforced_on_create(as_alice, alice, template, agent):
    Quota.objects.create(user=alice, max_sessions=5, max_cpu=2, max_memory_mb=1500)
    assert create(as_alice, cpu=2, memory_mb=1024).status_code == 201
    assert "CPU" in create(as_alice, cpu=1, memory_mb=256).json()["detail"]
    Quota.objects.filter(user=alice).update(max_cpu=8)
    assert "memory" in create(as_alice, cpu=1, memory_mb=1024).json()["detail"]


def test_group_quota_counts_every_member(as_alice, as_bob, alice, bob, template, agent):
    team = Group.objects.create(name="team")
    team.user_set.add(alice, bob)
    Quota.objects.create(group=team, max_sessions=2, max_cpu=8, max_memory_mb=8192)
    assert create(as_alice).status_code == 201
    assert create(as_bob).status_code == 201
    response = create(as_alice)
    assert response.status_code == 403 and "group team" in response.json()["detail"]


def test_hibernated_sessions_free_cpu_but_wake_checks_the_quota_again(as_alice, alice, template, agent):
    Quota.objects.create(user=alice, max_sessions=5, max_cpu=1, max_memory_mb=8192)
    first = create(as_alice, cpu=1).json()["id"]
    Session.objects.filter(pk=first).update(state=State.HIBERNATED)
    second = create(as_alice, cpu=1)
    assert second.status_code == 201  # the hibernated one uses no CPU
    response = as_alice.post(f"/api/v1/sessions/{first}/wake")
    assert response.status_code == 403 and "CPU" in response.json()["detail"]
    assert Session.objects.get(pk=first).state == State.HIBERNATED
    assert AgentCommand.objects.filter(session_id=first, type="wake_session").count() == 0


def test_group_quota_is_enforced_on_wake(as_alice, alice, bob, template, agent):
    team = Group.objects.create(name="team")
    team.user_set.add(alice, bob)
    Quota.objects.create(group=team, max_sessions=5, max_cpu=1, max_memory_mb=8192)
    first = create(as_alice, cpu=1).json()["id"]
    Session.objects.filter(pk=first).update(state=State.HIBERNATED)
    from tests.conftest import api_client_for

    assert create(api_client_for(bob), cpu=1).status_code == 201
    response = as_alice.post(f"/api/v1/sessions/{first}/wake")
    assert response.status_code == 403 and "group team" in response.json()["detail"]
