"""The same agent id and token started twice without an HA lock (an operator starts a second
copy by mistake). Before the fence, the two sockets replaced each other every few seconds,
in-flight commands ran on both, and one copy's cleanup broke the other's sessions.

Real processes: Daphne and two Docker agent processes on the real engine. The newer
connection wins; the superseded process stops with one clear line and a non-zero exit;
no session fails, nothing of a live session is removed, no command runs twice."""

from __future__ import annotations

import re
import time

import pytest

from agents_app.models import Agent, AgentCommand
from sessions_app.models import Session
from sessions_app.states import State
from tests.chaos.support import container_status, disagreements, managed_objects, unfinished_commands
from tests.e2e.conftest import jwt_for
from tests.live import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.docker]

# the old ping-pong replaced the sockets every ~3 s: watch well past two rounds
STABLE_FOR = 8.0


def api(cp, user, method, path, body=None):
    status, data = cp.request(method, "/api/v1" + path, jwt_for(user), body)
    assert status in (200, 201, 202), f"{method} {path} answered {status}: {data}"
    return data


def state_of(session_id) -> str:
    return Session.objects.get(pk=session_id).state


def executions_of(stack, session_id: str, type_: str) -> int:
    """How many times any copy ran this command (each run logs one '<type> <session> ... →' line)."""
    pattern = re.compile(rf"{type_} {session_id}\b.*→")
    return sum(len(pattern.findall(p.log_path.read_text(errors="replace"))) for p in stack.processes)


def test_a_second_copy_of_an_agent_supersedes_the_first_which_stops(
    control_plane, docker_stack, docker_client, desktop_template, alice
):
    cp = control_plane
    stack = docker_stack()
    first = stack.agent
    live = api(cp, alice, "POST", "/sessions", {"template": "desktop", "cpu": 0.25, "memory_mb": 128})["id"]
    wait_for(lambda: state_of(live) == State.RUNNING, 60, 0.1, what=f"running\n{stack.output()}")
    started_at = _started_at(docker_client, live)

    second = stack.start_process()  # same id, same token, no HA lock
    wait_for(lambda: not first.alive, 20, 0.1, what=f"the superseded copy to stop\n{stack.output()}")
    assert first.proc.returncode != 0
    line = f"another process connected as agent {stack.agent_id}: this one stops"
    assert first.output().count(line) == 1, first.output()
    assert second.alive and line not in second.output()

    # exactly one connection from now on: the socket is never replaced again
    wait_for(lambda: Agent.objects.get(agent_id=stack.agent_id).channel_name, 10, what="the second copy attached")
    channel = Agent.objects.get(agent_id=stack.agent_id).channel_name
    watch_until = time.monotonic() + STABLE_FOR
    while time.monotonic() < watch_until:
        assert Agent.objects.get(agent_id=stack.agent_id).channel_name == channel, "the sockets replaced each other"
        assert second.alive, second.output()
        time.sleep(0.2)

    # the surviving copy takes commands; nothing runs twice
    other = api(cp, alice, "POST", "/sessions", {"template": "desktop", "cpu": 0.25, "memory_mb": 128})["id"]
    wait_for(lambda: state_of(other) == State.RUNNING, 60, 0.1, what=f"running\n{stack.output()}")
    assert executions_of(stack, live, "create_session") == 1
    assert executions_of(stack, other, "create_session") == 1

    # no session failed; the live one is untouched on the engine (same container, never restarted)
    assert not Session.objects.filter(state=State.FAILED).exists()
    assert state_of(live) == State.RUNNING and container_status(docker_client, live) == "running"
    assert _started_at(docker_client, live) == started_at
    assert not disagreements(docker_client, [live, other])
    assert not unfinished_commands([live, other])
    assert AgentCommand.objects.filter(session_id__in=[live, other], status="completed").count() == 2

    for session_id in (live, other):
        api(cp, alice, "DELETE", f"/sessions/{session_id}")
    wait_for(
        lambda: set(Session.objects.filter(pk__in=[live, other]).values_list("state", flat=True)) == {State.TERMINATED},
        60,
        0.2,
        what=f"terminated\n{stack.output()}",
    )
    wait_for(lambda: not managed_objects(docker_client, stack.agent_id), 30, 0.2,
             what=f"nothing left on the engine: {managed_objects(docker_client, stack.agent_id)}")  # fmt: skip


def _started_at(client, session_id: str) -> str:
    from agent_clients.backends.docker import container_name

    return client.containers.get(container_name(session_id)).attrs["State"]["StartedAt"]
