"""The agent's own metrics port (METRICS_PORT): a real agent process serves Prometheus's
text format there, on 127.0.0.1 unless METRICS_BIND says otherwise. What it counts
through a real command and tunnel is checked in tests/e2e/test_metrics_processes.py."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from agents_app.models import Agent
from agents_app.services import agent_register
from tests.live import agent_process, free_port, wait_for
from tests.support.metrics import samples, value

pytestmark = pytest.mark.django_db(transaction=True)


def scrape(host: str, port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as response:  # loopback
            return samples(response.read().decode())
    except OSError:
        return None


def refused(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) != 0


@pytest.mark.parametrize("bind", [None, "127.0.0.2"], ids=["default-loopback", "configured-bind"])
def test_a_real_agent_serves_its_metrics_on_the_configured_port_and_address(control_plane, tmp_path, bind):
    _, token, _ = agent_register(agent_id="metrics-port-agent", platform="docker", region="test")
    port = free_port()
    env = {"METRICS_PORT": str(port)} | ({"METRICS_BIND": bind} if bind else {})
    proc = agent_process(
        control_plane, "metrics-port-agent", token, backend="tests.support.file_backend:FileBackend",
        FILE_BACKEND_DIR=str(tmp_path / "state"), **env,
    ).start()  # fmt: skip
    host, other = (bind, "127.0.0.1") if bind else ("127.0.0.1", "127.0.0.2")
    try:
        wait_for(lambda: Agent.objects.get(agent_id="metrics-port-agent").status == "online", 15,
                 what=f"the agent online\n{proc.output()}")  # fmt: skip
        found = wait_for(lambda: (f := scrape(host, port)) and value(f, "streamspace_agent_connected") == 1 and f,
                         10, what=f"the agent's metrics saying it is connected\n{proc.output()}")  # fmt: skip
        assert value(found, "streamspace_agent_tunnels_open") == 0
        assert value(found, "streamspace_agent_backend_call_seconds_count", call="list_sessions_and_capacity") >= 1
        assert refused(other, port), f"the metrics port answers on {other} too"
    finally:
        proc.kill()
