"""Docker file transfers run as the desktop's non-root user, in the session's home path.

Real engine and the real desktop image (its entrypoint replaced by ``sleep``: no desktop
is needed to move files); the agent's FileStream and backend thread, driven from this
event loop as the agent's tunnel would."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid

import pytest

from agent_clients.backends import docker_files
from agent_clients.backends.base import BackendError
from agent_clients.runtime import files
from tests.conftest import DESKTOP_IMAGE

pytestmark = pytest.mark.docker


@pytest.fixture
def container_factory(docker_client):
    made = []

    def make(*, user: str | None = None, home: str | None = None, start: bool = False):
        labels = {docker_files.LABEL_HOME: home} if home else {}
        kwargs = {"user": user} if user is not None else {}
        c = docker_client.containers.create(DESKTOP_IMAGE, entrypoint=["sleep", "120"], labels=labels,
                                            name=f"ssfilesfix-{uuid.uuid4().hex[:8]}", **kwargs)  # fmt: skip
        made.append(c)
        if start:
            c.start()
        c.reload()
        return c

    yield make
    for c in made:
        c.remove(force=True)


@pytest.mark.parametrize(("user", "why"), [("0", "root"), ("0:0", "root"), ("root", "numeric"), ("user", "numeric")])
def test_a_desktop_whose_user_is_root_or_not_numeric_is_refused(docker_client, container_factory, user, why):
    container = container_factory(user=user, home="/home/user")
    with pytest.raises(BackendError) as exc:
        docker_files.Desktop(docker_client, container)
    assert why in exc.value.message and not exc.value.retryable


def test_the_image_user_is_used_and_the_home_comes_from_the_label(docker_client, container_factory):
    desktop = docker_files.Desktop(docker_client, container_factory(home="/srv/home"))
    assert (desktop.user, desktop.home) == ("1000:1000", "/srv/home")
    with pytest.raises(BackendError):
        docker_files.Desktop(docker_client, container_factory())  # no label and no session home


async def _run(docker_client, container, request, body: bytes = b"") -> tuple[list[dict], bytes]:
    """One transfer through the agent's FileStream: (header lines, raw bytes after the first)."""

    class Backend:
        def file_transfer(self, session_id, req, stream):
            docker_files.transfer(docker_client, container, req, stream)

    stream = files.start(Backend(), "s", request, asyncio.get_running_loop())
    out = bytearray()
    while chunk := await asyncio.wait_for(stream.read(1 << 20), 30):
        out += chunk
        if request["op"] == "put" and body and b"\n" in out:  # ready: send the body
            stream.write(body)
            body = b""
            await stream.drain()
    first, _, rest = bytes(out).partition(b"\n")
    if request["op"] == "get":  # one header line, then the file's bytes
        return [json.loads(first)], rest
    return [json.loads(line) for line in bytes(out).split(b"\n") if line], b""


@pytest.mark.asyncio
async def test_upload_and_download_in_a_home_other_than_home_user_as_uid_1000(docker_client, container_factory):
    container = container_factory(home="/tmp/elsewhere", start=True)
    code, _ = container.exec_run(["mkdir", "-p", "/tmp/elsewhere/Uploads"], user="1000:1000")
    assert code == 0
    data = os.urandom(3 * 1024 * 1024 + 5)
    lines, _ = await _run(docker_client, container, {"op": "put", "path": "Uploads/a.bin", "size": len(data)}, data)
    assert lines[-1] == {"ok": True, "name": "a.bin", "path": "Uploads/a.bin", "size": len(data)}, lines
    script = "cd /tmp/elsewhere/Uploads && stat -c %u:%g a.bin && sha256sum a.bin && ls -a"
    code, out = container.exec_run(["sh", "-c", script])
    owner, digest, _, *names = out.decode().split()
    assert (owner, digest) == ("1000:1000", hashlib.sha256(data).hexdigest())
    assert not [n for n in names if n.startswith(".ss-upload-")]
    lines, raw = await _run(docker_client, container, {"op": "get", "path": "Uploads/a.bin"})
    assert lines[0] == {"ok": True, "name": "a.bin", "size": len(data)} and raw == data
    # A root-only file in the home is not readable through a transfer (the user cannot read it).
    container.exec_run(["sh", "-c", "echo secret > /tmp/elsewhere/root.txt; chmod 600 /tmp/elsewhere/root.txt"],
                       user="0")  # fmt: skip
    lines, _ = await _run(docker_client, container, {"op": "get", "path": "root.txt"})
    assert lines == [{"ok": False, "status": 400, "error": "invalid", "detail": "the file is not readable"}]
