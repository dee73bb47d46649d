"""The Docker Compose deployment (deploy/compose/) on the real engine, end to end.

The images are built through the project's pipeline (scripts/build_images.sh; skipped when
their tags exist). Then the whole stack comes up from ``deploy/compose/compose.yaml`` with
Debian's docker-compose, under a project name of its own, on a free port, from an env file
made here with fresh secrets. Through the published port only: log in (JWT), start a
session that the containerised Docker agent runs on this engine, read the desktop's RFB
banner through the relay (the viewer WebSocket), terminate it; then ``down -v``, and
nothing of the project or of the session is left: containers, networks, volumes, the
session's egress rules in the host's iptables. Nothing is mocked."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from websockets.sync.client import connect

from agent_clients.backends.docker import container_name, network_name, volume_name
from agent_clients.backends.egress import Chains, IptablesEgress
from tests.deploy.images import ensure_image
from tests.docker.conftest import IMAGE as DESKTOP_IMAGE
from tests.docker.conftest import RUN_ID
from tests.live import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
IMAGES = ("control-plane", "docker-agent", "postgres", "redis")
SERVICES = ("postgres", "redis", "setup", "control-plane", "worker", "beat", "docker-agent")


# --- helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """One Compose project from deploy/compose/, driven with docker-compose."""

    def __init__(self, tmp_path: Path, refs: dict[str, str]):
        self.project = f"sscompose{secrets.token_hex(4)}"
        self.port = free_port()
        self.agent_id = f"{RUN_ID}-compose"  # the session leftover checks cover this id
        self.admin_password = secrets.token_hex(16)
        self.env_file = tmp_path / "compose.env"
        self.env_file.write_text(
            "\n".join(
                [
                    f"CONTROL_PLANE_IMAGE={refs['control-plane']}",
                    f"DOCKER_AGENT_IMAGE={refs['docker-agent']}",
                    f"POSTGRES_IMAGE={refs['postgres']}",
                    f"REDIS_IMAGE={refs['redis']}",
                    f"DESKTOP_IMAGE={DESKTOP_IMAGE}",
                    f"SECRET_KEY={secrets.token_hex(32)}",
                    f"POSTGRES_PASSWORD={secrets.token_hex(32)}",
                    f"ADMIN_PASSWORD={self.admin_password}",
                    f"AGENT_TOKEN={secrets.token_hex(32)}",
                    f"STREAMSPACE_PORT={self.port}",
                    f"AGENT_ID={self.agent_id}",
                    "MAX_SESSIONS=2",
                    f"DOCKER_GID={os.stat('/var/run/docker.sock').st_gid}",
                    "",
                ]
            )
        )

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        # Only what docker-compose needs from the environment: variables of the test run
        # (DATABASE_URL, SECRET_KEY, ...) would win over the env file.
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST", "LANG")}
        return subprocess.run(
            ["docker-compose", "--env-file", str(self.env_file), "-p", self.project, "-f", "compose.yaml", *args],
            cwd=COMPOSE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def logs(self) -> str:
        """What each service said last, and their states: for a failure's message."""
        ps = self.compose("ps", timeout=60).stdout
        logs = self.compose("logs", "--no-color", "--tail", "40", timeout=60).stdout
        return f"{ps}\n{logs[-15000:]}"

    def api(self, method: str, path: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request(
                method,
                "/api/v1" + path,
                body=None if body is None else json.dumps(body),
                headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
            )
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()


def project_objects(client, project: str) -> list[str]:
    """Every container, network and volume of a Compose project (by its label)."""
    flt = {"label": f"com.docker.compose.project={project}"}
    return (
        [f"container {c.name}" for c in client.containers.list(all=True, filters=flt)]
        + [f"network {n.name}" for n in client.networks.list(filters=flt)]
        + [f"volume {v.name}" for v in client.volumes.list(filters=flt)]
    )


def session_objects(client, session_id: str) -> list[str]:
    import docker.errors

    found = []
    for kind, getter, name in (
        ("container", client.containers.get, container_name(session_id)),
        ("network", client.networks.get, network_name(session_id)),
        ("volume", client.volumes.get, volume_name(session_id)),
    ):
        try:
            getter(name)
            found.append(f"{kind} {name}")
        except docker.errors.NotFound:
            pass
    return found


def egress_chains(agent_id: str, session_id: str) -> list[str]:
    """The session's chains in the host's iptables (the agent installs them from its container)."""
    chains = Chains.of(agent_id, session_id)
    listing = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, timeout=30).stdout
    return [name for name in (chains.inbound, chains.forward) if f"-N {name}" in listing.splitlines()]


# --- the test -----------------------------------------------------------------------------


@pytest.mark.timeout(1500)  # a cold build of the four images is most of it
def test_the_compose_stack_runs_a_desktop_through_the_containerised_agent_and_leaves_nothing(
    docker_client, tmp_path, pytestconfig
):
    assert shutil.which("docker-compose"), "docker-compose is not installed (./dev test installs it)"
    started = time.monotonic()
    stack = Stack(tmp_path, {name: ensure_image(name, pytestconfig) for name in IMAGES})
    images_ready = time.monotonic()
    session_id = None
    try:
        # --- up: every service in its order, the one-shot setup finished ----------------
        up = stack.compose("up", "-d", timeout=240)
        assert up.returncode == 0, f"docker-compose up failed:\n{up.stderr[-4000:]}"
        up_done = time.monotonic()
        containers = {
            c.labels["com.docker.compose.service"]: c
            for c in docker_client.containers.list(
                all=True, filters={"label": f"com.docker.compose.project={stack.project}"}
            )
        }
        assert sorted(containers) == sorted(SERVICES)
        assert containers["setup"].attrs["State"]["ExitCode"] == 0
        # the control plane is published on the host's 127.0.0.1 only
        bindings = containers["control-plane"].attrs["NetworkSettings"]["Ports"]["8000/tcp"]
        assert [(b["HostIp"], b["HostPort"]) for b in bindings] == [("127.0.0.1", str(stack.port))]
        # nothing runs as root, the agent included (iptables has file capabilities)
        for name in ("postgres", "redis", "control-plane", "worker", "beat", "docker-agent"):
            uid = containers[name].exec_run(["id", "-u"]).output.strip()
            assert uid != b"0", f"{name} runs as root"

        # --- log in through the API, the agent is online --------------------------------
        status, body = stack.api("POST", "/auth/token", {"username": "admin", "password": stack.admin_password})
        assert status == 200, body
        jwt = body["access"]

        def agent_online():
            status, body = stack.api("GET", f"/agents/{stack.agent_id}", token=jwt)
            return status == 200 and body["status"] == "online"

        wait_for(agent_online, 60, 0.25, what=f"agent {stack.agent_id} online")
        agent_online_at = time.monotonic()

        # --- a session on the containerised agent ---------------------------------------
        status, body = stack.api(
            "POST", "/sessions", {"template": "debian-desktop", "cpu": 0.5, "memory_mb": 256}, token=jwt
        )
        assert status == 201, body
        session_id = body["id"]

        def session_in(state: str):
            def check():
                status, body = stack.api("GET", f"/sessions/{session_id}", token=jwt)
                assert status == 200, body
                assert body["state"] != "failed", f"session failed: {body['error_message']}"
                return body if body["state"] == state else None

            return check

        running = wait_for(session_in("running"), 60, 0.25, what="session running")
        assert running["agent_id"] == stack.agent_id
        container = docker_client.containers.get(container_name(session_id))
        assert container.labels["streamspace.agent"] == stack.agent_id
        # egress: the agent installed the desktop's rules in the host's iptables
        assert len(egress_chains(stack.agent_id, session_id)) == 2

        # --- the desktop's RFB banner through the relay ---------------------------------
        url = f"ws://127.0.0.1:{stack.port}/api/v1/vnc/{session_id}?token={jwt}"
        with connect(url, subprotocols=["binary"], open_timeout=10) as ws:
            data = b""
            deadline = time.monotonic() + 20
            while b"\n" not in data:
                frame = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
                data += frame if isinstance(frame, bytes) else frame.encode()
        assert data.startswith(b"RFB 003.008\n"), data[:40]
        banner_at = time.monotonic()

        # --- terminate: the session's container, network, volume and rules go -----------
        status, body = stack.api("DELETE", f"/sessions/{session_id}", token=jwt)
        assert status == 202, body
        wait_for(session_in("terminated"), 60, 0.25, what="session terminated")
        assert session_objects(docker_client, session_id) == []
        assert egress_chains(stack.agent_id, session_id) == []

        # --- down -v: nothing of the project is left ------------------------------------
        down_started = time.monotonic()
        down = stack.compose("down", "-v", "-t", "20", timeout=120)
        assert down.returncode == 0, down.stderr[-3000:]
        assert project_objects(docker_client, stack.project) == []
        down_done = time.monotonic()
        print(
            f"compose: images ready {images_ready - started:.1f}s, up {up_done - images_ready:.1f}s, "
            f"agent online +{agent_online_at - up_done:.1f}s, session and banner +{banner_at - agent_online_at:.1f}s, "
            f"down -v {down_done - down_started:.1f}s, total {down_done - started:.1f}s"
        )
    except Exception:
        print(f"--- the stack when it failed\n{stack.logs()}")  # shown with the failure
        raise
    finally:
        try:
            stack.compose("down", "-v", "-t", "5", timeout=120)
        finally:  # a down that fails or times out still leaves no session or rules behind
            remove_session_leftovers(docker_client, stack, session_id)


def remove_session_leftovers(docker_client, stack, session_id) -> None:
    """What a failed run left of the session (none when it passed)."""
    if session_id:
        for obj in session_objects(docker_client, session_id):
            kind, name = obj.split(" ", 1)
            getattr(docker_client, f"{kind}s").get(name).remove(**({"force": True} if kind != "network" else {}))
        IptablesEgress().remove(Chains.of(stack.agent_id, session_id))
