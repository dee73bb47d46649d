"""The agent's STATUS_FILE (what the docker-agent image's health check reads): a real agent
process writes "connecting" until the control plane serves it, "connected" once its hello
is out, and "stopped" after a SIGTERM drain."""

from __future__ import annotations

import pytest

from agents_app.models import Agent
from agents_app.services import agent_register
from tests.live import agent_process, free_port, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def state(path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def test_a_real_agent_writes_its_connection_state_to_the_status_file(control_plane, tmp_path):
    _, token, _ = agent_register(agent_id="status-file-agent", platform="docker", region="test")
    status = tmp_path / "agent-status"
    common = dict(backend="tests.support.file_backend:FileBackend", FILE_BACKEND_DIR=str(tmp_path / "state"),
                  STATUS_FILE=str(status))  # fmt: skip

    # No control plane answers on this port: the agent keeps trying, and says so.
    nowhere = f"ws://127.0.0.1:{free_port()}"
    lost = agent_process(control_plane, "status-file-agent", token, CONTROL_PLANE_URL=nowhere, **common).start()
    try:
        wait_for(lambda: state(status) == "connecting\n", 15, what=f"connecting\n{lost.output()}")
    finally:
        lost.kill()

    proc = agent_process(control_plane, "status-file-agent", token, **common).start()
    try:
        wait_for(lambda: Agent.objects.get(agent_id="status-file-agent").status == "online", 15,
                 what=f"the agent online\n{proc.output()}")  # fmt: skip
        wait_for(lambda: state(status) == "connected\n", 5, what=f"connected\n{proc.output()}")
        assert proc.stop(15) == 0, proc.output()  # SIGTERM: the drain
        assert state(status) == "stopped\n"
    finally:
        proc.kill()
