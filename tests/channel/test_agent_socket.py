"""The agent socket on a real Daphne process with the Redis channel layer, driven by a
protocol-level client (tests/channel/wire.py) so that bad frames can be sent on purpose."""

import time

import pytest
from rest_framework_simplejwt.tokens import AccessToken

from agent_clients import protocol
from agents_app.models import Agent, AgentCommand
from agents_app.services import agent_register
from sessions_app.models import Session, Template
from sessions_app.states import State
from tests.channel.wire import WireAgent
from tests.live import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def desktop(transactional_db):
    return Template.objects.create(slug="desktop", name="Desktop", image="img:1")


def registered(agent_id="agent-1"):
    _, token, _ = agent_register(agent_id=agent_id, platform="docker", region="eu")
    return token


def online_agent(control_plane, agent_id="agent-1") -> WireAgent:
    wire = WireAgent(control_plane.ws_url, agent_id, registered(agent_id))
    wire.hello()
    wait_for(lambda: Agent.objects.get(agent_id=agent_id).status == "online", 5, what="agent online")
    return wire


def jwt(user) -> str:
    return str(AccessToken.for_user(user))


@pytest.mark.parametrize("token", [None, "ssa_wrong"])
def test_a_wrong_or_missing_token_is_closed_with_4401_and_changes_nothing(control_plane, token):
    registered()
    before = Agent.objects.get(agent_id="agent-1")
    wire = WireAgent(control_plane.ws_url, "agent-1", token)
    first = wire.recv()
    assert first["type"] == "error" and "token" in first["payload"]["reason"]
    code, _ = wire.closed_with()
    assert code == protocol.CLOSE_UNAUTHORIZED
    after = Agent.objects.get(agent_id="agent-1")
    assert (after.channel_name, after.status, after.last_heartbeat) == ("", "offline", None)
    assert after.updated_at == before.updated_at


def test_an_unknown_agent_is_closed_with_4401(control_plane):
    wire = WireAgent(control_plane.ws_url, "ghost", "ssa_whatever")
    code, reason = wire.closed_with()
    assert code == protocol.CLOSE_UNAUTHORIZED and "wrong token" in reason
    assert not Agent.objects.exists()


def test_hello_and_heartbeats_bring_the_agent_online(control_plane):
    wire = online_agent(control_plane)
    agent = Agent.objects.get(agent_id="agent-1")
    assert agent.channel_name and agent.capacity["max_sessions"] == 10 and agent.version == "test"
    first_beat = agent.last_heartbeat
    time.sleep(0.01)
    wire.heartbeat(status="draining")
    wait_for(lambda: Agent.objects.get(pk=agent.pk).status == "draining", 5, what="draining")
    assert Agent.objects.get(pk=agent.pk).last_heartbeat > first_beat
    wire.close()
    wait_for(lambda: Agent.objects.get(pk=agent.pk).channel_name == "", 5, what="channel cleared")


@pytest.mark.parametrize(
    "frame,reason",
    [
        ("{not json", "malformed JSON"),
        ('["a list"]', "must be a JSON object"),
        ('{"type": "explode", "payload": {}}', "unknown message type"),
        ('{"type": "heartbeat", "payload": {"capacity": 1}}', "field"),
        ('{"type": "ack", "payload": {}}', "command_id"),
    ],
)
def test_bad_frames_are_rejected_with_a_reason_and_the_socket_keeps_serving(control_plane, frame, reason):
    wire = online_agent(control_plane)
    wire.send_raw(frame)
    error = wire.expect("error")
    assert reason in error["payload"]["reason"]
    beat = Agent.objects.get(agent_id="agent-1").last_heartbeat
    wire.heartbeat()
    wait_for(lambda: Agent.objects.get(agent_id="agent-1").last_heartbeat > beat, 5, what="heartbeat after error")


def test_an_oversized_frame_closes_that_socket_only(control_plane):
    victim = online_agent(control_plane, "agent-big")
    bystander = online_agent(control_plane, "agent-ok")
    victim.send_raw("x" * (protocol.MAX_TEXT_FRAME + 1))
    code, reason = victim.closed_with()
    assert code == protocol.CLOSE_TOO_LARGE and "exceeds" in reason
    beat = Agent.objects.get(agent_id="agent-ok").last_heartbeat
    bystander.heartbeat()
    wait_for(lambda: Agent.objects.get(agent_id="agent-ok").last_heartbeat > beat, 5, what="bystander served")


def test_an_agent_cannot_touch_another_agents_command(control_plane, alice, desktop):
    registered("victim")
    victim = Agent.objects.get(agent_id="victim")
    session = Session.objects.create(owner=alice, template=desktop, agent=victim, cpu=1, memory_mb=512)
    command = AgentCommand.objects.create(
        agent=victim, session=session, type="create_session", deadline=session.created_at + time_delta(300)
    )
    attacker = online_agent(control_plane, "attacker")
    for type_, payload in [
        ("ack", {"command_id": command.command_id}),
        ("complete", {"command_id": command.command_id, "result": {"state": "running"}}),
        ("failed", {"command_id": command.command_id, "error": "boom", "retryable": False}),
        ("session_event", {"session_id": str(session.pk), "state": "failed", "reason": "gone"}),
    ]:
        attacker.send(type_, payload)
        assert "no " in attacker.expect("error")["payload"]["reason"]
    command.refresh_from_db()
    session.refresh_from_db()
    assert command.status == "pending" and command.result is None
    assert session.state == "pending"


def time_delta(seconds):
    from datetime import timedelta

    return timedelta(seconds=seconds)


def test_a_second_connection_replaces_the_first(control_plane):
    token = registered()
    first = WireAgent(control_plane.ws_url, "agent-1", token)
    first.hello()
    wait_for(lambda: Agent.objects.get(agent_id="agent-1").channel_name, 5, what="first attached")
    channel_one = Agent.objects.get(agent_id="agent-1").channel_name
    second = WireAgent(control_plane.ws_url, "agent-1", token)
    second.hello()
    code, reason = first.closed_with()
    assert code == protocol.CLOSE_REPLACED and "newer connection" in reason
    channel_two = Agent.objects.get(agent_id="agent-1").channel_name
    assert channel_two and channel_two != channel_one
    time.sleep(0.3)  # the old socket's disconnect must not clear the new channel
    assert Agent.objects.get(agent_id="agent-1").channel_name == channel_two


def test_api_create_reaches_the_agent_within_a_second_and_completes(control_plane, alice, desktop):
    wire = online_agent(control_plane)
    started = time.monotonic()
    status, body = control_plane.request("POST", "/api/v1/sessions", jwt(alice), {"template": "desktop"})
    assert status == 201, body
    command = wire.expect("command", timeout=1.0)
    assert time.monotonic() - started < 1.0
    payload = command["payload"]
    assert payload["type"] == "create_session" and payload["session_id"] == body["id"]
    wire.send("ack", {"command_id": payload["command_id"]})
    wait_for(lambda: Session.objects.get(pk=body["id"]).state == State.STARTING, 5, what="starting")
    wire.send(
        "complete",
        {
            "command_id": payload["command_id"],
            "result": {"state": "running", "vnc_host": "127.0.0.1", "vnc_port": 5999},
        },
    )
    wait_for(lambda: Session.objects.get(pk=body["id"]).state == State.RUNNING, 5, what="running")
    session = Session.objects.get(pk=body["id"])
    assert session.vnc_port == 5999 and session.started_at is not None
    assert AgentCommand.objects.get(command_id=payload["command_id"]).status == "completed"


def test_a_command_for_an_offline_agent_is_delivered_once_when_it_connects(control_plane, alice, desktop):
    token = registered()
    agent = Agent.objects.get(agent_id="agent-1")
    session = Session.objects.create(
        owner=alice, template=desktop, agent=agent, cpu=1, memory_mb=512, state=State.RUNNING
    )
    from sessions_app.services import session_terminate

    session_terminate(session=session)  # the agent is not connected
    wire = WireAgent(control_plane.ws_url, "agent-1", token)
    wire.hello(sessions=[{"session_id": str(session.pk), "state": "running"}])
    command = wire.expect("command")["payload"]
    assert command["type"] == "terminate_session" and command["session_id"] == str(session.pk)
    wire.send("ack", {"command_id": command["command_id"]})
    wire.send("complete", {"command_id": command["command_id"], "result": {"state": "terminated"}})
    wait_for(lambda: Session.objects.get(pk=session.pk).state == State.TERMINATED, 5, what="terminated")
    wire.heartbeat()
    assert wire.nothing_within(1.0)
    wire.close()
    again = WireAgent(control_plane.ws_url, "agent-1", token)
    again.hello()
    assert again.nothing_within(1.0), "a completed command was delivered twice"
    assert AgentCommand.objects.get(command_id=command["command_id"]).attempts == 1


def test_an_acked_but_unfinished_command_is_redelivered_after_reconnect(control_plane, alice, desktop):
    token = registered()
    wire = WireAgent(control_plane.ws_url, "agent-1", token)
    wire.hello()
    wait_for(lambda: Agent.objects.get(agent_id="agent-1").status == "online", 5, what="online")
    status, body = control_plane.request("POST", "/api/v1/sessions", jwt(alice), {"template": "desktop"})
    assert status == 201
    first = wire.expect("command")["payload"]
    wire.send("ack", {"command_id": first["command_id"]})
    wait_for(lambda: AgentCommand.objects.get(command_id=first["command_id"]).status == "acked", 5, what="acked")
    wire.close()  # dies before completing
    again = WireAgent(control_plane.ws_url, "agent-1", token)
    again.hello()
    redelivered = again.expect("command")["payload"]
    assert redelivered["command_id"] == first["command_id"]
    again.send("complete", {"command_id": first["command_id"], "result": {"state": "running"}})
    wait_for(lambda: Session.objects.get(pk=body["id"]).state == State.RUNNING, 5, what="running")
    assert Session.objects.filter(owner=alice).count() == 1


def test_commands_of_one_session_are_delivered_in_order(control_plane, alice, desktop):
    wire = online_agent(control_plane)
    status, body = control_plane.request("POST", "/api/v1/sessions", jwt(alice), {"template": "desktop"})
    assert status == 201
    create_cmd = wire.expect("command")["payload"]
    wire.send("ack", {"command_id": create_cmd["command_id"]})
    wait_for(lambda: Session.objects.get(pk=body["id"]).state == State.STARTING, 5, what="starting")
    status, _ = control_plane.request("DELETE", f"/api/v1/sessions/{body['id']}", jwt(alice))
    assert status == 202
    assert wire.nothing_within(0.8), "terminate overtook the unfinished create"
    wire.send("complete", {"command_id": create_cmd["command_id"], "result": {"state": "running"}})
    terminate_cmd = wire.expect("command")["payload"]
    assert terminate_cmd["type"] == "terminate_session"


def test_hello_reconciles_the_sessions_the_agent_holds(control_plane, alice, desktop):
    token = registered()
    agent = Agent.objects.get(agent_id="agent-1")
    kept = Session.objects.create(owner=alice, template=desktop, agent=agent, cpu=1, memory_mb=64, state=State.DEGRADED)
    lost = Session.objects.create(owner=alice, template=desktop, agent=agent, cpu=1, memory_mb=64, state=State.RUNNING)
    wire = WireAgent(control_plane.ws_url, "agent-1", token)
    wire.hello(sessions=[{"session_id": str(kept.pk), "state": "running", "vnc_host": "127.0.0.1", "vnc_port": 6001}])
    wait_for(lambda: Session.objects.get(pk=kept.pk).state == State.RUNNING, 5, what="kept running")
    lost.refresh_from_db()
    assert lost.state == State.FAILED and "no longer holds" in lost.error_message
    assert Session.objects.get(pk=kept.pk).vnc_port == 6001
