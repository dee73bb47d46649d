"""The garbage collector's question on the real agent socket: which of my sessions are live?

A protocol-level agent (tests/channel/wire.py) on a real Daphne process asks with
``live_sessions_request``; the answer names exactly this agent's sessions in a live state,
never another agent's, and carries the request's id."""

import pytest

from agent_clients import protocol
from agents_app.models import Agent
from sessions_app.models import Session, Template
from sessions_app.states import State
from tests.channel.test_agent_socket import online_agent, registered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_live_sessions_names_this_agents_live_sessions_only(control_plane, alice):
    template = Template.objects.create(slug="desktop", name="Desktop", image="img:1")
    wire = online_agent(control_plane, "agent-1")
    registered("agent-2")
    mine, other = Agent.objects.get(agent_id="agent-1"), Agent.objects.get(agent_id="agent-2")

    def session(agent, state):
        return str(
            Session.objects.create(owner=alice, template=template, agent=agent, state=state, cpu=1, memory_mb=64).pk
        )

    live = {
        session(mine, s) for s in (State.PENDING, State.RUNNING, State.HIBERNATED, State.TERMINATING, State.DEGRADED)
    }
    for state in (State.FAILED, State.TERMINATED):
        session(mine, state)
    session(other, State.RUNNING)

    wire.ws.send(protocol.encode("live_sessions_request", {}, id="gc-1"))
    answer = wire.expect("live_sessions")
    assert answer["payload"]["request_id"] == "gc-1"
    assert set(answer["payload"]["session_ids"]) == live
    protocol.decode_control_message(protocol.encode("live_sessions", answer["payload"]))  # the agent accepts it
