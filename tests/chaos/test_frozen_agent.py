"""An agent frozen (SIGSTOP) past the ack deadline while a create and a hibernate are sent,
then thawed (SIGCONT): the command frames sat in its socket buffer, so it carries them out
after the control plane gave up on them.

Real processes: Daphne, a Celery worker with beat (the sweeps), the Docker agent on the real
engine. COMMAND_ACK_TIMEOUT is 3 s in tests and COMMAND_MAX_ATTEMPTS 3, so both commands are
given up ~10 s into the freeze. Afterwards: every command finished with the status of what
happened, the engine and the database agree on every session, nothing is left once they are
terminated, and nothing was restarted."""

from __future__ import annotations

import signal

import pytest

from agents_app.models import Agent, AgentCommand
from sessions_app.models import Session
from sessions_app.states import State
from tests.chaos.support import container_status, disagreements, managed_objects, unfinished_commands
from tests.e2e.conftest import jwt_for
from tests.live import sweeping_celery_worker, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.docker]


def api(cp, user, method, path, body=None):
    status, data = cp.request(method, "/api/v1" + path, jwt_for(user), body)
    assert status in (200, 201, 202), f"{method} {path} answered {status}: {data}"
    return data


def state_of(session_id) -> str:
    return Session.objects.get(pk=session_id).state


def test_a_frozen_agents_late_answers_never_take_effect_unnoticed(
    control_plane, docker_stack, docker_client, desktop_template, alice
):
    cp = control_plane
    worker = sweeping_celery_worker()
    try:
        stack = docker_stack()
        agent = stack.agent
        pid = agent.proc.pid
        kept = api(cp, alice, "POST", "/sessions", {"template": "desktop", "cpu": 0.25, "memory_mb": 128})["id"]
        wait_for(lambda: state_of(kept) == State.RUNNING, 60, 0.1, what=f"running\n{stack.output()}")

        agent.signal(signal.SIGSTOP)
        # the agent's last heartbeat is still fresh: a create lands on it, and a hibernate
        late = api(cp, alice, "POST", "/sessions", {"template": "desktop", "cpu": 0.25, "memory_mb": 128})["id"]
        api(cp, alice, "POST", f"/sessions/{kept}/hibernate")

        def given_up() -> bool:
            statuses = set(AgentCommand.objects.filter(session_id__in=[kept, late]).values_list("status", flat=True))
            return AgentCommand.objects.filter(session_id__in=[kept, late]).count() == 3 and statuses == {
                "completed",  # the first create
                "failed",
            }

        wait_for(given_up, 40, 0.2, what=f"the sweep to give up both commands\n{worker.output()}")
        assert state_of(late) == State.FAILED and "did not acknowledge" in Session.objects.get(pk=late).error_message
        agent.signal(signal.SIGCONT)

        # The agent runs both late. The control plane hears the results and follows the truth:
        # every command's status says what happened (both ran, late), the failed session's
        # container is removed by a cleanup terminate, the hibernated desktop is shown hibernated.
        def commands() -> dict:
            return {
                (str(c.session_id), c.type): c.status for c in AgentCommand.objects.filter(session_id__in=[kept, late])
            }

        expected = {
            (kept, "create_session"): "completed",
            (kept, "hibernate_session"): "completed",
            (late, "create_session"): "completed",
            (late, "terminate_session"): "completed",  # the cleanup
        }

        def settled() -> bool:
            return (
                commands() == expected
                and state_of(kept) == State.HIBERNATED
                and not disagreements(docker_client, [kept, late])
            )

        wait_for(settled, 90, 0.2, what=f"the late answers reconciled: {commands()}\n{stack.output()}")
        assert state_of(late) in (State.FAILED, State.TERMINATED)  # never resurrected
        assert container_status(docker_client, late) is None
        assert container_status(docker_client, kept) == "exited"
        # recovered without a restart
        assert agent.alive and agent.proc.pid == pid
        wait_for(lambda: Agent.objects.get(agent_id=stack.agent_id).status == "online", 10, what="online")

        for session_id in (kept, late):
            api(cp, alice, "DELETE", f"/sessions/{session_id}")
        wait_for(
            lambda: (
                set(Session.objects.filter(pk__in=[kept, late]).values_list("state", flat=True)) == {State.TERMINATED}
            ),
            60,
            0.2,
            what=f"terminated\n{stack.output()}",
        )
        wait_for(lambda: not managed_objects(docker_client, stack.agent_id), 30, 0.2,
                 what=f"nothing left on the engine: {managed_objects(docker_client, stack.agent_id)}")  # fmt: skip
        assert not unfinished_commands([kept, late])
    finally:
        worker.stop()
