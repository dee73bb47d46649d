"""End-to-end fixtures: real Daphne control planes, real Docker agent processes on the real
engine, the desktop template. Reusable by any end-to-end suite (API, browser).

* ``control_plane`` / ``control_plane_b`` and ``desktop_template`` come from tests/conftest.py.
* ``docker_stack``: a factory that registers an agent (id prefixed with
  ``tests.docker.conftest.RUN_ID``, so the leftover checks cover what it creates), starts
  ``python -m agent_clients.docker_agent`` connected to a control plane, and waits until the
  agent row is online. At teardown it asks the control plane to terminate what the test left
  live, then stops every agent it started.
* ``docker_client`` is re-exported from tests/docker/conftest.py (engine + desktop image).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from tests.docker.conftest import RUN_ID, docker_client  # noqa: F401 (re-exported fixture)
from tests.live import ControlPlane, Process, agent_process, wait_for

_agent_numbers = itertools.count(1)


def jwt_for(user) -> str:
    from rest_framework_simplejwt.tokens import AccessToken

    return str(AccessToken.for_user(user))


@dataclass
class DockerStack:
    """What ``docker_stack`` starts: agent processes (replicas share an id and a token)."""

    control_plane: ControlPlane
    agent_id: str
    token: str
    processes: list[Process] = field(default_factory=list)

    @property
    def agent(self) -> Process:
        """The first process started (the only one unless replicas were added)."""
        return self.processes[0]

    def start_process(self, **env: str) -> Process:
        """Start one more agent process with this id and token (a restart, or an HA replica)."""
        proc = agent_process(
            self.control_plane,
            self.agent_id,
            self.token,
            module="agent_clients.docker_agent",
            name=f"agent-{self.agent_id}-{len(self.processes) + 1}",
            **env,
        ).start()
        self.processes.append(proc)
        return proc

    def wait_online(self, timeout: float = 30) -> None:
        from agents_app.models import Agent

        def online() -> bool:
            if not any(p.alive for p in self.processes):
                raise AssertionError("every agent process exited:\n" + self.output())
            return Agent.objects.filter(agent_id=self.agent_id, status="online").exclude(channel_name="").exists()

        wait_for(online, timeout, 0.05, what=f"agent {self.agent_id} online\n{self.output()}")

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.output()}" for p in self.processes)


@pytest.fixture
def docker_stack(transactional_db, docker_client, control_plane):  # noqa: F811
    """docker_stack(cp=None, wait=True, **agent env) -> DockerStack with one running agent.

    Agent env defaults: MAX_SESSIONS=10, heartbeat 1 s, reconnect cap 2 s."""
    from agents_app.services import agent_register

    stacks: list[DockerStack] = []

    def start(cp: ControlPlane | None = None, *, wait: bool = True, **env: str) -> DockerStack:
        agent_id = f"{RUN_ID}-e2e-{next(_agent_numbers)}"
        _, token, _ = agent_register(agent_id=agent_id, platform="docker", region="test")
        stack = DockerStack(cp or control_plane, agent_id, token)
        stacks.append(stack)
        env.setdefault("MAX_SESSIONS", "10")
        stack.start_process(**env)
        if wait:
            stack.wait_online()
        return stack

    yield start
    for stack in stacks:
        try:
            terminate_live_sessions(stack)
        finally:
            for proc in stack.processes:
                if proc.alive:
                    proc.stop(15)
                else:
                    proc.kill()  # closes the log file


def terminate_live_sessions(stack: DockerStack, timeout: float = 30) -> None:
    """After a failing test: end what is still live through the control plane while an
    agent is up (the session-finish leftover check catches anything this misses)."""
    from sessions_app.models import Session
    from sessions_app.states import State

    live = Session.objects.filter(agent__agent_id=stack.agent_id).exclude(state__in=[State.TERMINATED, State.FAILED])
    failed = Session.objects.filter(agent__agent_id=stack.agent_id, state=State.FAILED)
    ids = list(live.values_list("pk", flat=True)) + list(failed.values_list("pk", flat=True))
    if not ids:
        return
    for session in Session.objects.filter(pk__in=ids).select_related("owner"):
        stack.control_plane.request("DELETE", f"/api/v1/sessions/{session.pk}", jwt_for(session.owner))
    if any(p.alive for p in stack.processes):
        try:
            wait_for(
                lambda: not Session.objects.filter(pk__in=ids).exclude(state=State.TERMINATED).exists(),
                timeout,
                0.1,
                what="leftover sessions terminated",
            )
        except AssertionError as exc:
            print(f"docker_stack teardown: {exc}")
