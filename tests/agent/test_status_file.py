"""The agent's STATUS_FILE (what the docker-agent image's health check reads): a real agent
process writes "connecting" until the control plane serves it, "connected" once its hello
is out, and "stopped" after a SIGTERM drain; an HA replica that does not lead, "standby".
The file is rewritten at start-up and touched while the agent runs; the image's health
check (images/docker-agent/healthcheck.sh, run here as the image runs it) fails on a stale one."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

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


HEALTHCHECK = Path(__file__).resolve().parents[2] / "images" / "docker-agent" / "healthcheck.sh"


def healthy(path) -> bool:
    done = subprocess.run(["sh", str(HEALTHCHECK)], env={"PATH": os.environ["PATH"], "STATUS_FILE": str(path)},
                          capture_output=True, timeout=10)  # fmt: skip
    return done.returncode == 0


def test_a_restarted_agent_replaces_a_crashed_ones_status_and_keeps_its_file_fresh(control_plane, tmp_path):
    _, token, _ = agent_register(agent_id="status-fresh-agent", platform="docker", region="test")
    status = tmp_path / "agent-status"
    # What a process killed while connected leaves behind: "connected", a minute old.
    status.write_text("connected\n")
    os.utime(status, (time.time() - 60, time.time() - 60))
    assert not healthy(status)  # stale: the health check does not believe it
    os.utime(status)
    assert healthy(status)

    os.utime(status, (time.time() - 60, time.time() - 60))
    nowhere = f"ws://127.0.0.1:{free_port()}"
    proc = agent_process(control_plane, "status-fresh-agent", token, CONTROL_PLANE_URL=nowhere,
                         backend="tests.support.file_backend:FileBackend", FILE_BACKEND_DIR=str(tmp_path / "state"),
                         STATUS_FILE=str(status), HEARTBEAT_INTERVAL="0.5").start()  # fmt: skip
    try:
        wait_for(lambda: state(status) == "connecting\n", 15, what=f"connecting\n{proc.output()}")
        first = status.stat().st_mtime
        # Still connecting (nothing answers), yet the file's time moves: the process is alive.
        wait_for(lambda: status.stat().st_mtime > first, 5, what=f"a touch\n{proc.output()}")
        assert state(status) == "connecting\n" and not healthy(status)
    finally:
        proc.kill()


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
        assert healthy(status)
        assert proc.stop(15) == 0, proc.output()  # SIGTERM: the drain
        assert state(status) == "stopped\n"
    finally:
        proc.kill()


def test_a_replica_waiting_for_leadership_says_standby(control_plane, tmp_path):
    _, token, _ = agent_register(agent_id="status-ha-agent", platform="docker", region="test")
    ha = dict(backend="tests.support.file_backend:FileBackend", FILE_BACKEND_DIR=str(tmp_path / "state"),
              HA_BACKEND="file", HA_LOCK_PATH=str(tmp_path / "leader.lock"))  # fmt: skip
    leader_status, standby_status = tmp_path / "leader-status", tmp_path / "standby-status"
    leader = agent_process(control_plane, "status-ha-agent", token, STATUS_FILE=str(leader_status), **ha).start()
    standby = None
    try:
        wait_for(lambda: state(leader_status) == "connected\n", 15, what=f"the leader connected\n{leader.output()}")
        standby = agent_process(control_plane, "status-ha-agent", token, name="agent-status-ha-2",
                                STATUS_FILE=str(standby_status), **ha).start()  # fmt: skip
        wait_for(lambda: state(standby_status) == "standby\n", 15, what=f"standby\n{standby.output()}")
        assert state(leader_status) == "connected\n"
    finally:
        leader.kill()
        if standby is not None:
            standby.kill()
