"""The real agent runtime process against a real Daphne with the Redis channel layer.

The agent runs ``tests.support.file_backend.FileBackend``, a stand-in backend for tests:
the Docker and Kubernetes backends have their own suites (tests/docker, tests/e2e,
tests/k8s). Everything else is real: processes, sockets, Redis, PostgreSQL, Celery."""

import itertools
import signal
import time

import pytest

from agents_app.models import Agent, AgentCommand
from agents_app.services import agent_register
from sessions_app.models import Session, Template
from sessions_app.states import State
from tests.channel.test_agent_socket import jwt
from tests.live import agent_process, sweeping_celery_worker, wait_for
from tests.support.file_backend import FileBackend

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def desktop(transactional_db):
    return Template.objects.create(slug="desktop", name="Desktop", image="img:1")


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "file-backend"


@pytest.fixture
def start_agent(control_plane, state_dir):
    started = []

    def start(agent_id="agent-1", token=None, **env):
        if token is None:
            _, token, _ = agent_register(agent_id=agent_id, platform="docker", region="test")
        proc = agent_process(
            control_plane,
            agent_id,
            token,
            backend="tests.support.file_backend:FileBackend",
            FILE_BACKEND_DIR=str(state_dir),
            **env,
        ).start()
        started.append(proc)
        proc.token = token
        wait_for(lambda: Agent.objects.get(agent_id=agent_id).status == "online", 15, 0.05,
                 what=f"agent online\n{proc.output()}")  # fmt: skip
        return proc

    yield start
    for proc in started:
        proc.kill() if proc.alive else None


def create_session(cp, user):
    status, body = cp.request("POST", "/api/v1/sessions", jwt(user), {"template": "desktop"})
    assert status == 201, body
    return body["id"]


def state_of(session_id):
    return Session.objects.get(pk=session_id).state


def test_an_api_create_reaches_the_agent_within_a_second_and_runs(
    control_plane, start_agent, state_dir, alice, desktop
):
    agent = start_agent()
    started = time.monotonic()
    session_id = create_session(control_plane, alice)
    wait_for(lambda: FileBackend.executions(state_dir, "create", session_id) == 1, 1.0, 0.01,
             what=f"the agent to run create within a second\n{agent.output()}")  # fmt: skip
    assert time.monotonic() - started < 1.0
    wait_for(lambda: state_of(session_id) == State.RUNNING, 5, what="running")
    command = AgentCommand.objects.get(session_id=session_id)
    assert command.status == "completed" and command.attempts == 1


def test_sigkill_between_ack_and_complete_is_redelivered_and_not_executed_twice(
    control_plane, start_agent, state_dir, alice, desktop
):
    agent = start_agent(FILE_BACKEND_RETURN_DELAY="30")
    session_id = create_session(control_plane, alice)
    # the backend has made the session, the agent has acked, but has not reported completion
    wait_for(lambda: FileBackend.executions(state_dir, "create", session_id) == 1, 5, what="created in the backend")
    # the ack travels on its own: the backend may have finished before the control plane wrote it
    wait_for(lambda: AgentCommand.objects.get(session_id=session_id).status == "acked", 5, what="the ack recorded")
    agent.kill()
    assert state_of(session_id) == State.STARTING
    restarted = start_agent(token=agent.token, FILE_BACKEND_RETURN_DELAY="0")
    wait_for(lambda: state_of(session_id) == State.RUNNING, 15, what=f"running after restart\n{restarted.output()}")
    assert FileBackend.executions(state_dir, "create", session_id) == 1
    assert Session.objects.filter(owner=alice).count() == 1
    command = AgentCommand.objects.get(session_id=session_id)
    assert command.status == "completed" and command.attempts == 2


def test_the_agent_comes_back_after_the_control_plane_restarts(control_plane, start_agent, alice, desktop):
    start_agent(HEARTBEAT_INTERVAL="1", RECONNECT_CAP="2")
    before = Agent.objects.get(agent_id="agent-1").channel_name
    control_plane.restart()
    restarted_at = time.monotonic()
    wait_for(lambda: Agent.objects.get(agent_id="agent-1").channel_name not in ("", before), 10, 0.05,
             what="the agent to reconnect")  # fmt: skip
    assert time.monotonic() - restarted_at <= 2 + 1.5  # the backoff cap, plus the handshake and hello
    beat = Agent.objects.get(agent_id="agent-1").last_heartbeat
    wait_for(lambda: Agent.objects.get(agent_id="agent-1").last_heartbeat > beat, 5, what="heartbeats resume")
    # and it still takes commands
    session_id = create_session(control_plane, alice)
    wait_for(lambda: state_of(session_id) == State.RUNNING, 5, what="running")


def test_a_frozen_agent_goes_offline_and_its_sessions_degrade_then_recover(control_plane, start_agent, alice, desktop):
    worker = sweeping_celery_worker()
    try:
        agent = start_agent(HEARTBEAT_INTERVAL="1")
        session_id = create_session(control_plane, alice)
        wait_for(lambda: state_of(session_id) == State.RUNNING, 5, what="running")
        agent.signal(signal.SIGSTOP)  # no heartbeats, socket open
        frozen_at = time.monotonic()
        wait_for(lambda: state_of(session_id) == State.DEGRADED, 10, 0.1, what=f"degraded\n{worker.output()}")
        assert time.monotonic() - frozen_at <= 3 * 1 + 2  # three intervals, plus one sweep period and slack
        assert Agent.objects.get(agent_id="agent-1").status == "offline"
        agent.signal(signal.SIGCONT)
        wait_for(lambda: state_of(session_id) == State.RUNNING, 10, 0.1, what="running again")
        assert Agent.objects.get(agent_id="agent-1").status == "online"
    finally:
        worker.stop()


def test_sigterm_drains_and_sessions_keep_running(control_plane, start_agent, state_dir, alice, desktop):
    agent = start_agent()
    session_id = create_session(control_plane, alice)
    wait_for(lambda: state_of(session_id) == State.RUNNING, 5, what="running")
    assert agent.stop() == 0
    assert FileBackend.read_state(state_dir)["sessions"][session_id]["state"] == "running"
    assert state_of(session_id) == State.RUNNING


def test_a_retryable_failure_is_retried_after_a_backoff_with_a_fresh_execution(
    control_plane, start_agent, state_dir, alice
):
    """The backend fails twice retryably, then creates: three executions, spaced by the backoff
    (COMMAND_RETRY_BACKOFF_BASE is 1 s in tests: 1 s, then 2 s), and the session runs."""
    Template.objects.create(slug="flaky", name="Flaky", image="img:fail-retryable-2")
    worker = sweeping_celery_worker()  # the sweep pokes the agent when a retry is due
    try:
        agent = start_agent()
        status, body = control_plane.request("POST", "/api/v1/sessions", jwt(alice), {"template": "flaky"})
        assert status == 201, body
        session_id = body["id"]
        wait_for(lambda: state_of(session_id) in (State.RUNNING, State.FAILED), 20, 0.1,
                 what=f"the create settled\n{agent.output()}")  # fmt: skip
        session = Session.objects.get(pk=session_id)
        assert session.state == State.RUNNING, session.error_message
        calls = FileBackend.read_state(state_dir)["create_calls"][session_id]
        gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
        assert len(calls) == 3, calls
        assert 1.0 <= gaps[0] < 1.0 + 1.5 and 2.0 <= gaps[1] < 2.0 + 1.5, gaps
        command = AgentCommand.objects.get(session_id=session_id)
        assert (command.status, command.execution, command.attempts) == ("completed", 3, 3)
        assert FileBackend.executions(state_dir, "create", session_id) == 1
    finally:
        worker.stop()


def test_a_permanent_failure_fails_the_session_at_once(control_plane, start_agent, state_dir, alice):
    Template.objects.create(slug="broken", name="Broken", image="img:fail-permanent")
    start_agent()
    status, body = control_plane.request("POST", "/api/v1/sessions", jwt(alice), {"template": "broken"})
    assert status == 201, body
    wait_for(lambda: state_of(body["id"]) == State.FAILED, 5, what="failed")
    command = AgentCommand.objects.get(session_id=body["id"])
    assert (command.status, command.execution, command.attempts) == ("failed", 1, 1)
    assert len(FileBackend.read_state(state_dir)["create_calls"][body["id"]]) == 1
