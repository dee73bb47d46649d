"""What every chaos test checks: the engine and the control plane agree, nothing is lost,
nothing is left behind."""

from __future__ import annotations

import docker.errors

from agent_clients.backends.docker import container_name
from agents_app.models import AgentCommand
from sessions_app.models import Session
from sessions_app.states import State

# The container state the engine must show for each session state (None: no container).
ENGINE_STATE_FOR = {
    State.RUNNING: "running",
    State.HIBERNATED: "exited",
    State.FAILED: None,
    State.TERMINATED: None,
}


def container_status(client, session_id) -> str | None:
    try:
        return client.containers.get(container_name(str(session_id))).status
    except docker.errors.NotFound:
        return None


def disagreements(client, session_ids) -> list[str]:
    """Sessions whose state and container disagree (only settled states are compared)."""
    found = []
    for session in Session.objects.filter(pk__in=session_ids):
        expected = ENGINE_STATE_FOR.get(session.state, "?")
        actual = container_status(client, session.pk)
        if expected != actual:
            found.append(f"{session.pk}: {session.state} in the database, container {actual or 'absent'}")
    return found


def unfinished_commands(session_ids) -> list[str]:
    return [
        f"{c.type} {c.command_id} {c.status}"
        for c in AgentCommand.objects.filter(session_id__in=session_ids, status__in=AgentCommand.UNFINISHED)
    ]


def managed_objects(client, agent_id: str) -> list[str]:
    """Every managed container, network and volume of one agent on the engine."""
    flt = {"label": [f"streamspace.agent={agent_id}", "streamspace.managed=true"]}
    return (
        [f"container {c.name}" for c in client.containers.list(all=True, filters=flt)]
        + [f"network {n.name}" for n in client.networks.list(filters=flt)]
        + [f"volume {v.name}" for v in client.volumes.list(filters=flt)]
    )
