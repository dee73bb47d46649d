"""Files in and out of a session, end to end: the REST API on a real Daphne, the real
Docker agent process on the real engine, the desktop image, PostgreSQL, Redis.

The agent is connected to Daphne A; the HTTP requests go to Daphne B (or a third process
with a small size limit), so every byte crosses processes through the Redis relay.
What is in the container is read with ``docker exec`` (sha256sum, find), never trusted
from the API's own answers."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid

import pytest
import requests

from agent_clients.backends.docker import container_name
from tests.e2e.conftest import jwt_for
from tests.e2e.test_docker_e2e import create, wait_state
from tests.live import ControlPlane, wait_for
from vnc_app.models import FileTransfer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.docker]

HOME = "/home/user"


def files_url(cp, session_id: str, path: str = "") -> str:
    return f"{cp.http_url}/api/v1/sessions/{session_id}/files" + (f"/{path}" if path else "")


def auth(user) -> dict:
    return {"Authorization": f"Bearer {jwt_for(user)}"}


def in_desktop(docker_client, session_id: str, script: str) -> str:
    code, out = docker_client.containers.get(container_name(session_id)).exec_run(["sh", "-c", script])
    assert code == 0, f"{script!r} failed ({code}): {out!r}"
    return out.decode()


def sha256_in_desktop(docker_client, session_id: str, path: str) -> str:
    return in_desktop(docker_client, session_id, f"sha256sum '{path}'").split()[0]


def leftovers(docker_client, session_id: str) -> str:
    """Temporary upload files anywhere in the desktop (none may survive a transfer)."""
    return in_desktop(docker_client, session_id, "find / -xdev -name '.ss-upload-*' 2>/dev/null; true").strip()


@pytest.fixture
def running(docker_stack, control_plane, control_plane_b, desktop_template, alice):
    """A running desktop of alice's on an agent connected to Daphne A."""
    stack = docker_stack()
    sid = create(control_plane, alice)
    wait_state(control_plane, alice, sid, "running", 60, stack)
    return sid


def test_owner_uploads_lists_and_downloads_staff_may_too_another_user_finds_nothing(
    running, control_plane_b, docker_client, alice, bob, carol
):
    sid, cp = running, control_plane_b
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = hashlib.sha256(data).hexdigest()

    r = requests.put(files_url(cp, sid, "Uploads/hello world.bin"), data=data, headers=auth(alice), timeout=60)
    assert r.status_code == 201, r.text
    assert r.json() == {"name": "hello world.bin", "path": "Uploads/hello world.bin", "size": len(data)}
    assert sha256_in_desktop(docker_client, sid, f"{HOME}/Uploads/hello world.bin") == digest
    owner = in_desktop(docker_client, sid, f"stat -c %u:%g '{HOME}/Uploads/hello world.bin'").strip()
    assert owner == "1000:1000"  # the desktop's user may edit and delete it

    listing = requests.get(files_url(cp, sid), params={"path": "Uploads"}, headers=auth(alice), timeout=30)
    assert listing.status_code == 200, listing.text
    entry = next(e for e in listing.json()["entries"] if e["name"] == "hello world.bin")
    assert entry["type"] == "file" and entry["size"] == len(data)

    got = requests.get(files_url(cp, sid, "Uploads/hello world.bin"), headers=auth(alice), timeout=60)
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == digest
    assert "attachment" in got.headers["content-disposition"]

    # Another user: the session does not exist for them, whatever they try; nothing is written.
    for method, url, kwargs in [
        ("GET", files_url(cp, sid), {}),
        ("GET", files_url(cp, sid, "Uploads/hello world.bin"), {}),
        ("PUT", files_url(cp, sid, "Uploads/bob.txt"), {"data": b"bob was here"}),
    ]:
        r = requests.request(method, url, headers=auth(bob), timeout=30, **kwargs)
        assert r.status_code == 404, (method, url, r.text)
        assert r.json()["error"] == "not_found"
    assert "bob.txt" not in in_desktop(docker_client, sid, f"ls -a {HOME}/Uploads")

    # Staff may too; a client that asks for bytes (Accept: application/octet-stream) gets them.
    staff = requests.get(files_url(cp, sid, "Uploads/hello world.bin"), timeout=60,
                         headers={**auth(carol), "Accept": "application/octet-stream"})  # fmt: skip
    assert staff.status_code == 200 and hashlib.sha256(staff.content).hexdigest() == digest
    # HEAD would be a whole download: refused, and no audit row (the rows below).
    head = requests.head(files_url(cp, sid, "Uploads/hello world.bin"), headers=auth(alice), timeout=30)
    assert head.status_code == 405

    # The Downloads folder exists and lists (empty at first); a file put there is listed.
    in_desktop(docker_client, sid, f"mkdir -p {HOME}/Downloads && printf report > {HOME}/Downloads/report.txt")
    listing = requests.get(files_url(cp, sid), headers=auth(alice), timeout=30).json()
    assert listing["path"] == "Downloads" and [e["name"] for e in listing["entries"]] == ["report.txt"]

    rows = list(FileTransfer.objects.order_by("started_at").values_list("user__username", "direction", "path",
                                                                        "bytes", "outcome"))  # fmt: skip
    assert rows == [
        ("alice", "upload", "Uploads/hello world.bin", len(data), "ok"),
        ("alice", "download", "Uploads/hello world.bin", len(data), "ok"),
        ("carol", "download", "Uploads/hello world.bin", len(data), "ok"),
    ]
    assert FileTransfer.objects.filter(session_id=sid).count() == 3


def test_paths_out_of_the_home_are_refused_with_400_and_nothing_is_written(running, control_plane_b, docker_client,
                                                                          alice):  # fmt: skip
    sid, cp = running, control_plane_b
    in_desktop(
        docker_client,
        sid,
        f"ln -s /etc {HOME}/etclink && ln -s /etc/passwd {HOME}/passwd-link && mkdir -p {HOME}/Uploads "
        f"&& ln -s /tmp {HOME}/Uploads/tmplink && ln -s /tmp/evil-target {HOME}/Uploads/dangling",
    )
    # /etc unchanged (/tmp is not compared whole: the desktop's own programs make and remove
    # files there while it starts; nothing named evil* may appear there, below).
    before = in_desktop(docker_client, sid, "ls -la --time-style=full-iso /etc")
    for path in [
        "%2e%2e/evil",  # ../evil
        "Uploads/%2e%2e/%2e%2e/evil",
        "/tmp/evil",  # .../files//tmp/evil: absolute
        "%2Ftmp%2Fevil",
        "Uploads/evil%00.txt",
        "etclink/evil",  # a link out of the home on the way
        "Uploads/tmplink/evil",
        "Uploads/dangling",  # the file itself is a link out of the home
    ]:
        r = requests.put(files_url(cp, sid, path), data=b"evil", headers=auth(alice), timeout=30)
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert r.json()["error"] in ("invalid", "malformed"), r.text
    for path in ["passwd-link", "etclink/passwd", "%2e%2e/%2e%2e/etc/passwd", "/etc/passwd"]:
        r = requests.get(files_url(cp, sid, path), headers=auth(alice), timeout=30)
        assert r.status_code == 400, (path, r.status_code, r.text)
    for path in ["etclink", "..", "/etc", "Uploads/tmplink"]:
        r = requests.get(files_url(cp, sid), params={"path": path}, headers=auth(alice), timeout=30)
        assert r.status_code == 400, (path, r.status_code, r.text)

    assert in_desktop(docker_client, sid, "ls -la --time-style=full-iso /etc") == before
    assert "evil" not in in_desktop(docker_client, sid, f"find {HOME} /tmp /etc -name 'evil*'; true")
    assert leftovers(docker_client, sid) == ""
    assert not FileTransfer.objects.filter(outcome="ok").exists()


def test_over_size_is_413_before_a_byte_and_a_broken_upload_leaves_nothing(running, docker_client, alice):
    sid = running
    small = ControlPlane("daphne-small", FILE_TRANSFER_MAX_BYTES=str(5 * 1024 * 1024), FILE_TRANSFER_STALL_TIMEOUT="3",
                         FILE_TRANSFER_MAX_PER_SESSION="1").start()  # fmt: skip
    try:
        big = os.urandom(5 * 1024 * 1024 + 1)
        r = requests.put(files_url(small, sid, "Uploads/big.bin"), data=big, headers=auth(alice), timeout=60)
        assert r.status_code == 413 and r.json()["error"] == "too_large", r.text

        # No Content-Length (a chunked body): refused, nothing read.
        r = requests.put(files_url(small, sid, "Uploads/chunked.bin"), data=iter([b"a" * 1000]),
                         headers=auth(alice), timeout=30)  # fmt: skip
        assert r.status_code == 411, r.text

        # A client that goes away after 3 of 4 MiB: nothing under the name, no temporary file.
        with socket.create_connection(("127.0.0.1", small.port)) as conn:
            head = (f"PUT /api/v1/sessions/{sid}/files/Uploads/broken.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: Bearer {jwt_for(alice)}\r\nContent-Length: {4 * 1024 * 1024}\r\n\r\n")  # fmt: skip
            conn.sendall(head.encode())
            for _ in range(3):
                conn.sendall(os.urandom(1024 * 1024))
            wait_for(lambda: FileTransfer.objects.filter(path="Uploads/broken.bin").exists(), 20, 0.05,
                     what="the broken upload to begin")  # fmt: skip
        wait_for(
            lambda: FileTransfer.objects.filter(path="Uploads/broken.bin", outcome="failed").exists(),
            30,
            0.1,
            what="the broken upload recorded as failed",
        )
        wait_for(lambda: leftovers(docker_client, sid) == "", 15, 0.2, what="no temporary upload file left")
        names = in_desktop(docker_client, sid, f"ls -a {HOME}/Uploads")
        assert "big.bin" not in names and "chunked.bin" not in names and "broken.bin" not in names

        # A client that stalls mid-upload is answered 408 after the stall timeout (3 s here),
        # and while it is in flight a second transfer of the session is 429 (limit 1 here).
        with socket.create_connection(("127.0.0.1", small.port)) as conn:
            head = (f"PUT /api/v1/sessions/{sid}/files/Uploads/stalled.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: Bearer {jwt_for(alice)}\r\nContent-Length: {4 * 1024 * 1024}\r\n\r\n")  # fmt: skip
            conn.sendall(head.encode() + os.urandom(1024 * 1024))
            wait_for(lambda: FileTransfer.objects.filter(path="Uploads/stalled.bin").exists(), 20, 0.05,
                     what="the stalled upload to begin")  # fmt: skip
            busy = requests.get(files_url(small, sid, "Uploads/hello.bin"), headers=auth(alice), timeout=30)
            assert busy.status_code == 429 and busy.json()["error"] == "too_many_transfers", busy.text
            conn.settimeout(20)
            started = time.monotonic()
            answer = conn.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert time.monotonic() - started < 15
        wait_for(lambda: FileTransfer.objects.filter(path="Uploads/stalled.bin", outcome="failed").exists(), 20, 0.1,
                 what="the stalled upload recorded as failed")  # fmt: skip
        wait_for(lambda: leftovers(docker_client, sid) == "", 15, 0.2, what="no temporary upload file left")

        # The limit is per file: one just under it goes through.
        ok = os.urandom(5 * 1024 * 1024)
        r = requests.put(files_url(small, sid, f"Uploads/ok-{uuid.uuid4().hex[:6]}.bin"), data=ok,
                         headers=auth(alice), timeout=60)  # fmt: skip
        assert r.status_code == 201, r.text
    finally:
        small.stop()


def test_a_download_whose_desktop_dies_midway_ends_the_clients_read_with_an_error_and_the_row_failed(
    running, control_plane_b, docker_client, alice
):
    """Once the 200 and its Content-Length are out, a failure cannot change the status: the
    client must see a truncated body (an error), never a hang nor a silently short file."""
    sid, cp = running, control_plane_b
    size = 400 * 1024 * 1024
    in_desktop(docker_client, sid, f"head -c {size} /dev/zero > {HOME}/Downloads/big.bin")
    r = requests.get(files_url(cp, sid, "Downloads/big.bin"), headers=auth(alice), stream=True, timeout=(10, 30))
    assert r.status_code == 200 and int(r.headers["content-length"]) == size
    body = r.raw.read(2 * 1024 * 1024)  # the transfer is under way; the client holds it back
    assert len(body) == 2 * 1024 * 1024
    docker_client.containers.get(container_name(sid)).kill()
    started = time.monotonic()
    got = len(body)
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        for chunk in r.iter_content(1024 * 1024):
            got += len(chunk)
    assert got < size
    assert time.monotonic() - started < 20, "the client's read did not end in a bounded time"
    wait_for(lambda: FileTransfer.objects.filter(path="Downloads/big.bin", outcome="failed").exists(), 20, 0.1,
             what="the broken download recorded as failed")  # fmt: skip
