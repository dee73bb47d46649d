"""The Docker backend against a real engine and the real desktop image."""

from __future__ import annotations

import queue
import threading
import time

import docker
import pytest

from agent_clients.backends.base import BackendError, SessionSpec
from agent_clients.backends.docker import DockerBackend, container_name, network_name, volume_name
from tests.docker.conftest import IMAGE
from tests.docker.rfb import RFBError, Viewer, handshake

pytestmark = pytest.mark.docker


def _exists(client, kind: str, name: str) -> bool:
    try:
        getattr(client, kind).get(name)
        return True
    except docker.errors.NotFound:
        return False


def _nothing_left(client, sid: str) -> bool:
    return not (
        _exists(client, "containers", container_name(sid))
        or _exists(client, "networks", network_name(sid))
        or _exists(client, "volumes", volume_name(sid))
    )


def test_lifecycle_limits_auth_home_hibernate_wake_terminate(backend, docker_client, new_session, agent_id):
    spec = new_session(cpu=0.5, memory_mb=256)
    status = backend.create(spec)
    assert status.state == "running"
    assert status.vnc_host == "127.0.0.1" and status.vnc_port

    c = docker_client.containers.get(container_name(spec.session_id))
    host = c.attrs["HostConfig"]
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == 256 * 1024 * 1024
    bindings = c.attrs["NetworkSettings"]["Ports"]["5901/tcp"]
    assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]
    assert int(bindings[0]["HostPort"]) == status.vnc_port
    for obj_labels in (
        c.labels,
        docker_client.networks.get(network_name(spec.session_id)).attrs["Labels"],
        docker_client.volumes.get(volume_name(spec.session_id)).attrs["Labels"],
    ):
        assert obj_labels["streamspace.managed"] == "true"
        assert obj_labels["streamspace.session"] == spec.session_id
        assert obj_labels["streamspace.owner"] == "alice"
        assert obj_labels["streamspace.agent"] == agent_id
    assert backend.vnc_endpoint(spec.session_id) == ("127.0.0.1", status.vnc_port)

    assert handshake("127.0.0.1", status.vnc_port, spec.vnc_password)[:2] == (1280, 800)
    with pytest.raises(RFBError, match="authentication failed"):
        handshake("127.0.0.1", status.vnc_port, "wrong-pw")

    rc, out = c.exec_run(["sh", "-c", "echo kept-across-hibernate > $HOME/marker.txt && id -u"])
    assert rc == 0 and out.strip() == b"1000"

    hib = backend.hibernate(spec.session_id)
    assert hib.state == "hibernated"
    c.reload()
    assert c.status == "exited"
    assert backend.status(spec.session_id).state == "hibernated"
    assert _exists(docker_client, "volumes", volume_name(spec.session_id))
    assert _exists(docker_client, "networks", network_name(spec.session_id))
    assert backend.hibernate(spec.session_id).state == "hibernated"  # already stopped: done

    woken = backend.wake(spec.session_id)
    assert woken.state == "running" and woken.vnc_port
    assert handshake("127.0.0.1", woken.vnc_port, spec.vnc_password)[:2] == (1280, 800)
    c.reload()
    rc, out = c.exec_run(["cat", "/home/user/marker.txt"])
    assert rc == 0 and out.strip() == b"kept-across-hibernate"
    assert backend.status(spec.session_id).vnc_port == woken.vnc_port

    backend.terminate(spec.session_id)
    assert _nothing_left(docker_client, spec.session_id)
    assert backend.status(spec.session_id).state == "missing"
    backend.terminate(spec.session_id)  # gone counts as done


def test_repeated_create_finds_the_same_container(backend, docker_client, new_session):
    spec = new_session()
    first = backend.create(spec)
    cid = docker_client.containers.get(container_name(spec.session_id)).id
    again = backend.create(spec)
    assert docker_client.containers.get(container_name(spec.session_id)).id == cid
    assert again.vnc_port == first.vnc_port
    # A redelivered create after a hibernate starts the same container again.
    backend.hibernate(spec.session_id)
    third = backend.create(spec)
    assert third.state == "running"
    assert docker_client.containers.get(container_name(spec.session_id)).id == cid


def test_name_collision_leaves_the_foreign_container_alone(backend, docker_client, new_session):
    spec = new_session()
    foreign = docker_client.containers.create(IMAGE, name=container_name(spec.session_id), labels={"owner": "someone"})
    try:
        with pytest.raises(BackendError, match="name collision") as err:
            backend.create(spec)
        assert err.value.retryable is False
        foreign.reload()
        assert foreign.status == "created"
        assert not _exists(docker_client, "networks", network_name(spec.session_id))
        assert not _exists(docker_client, "volumes", volume_name(spec.session_id))
        assert backend.status(spec.session_id).state == "missing"
        backend.terminate(spec.session_id)  # must not touch it either
        assert docker_client.containers.get(foreign.id).status == "created"
    finally:
        foreign.remove(force=True)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"image": "streamspace/no-such-image:never"}, "not present"),
        ({"cpu": 0}, "CPU limit"),
        ({"cpu": 10_000}, "CPU limit"),
        ({"memory_mb": 16}, "memory limit"),
        ({"memory_mb": 10**9}, "memory limit"),
        ({"vnc_password": ""}, "open VNC server"),
    ],
)
def test_bad_requests_fail_for_good_and_leave_nothing(backend, docker_client, new_session, fields, message):
    spec = new_session(**fields)
    with pytest.raises(BackendError, match=message) as err:
        backend.create(spec)
    assert err.value.retryable is False
    assert _nothing_left(docker_client, spec.session_id)


def test_container_dying_during_start_is_cleaned_up(backend, docker_client, new_session, agent_id):
    """A failure after the network and volume exist removes all three (no orphans)."""
    base = docker_client.containers.create(IMAGE)
    tag = f"streamspace/test-exits:{agent_id}"
    try:
        base.commit(
            repository=tag.split(":")[0],
            tag=tag.split(":")[1],
            changes=['ENTRYPOINT ["/bin/sh", "-c", "echo desktop broke >&2; exit 3"]'],
        )
        spec = new_session(image=tag)
        with pytest.raises(BackendError, match=r"exited with code 3.*desktop broke") as err:
            backend.create(spec)
        assert err.value.retryable is False
        assert _nothing_left(docker_client, spec.session_id)
    finally:
        base.remove(force=True)
        docker_client.images.remove(tag, force=True)


def test_max_sessions_refused(docker_client, new_session, agent_id):
    small = DockerBackend(docker_client, agent_id=f"{agent_id}-cap", max_sessions=1)
    first = new_session(b=small)
    assert small.create(first).state == "running"
    small.hibernate(first.session_id)  # stopped sessions count too
    second = new_session(b=small)
    with pytest.raises(BackendError, match="maximum is 1") as err:
        small.create(second)
    assert err.value.retryable is False
    assert _nothing_left(docker_client, second.session_id)
    assert small.capacity()["max_sessions"] == 1


def test_keep_home_keeps_the_volume(backend, docker_client, new_session):
    spec = new_session()
    backend.create(spec)
    backend.terminate(spec.session_id, keep_home=True)
    assert not _exists(docker_client, "containers", container_name(spec.session_id))
    assert not _exists(docker_client, "networks", network_name(spec.session_id))
    assert _exists(docker_client, "volumes", volume_name(spec.session_id))
    backend.terminate(spec.session_id)  # and the plain terminate removes it
    assert _nothing_left(docker_client, spec.session_id)


def test_fresh_backend_lists_what_the_engine_holds(backend, docker_client, new_session, agent_id):
    running, sleeping = new_session(), new_session()
    backend.create(running)
    backend.create(sleeping)
    backend.hibernate(sleeping.session_id)

    restarted = DockerBackend(docker.from_env(), agent_id=agent_id)  # an agent restart: no memory
    try:
        listed = {s.session_id: s for s in restarted.list_sessions()}
        assert listed[running.session_id].state == "running"
        assert listed[running.session_id].vnc_port == restarted.vnc_endpoint(running.session_id)[1]
        assert listed[sleeping.session_id].state == "hibernated"
        other = DockerBackend(docker_client, agent_id=f"{agent_id}-other")
        assert other.list_sessions() == []
        cap = restarted.capacity()
        assert cap["cpu"] >= 1 and cap["memory_mb"] > 256
        woken = restarted.wake(sleeping.session_id)
        assert handshake("127.0.0.1", woken.vnc_port, sleeping.vnc_password)
    finally:
        restarted.close()


def test_watch_reports_a_killed_container_but_not_a_hibernated_one(backend, docker_client, new_session):
    quiet, victim = new_session(), new_session()
    backend.create(quiet)
    backend.create(victim)
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    since = time.time()  # the engine replays events from here, however late the thread starts
    watcher = threading.Thread(target=backend.watch, args=(events.put, stop), kwargs={"since": since}, daemon=True)
    watcher.start()
    try:
        backend.hibernate(quiet.session_id)
        docker_client.containers.get(container_name(victim.session_id)).kill()
        event = events.get(timeout=15)
        # Events arrive in order: had the hibernate been reported, it would come first.
        assert event.session_id == victim.session_id
        assert event.state == "failed"
        assert event.detail == "container exited with code 137"
        assert backend.status(victim.session_id).state == "failed"
    finally:
        stop.set()
        t0 = time.monotonic()
        watcher.join(timeout=5)
    assert not watcher.is_alive()
    assert time.monotonic() - t0 < 2
    assert events.empty()


def _stable_frame(viewer: Viewer, timeout: float) -> bytes:
    """Poll full frames until two in a row are equal (the desktop has settled)."""
    deadline = time.monotonic() + timeout
    last = viewer.frame()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = viewer.frame()
        if now == last:
            return now
        last = now
    raise AssertionError("the desktop never settled")


def test_typing_reaches_the_focused_terminal(backend, docker_client, new_session):
    """What the browser test relies on: the xterm is up and has the keyboard focus."""
    spec = new_session()
    status = backend.create(spec)
    c = docker_client.containers.get(container_name(spec.session_id))
    deadline = time.monotonic() + 15
    while c.exec_run(["pgrep", "-x", "xterm"]).exit_code != 0:
        assert time.monotonic() < deadline, "no xterm on the desktop"
        time.sleep(0.1)
    viewer = Viewer("127.0.0.1", status.vnc_port, spec.vnc_password)
    try:
        assert (viewer.width, viewer.height) == (1280, 800)
        before = _stable_frame(viewer, 15)
        viewer.type("echo typed-into-the-desktop\n")
        deadline = time.monotonic() + 10
        while viewer.frame() == before:
            assert time.monotonic() < deadline, "typing did not change the picture"
            time.sleep(0.1)
    finally:
        viewer.close()
    rc, _ = c.exec_run(["sh", "-c", "test -d /proc/$(pgrep -x xterm)"])
    assert rc == 0


def test_engine_unreachable_is_retryable(monkeypatch, agent_id):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    from agent_clients.config import AgentConfig

    with pytest.raises(BackendError, match="unreachable") as err:
        DockerBackend.from_config(AgentConfig(agent_id=agent_id, control_plane_url="ws://127.0.0.1:1", token="t"))
    assert err.value.retryable is True
    offline = DockerBackend(
        docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.41"), agent_id=agent_id
    )
    with pytest.raises(BackendError, match="unreachable") as err:
        offline.list_sessions()
    assert err.value.retryable is True
    with pytest.raises(BackendError) as err:
        offline.create(SessionSpec(session_id="x1", owner="a", image=IMAGE, vnc_password="pw", cpu=0.5, memory_mb=256))
    assert err.value.retryable is True
