"""Routing across two Daphne processes, and the sweeps run by a real Celery worker with beat."""

import pytest

from agents_app.models import Agent, AgentCommand
from sessions_app.models import Session, Template
from sessions_app.states import State
from tests.channel.test_agent_socket import jwt, online_agent, registered
from tests.channel.wire import WireAgent
from tests.live import sweeping_celery_worker, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def desktop(transactional_db):
    return Template.objects.create(slug="desktop", name="Desktop", image="img:1")


def test_an_api_call_on_one_process_reaches_an_agent_on_another(control_plane, control_plane_b, alice, desktop):
    wire = online_agent(control_plane, "agent-on-a")
    status, body = control_plane_b.request("POST", "/api/v1/sessions", jwt(alice), {"template": "desktop"})
    assert status == 201
    command = wire.expect("command", timeout=1.0)["payload"]
    assert command["session_id"] == body["id"]
    wire.send("complete", {"command_id": command["command_id"], "result": {"state": "running"}})
    wait_for(lambda: control_plane_b.request("GET", f"/api/v1/sessions/{body['id']}", jwt(alice))[1]["state"]
             == "running", 5, what="running as seen from process b")  # fmt: skip


@pytest.fixture
def celery(control_plane):
    """A worker with beat, returned once it has swept."""
    worker = sweeping_celery_worker()
    yield worker
    worker.stop()


def test_celery_sweeps_take_a_silent_agent_offline_and_bring_it_back(control_plane, celery, alice, desktop):
    """Heartbeat interval 1 s: silent for 3 intervals -> offline, its running session degraded;
    heartbeats again -> online, the session running again."""
    wire = online_agent(control_plane)
    agent = Agent.objects.get(agent_id="agent-1")
    session = Session.objects.create(
        owner=alice, template=desktop, agent=agent, cpu=1, memory_mb=64, state=State.RUNNING
    )
    # the agent goes silent (no heartbeats)
    wait_for(lambda: Agent.objects.get(pk=agent.pk).status == "offline", 3 * 1 + 4, 0.1,
             what=f"the sweep to mark the agent offline\n{celery.output()}")  # fmt: skip
    wait_for(lambda: Session.objects.get(pk=session.pk).state == State.DEGRADED, 3, what="session degraded")
    assert "heartbeats" in Session.objects.get(pk=session.pk).error_message
    wire.heartbeat(sessions=[{"session_id": str(session.pk), "state": "running"}])
    wait_for(lambda: Agent.objects.get(pk=agent.pk).status == "online", 3, what="online again")
    wait_for(lambda: Session.objects.get(pk=session.pk).state == State.RUNNING, 3, what="running again")


def test_celery_sweeps_redeliver_unacknowledged_commands_then_fail_them(control_plane, celery, alice, desktop):
    """COMMAND_ACK_TIMEOUT is 3 s and COMMAND_MAX_ATTEMPTS 3: an agent that never acks gets the
    command three times, then the session fails with a readable error."""
    token = registered()
    wire = WireAgent(control_plane.ws_url, "agent-1", token)
    wire.hello()
    wait_for(lambda: Agent.objects.get(agent_id="agent-1").status == "online", 5, what="online")
    status, body = control_plane.request("POST", "/api/v1/sessions", jwt(alice), {"template": "desktop"})
    assert status == 201
    seen = []
    for _ in range(3):
        wire.heartbeat()  # stays alive, but never acks
        command = wire.expect("command", timeout=8)["payload"]
        seen.append(command["command_id"])
    assert len(set(seen)) == 1
    wait_for(lambda: Session.objects.get(pk=body["id"]).state == State.FAILED, 10, 0.2,
             what=f"session failed\n{celery.output()}")  # fmt: skip
    session = Session.objects.get(pk=body["id"])
    assert "did not acknowledge create session after 3 attempts" in session.error_message
    assert AgentCommand.objects.get(command_id=seen[0]).status == "failed"
