"""The garbage collector's question on the real agent socket: what may I do with these?

A protocol-level agent (tests/channel/wire.py) on a real Daphne process names the session
ids it found on its engine in ``sessions_query``; the ``sessions_verdict`` answer carries the
request's id and a verdict for each of this agent's sessions the control plane knows, and
nothing about the others: an id it never made (another install sharing the host and the
agent id) or another agent's session is in no list, so the collector leaves it alone."""

import uuid

import pytest
from django.utils import timezone
from websockets.exceptions import ConnectionClosed

from agent_clients import protocol
from agents_app.models import Agent
from sessions_app.models import Session, Template
from sessions_app.states import State
from tests.channel.test_agent_socket import online_agent, registered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_the_verdicts_name_this_agents_known_sessions_only(control_plane, alice):
    template = Template.objects.create(slug="desktop", name="Desktop", image="img:1")
    wire = online_agent(control_plane, "agent-1")
    registered("agent-2")
    mine, other = Agent.objects.get(agent_id="agent-1"), Agent.objects.get(agent_id="agent-2")

    def session(agent, state, *, ran=True, keep_home=False):
        started = timezone.now() if ran else None
        return str(
            Session.objects.create(
                owner=alice,
                template=template,
                agent=agent,
                state=state,
                cpu=1,
                memory_mb=64,
                started_at=started,
                keep_home=keep_home,
            ).pk
        )

    live = {
        session(mine, s) for s in (State.PENDING, State.RUNNING, State.HIBERNATED, State.TERMINATING, State.DEGRADED)
    }
    died = session(mine, State.FAILED)  # had run: its home stays
    failed_create = session(mine, State.FAILED, ran=False)
    terminated = session(mine, State.TERMINATED)
    kept = session(mine, State.TERMINATED, keep_home=True)
    others = {session(other, State.RUNNING), session(other, State.TERMINATED)}
    unknown = str(uuid.uuid4())  # another install's session on the same engine
    asked = [*live, died, failed_create, terminated, kept, *others, unknown]

    wire.ws.send(protocol.encode("sessions_query", {"session_ids": asked}, id="gc-1"))
    answer = wire.expect("sessions_verdict")
    p = answer["payload"]
    assert p["request_id"] == "gc-1"
    assert set(p["live"]) == live
    assert sorted(p["remove"]) == sorted([failed_create, terminated])
    assert sorted(p["remove_keep_home"]) == sorted([died, kept])
    named = {*p["live"], *p["remove"], *p["remove_keep_home"]}
    assert not named & (others | {unknown})
    protocol.decode_control_message(protocol.encode("sessions_verdict", p))  # the agent accepts it


def test_an_oversized_query_is_refused_with_a_reason(control_plane):
    wire = online_agent(control_plane, "agent-1")
    ids = [str(uuid.uuid4()) for _ in range(protocol.MAX_SESSIONS_QUERY + 1)]
    wire.ws.send(protocol.encode("sessions_query", {"session_ids": ids}, id="gc-2"))
    error = wire.expect("error")
    assert "sessions_query" in error["payload"]["reason"] and "session_ids" in error["payload"]["reason"]


def test_a_replaced_connection_gets_no_verdict(control_plane, alice):
    """The fencing check of every answer: a socket that is no longer the agent's current
    one (another connection attached meanwhile: here its row names another channel, as
    while the newer socket's attach is in flight) is closed with 4409, no verdict sent."""
    template = Template.objects.create(slug="desktop", name="Desktop", image="img:1")
    wire = online_agent(control_plane, "agent-1")
    agent = Agent.objects.get(agent_id="agent-1")
    sid = str(
        Session.objects.create(
            owner=alice, template=template, agent=agent, state=State.TERMINATED, cpu=1, memory_mb=64
        ).pk
    )
    Agent.objects.filter(pk=agent.pk).update(channel_name="specific.newer-connection")
    wire.ws.send(protocol.encode("sessions_query", {"session_ids": [sid]}, id="gc-3"))
    seen = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            seen.append(wire.recv(timeout=5)["type"])
    assert closed.value.rcvd.code == protocol.CLOSE_REPLACED, closed.value
    assert "sessions_verdict" not in seen
