"""The operator's drain holds against the agent's own heartbeats (issue 9, item 11).

Found this way: ``manage.py drain_agent`` (or the admin action), then the next heartbeat
of the real agent flipped the agent back to online and new sessions landed on it. Here
the agents are real runtime processes (``python -m agent_clients``) heartbeating every
second to a real Daphne; they run ``tests.support.file_backend.FileBackend``, the test
stand-in for a container engine (the engine is not what is under test)."""

import io

import pytest
from django.core.management import call_command
from django.utils import timezone

from agents_app.models import Agent
from agents_app.services import agent_issue_token, agent_register
from sessions_app.models import Session, Template
from tests.channel.test_agent_socket import jwt
from tests.live import agent_process, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def desktop(transactional_db):
    return Template.objects.create(slug="desktop", name="Desktop", image="img:1")


@pytest.fixture
def start_agent(control_plane, tmp_path):
    started = []

    def start(agent_id):
        _, token, _ = agent_register(agent_id=agent_id, platform="docker", region="test")
        proc = agent_process(
            control_plane,
            agent_id,
            token,
            backend="tests.support.file_backend:FileBackend",
            FILE_BACKEND_DIR=str(tmp_path / agent_id),
        ).start()
        started.append(proc)
        wait_for(lambda: Agent.objects.get(agent_id=agent_id).status == "online", 15,
                 what=f"{agent_id} online\n{proc.output()}")  # fmt: skip
        return proc

    yield start
    for proc in started:
        proc.kill() if proc.alive else None


def a_heartbeat_after(agent_id, moment, proc):
    """Wait for a heartbeat the agent sent after ``moment`` (so it was applied after the drain)."""
    wait_for(lambda: Agent.objects.get(agent_id=agent_id).last_heartbeat > moment, 10,
             what=f"a heartbeat from {agent_id}\n{proc.output()}")  # fmt: skip
    return Agent.objects.get(agent_id=agent_id)


def launch(cp, user):
    return cp.request("POST", "/api/v1/sessions", jwt(user), {"template": "desktop"})


def test_drain_from_the_command_and_the_admin_holds_across_real_heartbeats_until_undrained(
    control_plane, start_agent, alice, admin_client, desktop
):
    one, two = start_agent("drain-one"), start_agent("drain-two")

    out = io.StringIO()
    call_command("drain_agent", "drain-one", stdout=out)
    drained_at = timezone.now()
    assert "draining" in out.getvalue()
    agent = a_heartbeat_after("drain-one", drained_at, one)
    assert agent.status == Agent.Status.DRAINING and agent.drain_requested
    a_heartbeat_after("drain-two", timezone.now(), two)  # live for sure, on a loaded machine too
    for _ in range(3):
        status, body = launch(control_plane, alice)
        assert status == 201, body
        assert body["agent_id"] == "drain-two"

    response = admin_client.post(
        "/admin/agents_app/agent/",
        {"action": "drain", "_selected_action": [Agent.objects.get(agent_id="drain-two").pk]},
        follow=True,
    )
    drained_at = timezone.now()
    page = response.content.decode()
    assert "drain-two" in page and "keep running" in page and "no new sessions" in page
    agent = a_heartbeat_after("drain-two", drained_at, two)
    assert agent.status == Agent.Status.DRAINING and agent.drain_requested
    assert a_heartbeat_after("drain-one", timezone.now(), one).status == Agent.Status.DRAINING

    status, body = launch(control_plane, alice)
    assert status == 503 and body["error"] == "no_agent_available"
    assert "draining" in body["detail"]
    assert Session.objects.filter(owner=alice).count() == 3

    out = io.StringIO()
    call_command("undrain_agent", "drain-one", stdout=out)
    undrained_at = timezone.now()
    assert "drain-one" in out.getvalue()
    agent = a_heartbeat_after("drain-one", undrained_at, one)
    assert agent.status == Agent.Status.ONLINE and not agent.drain_requested
    status, body = launch(control_plane, alice)
    assert status == 201 and body["agent_id"] == "drain-one", body
    assert Agent.objects.get(agent_id="drain-two").status == Agent.Status.DRAINING
    wait_for(lambda: Session.objects.get(pk=body["id"]).state == "running", 15,
             what=f"the session on the undrained agent running\n{one.output()}")  # fmt: skip


def test_a_drained_agent_that_reconnects_is_still_draining(control_plane, start_agent, alice, desktop):
    """A hello (reconnect, restart) does not undo the operator's drain either."""
    first = start_agent("drain-hello")
    call_command("drain_agent", "drain-hello", stdout=io.StringIO())
    first.kill()
    token = agent_issue_token(agent=Agent.objects.get(agent_id="drain-hello"))
    restarted_at = timezone.now()
    again = agent_process(
        control_plane, "drain-hello", token, backend="tests.support.file_backend:FileBackend",
        FILE_BACKEND_DIR=str(first.env["FILE_BACKEND_DIR"]),
    ).start()  # fmt: skip
    try:
        agent = a_heartbeat_after("drain-hello", restarted_at, again)
        assert agent.status == Agent.Status.DRAINING
        status, body = launch(control_plane, alice)
        assert status == 503 and "draining" in body["detail"], body
    finally:
        again.kill()
