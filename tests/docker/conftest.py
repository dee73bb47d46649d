"""Real Docker engine fixtures: the engine is started and the desktop image built (once,
cached by tag) by the project's own scripts; every test run uses a unique agent id and
must leave no container, network or volume of that id behind."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "streamspace/desktop:bookworm-3"
RUN_ID = f"test-{uuid.uuid4().hex[:8]}"  # agent ids of this run start with it


def _managed_leftovers(client) -> list[str]:
    def mine(labels) -> bool:
        return str((labels or {}).get("streamspace.agent", "")).startswith(RUN_ID)

    flt = {"label": "streamspace.managed=true"}
    found = []
    for c in client.containers.list(all=True, filters=flt):
        if mine(c.labels):
            found.append(f"container {c.name}")
            c.remove(force=True)
    for n in client.networks.list(filters=flt):
        if mine(n.attrs.get("Labels")):
            found.append(f"network {n.name}")
            n.remove()
    for v in client.volumes.list(filters=flt):
        if mine(v.attrs.get("Labels")):
            found.append(f"volume {v.name}")
            v.remove(force=True)
    return found


@pytest.fixture(scope="session")
def docker_client():
    for script in ("ensure_dockerd.sh", "build_desktop_image.sh"):
        done = subprocess.run(["bash", str(ROOT / "scripts" / script)], capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"scripts/{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    import docker

    client = docker.from_env()
    yield client
    leftovers = _managed_leftovers(client)
    client.close()
    assert not leftovers, f"tests left managed objects behind: {leftovers}"


@pytest.fixture(scope="session")
def agent_id() -> str:
    return RUN_ID


@pytest.fixture(scope="session")
def backend(docker_client, agent_id):
    from agent_clients.backends.docker import DockerBackend

    b = DockerBackend(docker_client, agent_id=agent_id, max_sessions=20, rfb_timeout=30)
    yield b


@pytest.fixture
def new_session(backend):
    """make(**spec fields) -> SessionSpec with a fresh id; terminated (home too) at teardown."""
    from agent_clients.backends.base import SessionSpec

    made: list[tuple[object, str]] = []

    def make(owner: str = "alice", b=None, **kwargs) -> SessionSpec:
        sid = kwargs.pop("session_id", None) or uuid.uuid4().hex[:12]
        kwargs.setdefault("image", IMAGE)
        kwargs.setdefault("vnc_password", "s3cret-pw")
        kwargs.setdefault("cpu", 0.5)
        kwargs.setdefault("memory_mb", 256)
        made.append((b or backend, sid))
        return SessionSpec(session_id=sid, owner=owner, **kwargs)

    yield make
    for b, sid in made:
        b.terminate(sid)
