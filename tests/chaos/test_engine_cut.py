"""Chaos: the Docker engine lost in the middle of a create.

A real Daphne control plane, the real Docker agent process (``python -m
agent_clients.docker_agent``) and the real engine, reached through a proxy on a unix socket
(tests/support/docker_proxy.py, ``DOCKER_HOST`` of the agent) that the test cuts the moment
the agent asks the engine to create the session's container: its network and volume exist,
the agent's undo cannot reach the engine. The engine comes back; nothing is restarted.

Found by an independent check: the network and volume stayed behind for ever. Now the
session ends failed with a readable error (or running, if a retry after the engine came
back carried the create out), no command is lost, and the agent's garbage collector removes
what no live session owns: 0 orphan containers, networks and volumes."""

from __future__ import annotations

import contextlib

import pytest

from agents_app.models import AgentCommand
from sessions_app.models import Session
from sessions_app.states import State
from tests.e2e import conftest as e2e_fixtures
from tests.e2e.test_docker_e2e import api, assert_nothing_left, create, engine_objects, labelled, wait_state
from tests.live import wait_for
from tests.support.docker_proxy import DockerSocketProxy

# The end-to-end fixtures: the engine, and a factory of real Docker agent processes.
docker_client = e2e_fixtures.docker_client
docker_stack = e2e_fixtures.docker_stack

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.docker]

GC_INTERVAL = "1"
GC_GRACE = "2"


def _state(session_id: str) -> Session:
    return Session.objects.get(pk=session_id)


@pytest.fixture
def docker_proxy():
    """Set up before (so torn down after) the agents that use it: their teardown needs the engine."""
    proxy = DockerSocketProxy().start()
    yield proxy
    proxy.close()


def test_engine_cut_mid_create_leaves_no_orphans_and_loses_no_command(
    control_plane,
    docker_proxy,
    docker_stack,
    docker_client,
    desktop_template,
    alice,
):
    proxy = docker_proxy
    try:
        stack = docker_stack(DOCKER_HOST=proxy.docker_host, GC_INTERVAL=GC_INTERVAL, GC_GRACE=GC_GRACE)
        cp = control_plane
        pid = stack.agent.proc.pid

        proxy.cut_on(b"/containers/create")
        session_id = create(cp, alice, cpu=0.25, memory_mb=128)
        wait_for(proxy.cut_happened.is_set, 30, 0.05, what=f"the create to reach the engine\n{stack.output()}")
        # The engine is gone with the session's network and volume made: the undo fails too.
        objects = engine_objects(docker_client, session_id)
        assert objects["network"] is not None and objects["volume"] is not None and objects["container"] is None

        # Keep the engine away while the agent fails the create (or for a while at most),
        # then bring it back.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: _state(session_id).state == State.FAILED, 15, 0.1, what="the create failed")
        proxy.restore()

        final = wait_for(
            lambda: (s := _state(session_id)).state in (State.FAILED, State.RUNNING) and s,
            60,
            0.1,
            what=f"the session to end failed or running\n{stack.output()}",
        )
        if final.state == State.FAILED:
            assert final.error_message, "a failed session says why"
            assert "internal agent error" not in final.error_message
            assert "Docker" in final.error_message, final.error_message
            # The garbage collector (1 s interval, 2 s grace) removes the leftovers.
            wait_for(
                lambda: not any(engine_objects(docker_client, session_id).values()),
                30,
                0.2,
                what=f"the garbage collector to remove the orphans\n{stack.output()}",
            )
            log = stack.agent.log_path.read_text(errors="replace")
            assert f"garbage collector: removed network ss-{session_id}-net" in log
            assert f"garbage collector: removed volume ss-{session_id}-home" in log
        else:
            assert all(engine_objects(docker_client, session_id).values())
            api(cp, alice, "DELETE", f"/sessions/{session_id}", expect=202)
            wait_state(cp, alice, session_id, State.TERMINATED, stack=stack)
            assert_nothing_left(docker_client, session_id)

        # No lost command: every command of the session reached an end.
        unfinished = AgentCommand.objects.filter(session_id=session_id, status__in=AgentCommand.UNFINISHED)
        assert not unfinished.exists(), list(unfinished.values("type", "status", "attempts"))

        # Recovery without a restart: the same agent process creates the next session.
        assert stack.agent.alive and stack.agent.proc.pid == pid
        again = create(cp, alice, cpu=0.25, memory_mb=128)
        wait_state(cp, alice, again, State.RUNNING, timeout=60, stack=stack)
        api(cp, alice, "DELETE", f"/sessions/{again}", expect=202)
        wait_state(cp, alice, again, State.TERMINATED, stack=stack)
        assert labelled(docker_client, stack.agent_id) == []
    finally:
        proxy.restore()
