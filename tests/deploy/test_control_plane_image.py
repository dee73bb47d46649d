"""The streamspace/control-plane image as an operator runs it: its default command (Daphne
on 0.0.0.0:8000), production settings (DEBUG=false), as uid 10001. Built by
scripts/build_images.sh when this checkout's tag is missing (cached by hash)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid

import pytest

from tests.deploy.images import BUILD_TIMEOUT, PREFIX, ensure_image, process_uids, wait_health

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(BUILD_TIMEOUT)]

HEADERS = {"Host": "localhost", "X-Forwarded-Proto": "https"}  # as a TLS proxy in front sends


def get(url: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=HEADERS)  # noqa: S310 (loopback)
    try:
        with urllib.request.urlopen(req, timeout=2) as r:  # noqa: S310
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_control_plane_image_serves_as_non_root_and_turns_healthy(pytestconfig, docker_client):
    image = ensure_image("control-plane", pytestconfig)
    t0 = time.monotonic()
    container = docker_client.containers.run(
        image,
        name=f"{PREFIX}cp-{uuid.uuid4().hex[:6]}",
        detach=True,
        ports={"8000/tcp": ("127.0.0.1", None)},
        environment={"SECRET_KEY": uuid.uuid4().hex * 2, "ALLOWED_HOSTS": "localhost"},
    )
    try:
        container.reload()
        port = container.attrs["NetworkSettings"]["Ports"]["8000/tcp"][0]["HostPort"]
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if get(base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            container.reload()
            assert container.status == "running", container.logs().decode()
            assert time.monotonic() < deadline, container.logs().decode()
            time.sleep(0.02)
        ready = time.monotonic() - t0
        print(f"control-plane image: docker run -> /healthz 200 in {ready:.2f}s")

        assert container.image.attrs["Config"]["User"] == "10001:10001"
        assert process_uids(container) == {"10001"}, container.top()
        # collectstatic ran at build: the viewer's noVNC (from the npm package) is served.
        status, body = get(base + "/static/novnc/core/rfb.js")
        assert status == 200 and b"export default class RFB" in body
        assert wait_health(container, 20) == "healthy", container.attrs["State"].get("Health")
        # Everything the app made in its var dir at start-up (SQLite, the filesystem broker's
        # folders) is its user's: a Celery worker of this image can queue and take tasks.
        code, out = container.exec_run(["sh", "-c", "find /app/var ! -user 10001; touch /app/var/celery-broker/out/x"])
        assert (code, out) == (0, b""), out.decode()
    finally:
        container.remove(force=True)


def test_the_control_plane_images_var_dir_is_empty_and_its_users(pytestconfig, docker_client):
    """The build (collectstatic imports the settings) leaves nothing in /app/var: no
    root-owned broker folders that uid 10001 could not write into."""
    image = ensure_image("control-plane", pytestconfig)
    out = docker_client.containers.run(
        image, ["sh", "-c", "test -w /app/var && stat -c %u /app/var && ls -A /app/var"], remove=True
    )
    assert out == b"10001\n", out.decode()
