"""The Docker agent on a real engine, end to end through the control plane.

REST API (JWT) -> a real Daphne -> the real agent process (``python -m
agent_clients.docker_agent``) -> the Docker engine, and back. Everything is real: the
desktop image, PostgreSQL, the Redis channel layer, Celery's sweeps, Redis leadership.
Synchronisation is by polling (``wait_for``), never by sleeping."""

from __future__ import annotations

import time
import uuid

import docker.errors
import pytest
import redis

from agent_clients.backends.docker import container_name, network_name, volume_name
from agents_app.models import Agent, AgentCommand
from sessions_app.models import Session, Template
from sessions_app.states import State
from tests.e2e.conftest import jwt_for
from tests.live import REDIS_URL, sweeping_celery_worker, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.docker]


# --- helpers ------------------------------------------------------------------------------


def api(cp, user, method: str, path: str, body=None, expect: int | tuple = (200, 201, 202)) -> dict:
    status, data = cp.request(method, "/api/v1" + path, jwt_for(user), body)
    expected = expect if isinstance(expect, tuple) else (expect,)
    assert status in expected, f"{method} {path} answered {status}: {data}"
    return data


def create(cp, user, **body) -> str:
    return api(cp, user, "POST", "/sessions", {"template": "desktop", **body}, expect=201)["id"]


def wait_state(cp, user, session_id: str, state: str, timeout: float = 30, stack=None) -> dict:
    """Poll the API until the session is in ``state``; fail at once on an unexpected failure."""

    def reached():
        data = api(cp, user, "GET", f"/sessions/{session_id}", expect=200)
        if data["state"] == State.FAILED and state != State.FAILED:
            raise AssertionError(f"session {session_id} failed: {data['error_message']}")
        return data if data["state"] == state else None

    logs = f"\n{stack.output()}" if stack is not None else ""
    return wait_for(reached, timeout, 0.05, what=f"session {session_id} {state}{logs}")


def engine_objects(client, session_id: str) -> dict[str, object | None]:
    """The container, network and volume of a session, None for those that do not exist."""
    found: dict[str, object | None] = {}
    for kind, getter, name in (
        ("container", client.containers.get, container_name(session_id)),
        ("network", client.networks.get, network_name(session_id)),
        ("volume", client.volumes.get, volume_name(session_id)),
    ):
        try:
            found[kind] = getter(name)
        except docker.errors.NotFound:
            found[kind] = None
    return found


def assert_nothing_left(client, session_id: str) -> None:
    left = {kind: obj for kind, obj in engine_objects(client, session_id).items() if obj is not None}
    assert not left, f"left on the engine for {session_id}: {sorted(left)}"


def full_log(proc) -> str:
    return proc.log_path.read_text(errors="replace")


def labelled(client, agent_id: str) -> list[str]:
    """Every managed object of one agent on the engine."""
    flt = {"label": [f"streamspace.agent={agent_id}", "streamspace.managed=true"]}
    return (
        [f"container {c.name}" for c in client.containers.list(all=True, filters=flt)]
        + [f"network {n.name}" for n in client.networks.list(filters=flt)]
        + [f"volume {v.name}" for v in client.volumes.list(filters=flt)]
    )


# --- the lifecycle ------------------------------------------------------------------------


def test_create_hibernate_wake_terminate_on_the_real_engine(
    control_plane, docker_stack, docker_client, desktop_template, alice
):
    stack = docker_stack()
    cp = control_plane

    session_id = create(cp, alice, cpu=0.5, memory_mb=256)
    running = wait_state(cp, alice, session_id, State.RUNNING, stack=stack)
    assert running["agent_id"] == stack.agent_id and running["platform"] == "docker"
    assert running["started_at"] and running["error_message"] is None

    # the container runs with the requested limits, the VNC port published on loopback only
    objects = engine_objects(docker_client, session_id)
    assert all(objects.values()), objects
    container = objects["container"]
    host_config = container.attrs["HostConfig"]
    assert container.status == "running"
    assert host_config["NanoCpus"] == 500_000_000
    assert host_config["Memory"] == 256 * 1024 * 1024
    assert [b["HostIp"] for b in container.attrs["NetworkSettings"]["Ports"]["5901/tcp"]] == ["127.0.0.1"]
    assert container.labels["streamspace.owner"] == "alice"
    row = Session.objects.get(pk=session_id)
    assert (row.vnc_host, row.vnc_port) == (
        "127.0.0.1",
        int(container.attrs["NetworkSettings"]["Ports"]["5901/tcp"][0]["HostPort"]),
    )
    marker = container.exec_run(["sh", "-c", "echo still-here > /home/user/marker"])
    assert marker.exit_code == 0, marker.output

    # hibernate: the container stops, its home volume and network stay
    api(cp, alice, "POST", f"/sessions/{session_id}/hibernate", expect=202)
    wait_state(cp, alice, session_id, State.HIBERNATED, stack=stack)
    objects = engine_objects(docker_client, session_id)
    assert objects["volume"] is not None and objects["network"] is not None
    assert objects["container"] is not None and objects["container"].status == "exited"

    # wake: the same container runs again, with the home it had
    api(cp, alice, "POST", f"/sessions/{session_id}/wake", expect=202)
    woken = wait_state(cp, alice, session_id, State.RUNNING, stack=stack)
    assert woken["agent_id"] == stack.agent_id
    container = docker_client.containers.get(container_name(session_id))
    assert container.status == "running" and container.id == objects["container"].id
    assert container.exec_run(["cat", "/home/user/marker"]).output.strip() == b"still-here"

    # terminate: nothing is left on the engine
    api(cp, alice, "DELETE", f"/sessions/{session_id}", expect=202)
    done = wait_state(cp, alice, session_id, State.TERMINATED, stack=stack)
    assert done["terminated_at"]
    assert_nothing_left(docker_client, session_id)
    assert labelled(docker_client, stack.agent_id) == []
    commands = AgentCommand.objects.filter(session_id=session_id).order_by("created_at")
    assert [(c.type, c.status) for c in commands] == [
        ("create_session", "completed"),
        ("hibernate_session", "completed"),
        ("wake_session", "completed"),
        ("terminate_session", "completed"),
    ]


# --- agent death ----------------------------------------------------------------------------


def test_sessions_survive_a_sigkilled_agent_and_are_reported_running_after_restart(
    control_plane, docker_stack, docker_client, desktop_template, alice
):
    worker = sweeping_celery_worker()  # the sweeps: agent liveness, degraded sessions
    try:
        stack = docker_stack(MAX_SESSIONS="5")
        cp = control_plane
        ids = [create(cp, alice, cpu=0.25, memory_mb=128) for _ in range(3)]
        for session_id in ids:
            wait_state(cp, alice, session_id, State.RUNNING, stack=stack)
        started_at = {sid: docker_client.containers.get(container_name(sid)).attrs["State"]["StartedAt"] for sid in ids}

        stack.agent.kill()  # SIGKILL: no drain, no goodbye
        killed_at = time.monotonic()
        # the containers do not depend on the agent process
        assert all(docker_client.containers.get(container_name(sid)).status == "running" for sid in ids)

        # the sweeps notice the silence (3 missed 1 s heartbeats) and degrade the sessions
        wait_for(
            lambda: set(Session.objects.filter(pk__in=ids).values_list("state", flat=True)) == {State.DEGRADED},
            15,
            0.1,
            what=f"the sessions degraded\n{worker.output()}",
        )
        assert Agent.objects.get(agent_id=stack.agent_id).status == "offline"
        degraded_after = time.monotonic() - killed_at

        restarted = stack.start_process(MAX_SESSIONS="5")
        restarted_at = time.monotonic()
        for session_id in ids:
            wait_state(cp, alice, session_id, State.RUNNING, timeout=20, stack=stack)
        recovered_after = time.monotonic() - restarted_at
        # the agent logs its hello after sending it: the control plane may have acted on it first
        wait_for(lambda: "hello sent (3 sessions)" in full_log(restarted), 5, what="the hello logged")
        assert Agent.objects.get(agent_id=stack.agent_id).status == "online"

        # 100% survival: the same containers, never restarted, endpoints intact
        survivors = [sid for sid in ids if docker_client.containers.get(container_name(sid)).status == "running"]
        assert survivors == ids
        assert {
            sid: docker_client.containers.get(container_name(sid)).attrs["State"]["StartedAt"] for sid in ids
        } == started_at
        assert all(s.vnc_port for s in Session.objects.filter(pk__in=ids))
        print(f"degraded {degraded_after:.1f}s after SIGKILL, running again {recovered_after:.1f}s after restart")

        for session_id in ids:
            api(cp, alice, "DELETE", f"/sessions/{session_id}", expect=202)
        for session_id in ids:
            wait_state(cp, alice, session_id, State.TERMINATED, stack=stack)
        assert labelled(docker_client, stack.agent_id) == []
    finally:
        worker.stop()


# --- two replicas, one leader -----------------------------------------------------------------


def test_two_replicas_with_the_redis_lock_one_acts_and_the_other_takes_over_within_5s(
    control_plane, docker_stack, docker_client, desktop_template, alice
):
    lock_name = f"streamspace-test-{uuid.uuid4().hex[:12]}"
    ha = {
        "HA_BACKEND": "redis",
        "HA_REDIS_URL": REDIS_URL,
        "HA_LOCK_NAME": lock_name,
        "HA_LEASE_DURATION": "3",
        "HA_RENEW_DEADLINE": "2",
        "HA_RETRY_PERIOD": "0.5",
    }
    r = redis.Redis.from_url(REDIS_URL)
    try:
        stack = docker_stack(wait=False, **ha)
        stack.start_process(**ha)  # the second replica: same agent id, same token
        stack.wait_online()
        cp = control_plane

        # exactly one replica holds the lock, and it is the one connected
        holder = wait_for(lambda: r.get(lock_name), 10, what="the lock taken")
        by_pid = {p.proc.pid: p for p in stack.processes}
        leader = by_pid[int(holder.decode().rsplit("-", 1)[1])]
        standby = next(p for p in stack.processes if p is not leader)
        wait_for(lambda: "hello sent" in leader.output(), 10, what=f"the leader's hello\n{stack.output()}")
        channel = Agent.objects.get(agent_id=stack.agent_id).channel_name

        first = create(cp, alice, cpu=0.25, memory_mb=128)
        wait_state(cp, alice, first, State.RUNNING, stack=stack)
        # only the leader connected and acted; the standby never replaced its socket
        assert first in full_log(leader)
        assert "connected to" not in full_log(standby) and first not in full_log(standby)
        assert Agent.objects.get(agent_id=stack.agent_id).channel_name == channel
        assert r.get(lock_name) == holder

        # kill the leader; queue work while no replica is connected
        leader.kill()
        killed_at = time.monotonic()
        second = create(cp, alice, cpu=0.25, memory_mb=128)  # the agent's last heartbeat is still fresh
        api(cp, alice, "DELETE", f"/sessions/{first}", expect=202)
        assert AgentCommand.objects.get(session_id=second).status in ("pending", "sent")  # nobody acked it

        wait_for(
            lambda: Agent.objects.get(agent_id=stack.agent_id).channel_name not in ("", channel),
            10,
            0.02,
            what=f"the standby connected\n{stack.output()}",
        )
        takeover = time.monotonic() - killed_at
        assert "leadership acquired" in full_log(standby)
        assert r.get(lock_name) != holder
        print(f"takeover {takeover:.2f}s after SIGKILL of the leader")
        assert takeover <= 5.0, f"takeover took {takeover:.2f}s"

        # the new leader completes what was queued meanwhile
        wait_state(cp, alice, second, State.RUNNING, stack=stack)
        wait_state(cp, alice, first, State.TERMINATED, stack=stack)
        assert second in full_log(standby)
        assert_nothing_left(docker_client, first)
        assert docker_client.containers.get(container_name(second)).status == "running"

        api(cp, alice, "DELETE", f"/sessions/{second}", expect=202)
        wait_state(cp, alice, second, State.TERMINATED, stack=stack)
        assert labelled(docker_client, stack.agent_id) == []
    finally:
        r.delete(lock_name)
        r.close()


# --- bad input ------------------------------------------------------------------------------


def test_a_template_whose_image_does_not_exist_fails_readably_and_leaves_nothing(
    control_plane, docker_stack, docker_client, alice
):
    Template.objects.create(
        slug="desktop", name="Ghost", image=f"streamspace/no-such-image:{uuid.uuid4().hex[:8]}", vnc_port=5901
    )
    stack = docker_stack()
    session_id = create(control_plane, alice, cpu=0.5, memory_mb=256)
    failed = wait_state(control_plane, alice, session_id, State.FAILED, stack=stack)
    message = failed["error_message"]
    assert "no-such-image" in message and "not present on this Docker host" in message, message
    assert message.startswith("create session failed: ")
    assert_nothing_left(docker_client, session_id)
    assert labelled(docker_client, stack.agent_id) == []
    command = AgentCommand.objects.get(session_id=session_id)
    assert command.status == "failed" and command.attempts == 1  # not retryable: not delivered again
