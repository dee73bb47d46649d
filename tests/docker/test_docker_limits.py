"""CPU and memory limits on the real engine cannot be rounded away (issue 10).

Found: ``cpu=1e-10`` reached the engine as ``NanoCpus=int(1e-10 * 1e9) == 0``, which Docker
reads as "no limit"; and ``int()`` truncated 1.001 cores to 1000999999 nano-CPUs. The agent
now refuses anything below its own minimum (SESSION_MIN_CPU / SESSION_MIN_MEMORY_MB on the
agent, default 0.1 cores and 64 MB) before any engine call, and the container's limits are
the ones asked for."""

from __future__ import annotations

import docker
import pytest

from agent_clients.backends.base import BackendError, SessionSpec
from agent_clients.backends.docker import DockerBackend, container_name

pytestmark = pytest.mark.docker


def _container(client, sid):
    try:
        return client.containers.get(container_name(sid))
    except docker.errors.NotFound:
        return None


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        ({"cpu": 1e-10}, "CPU limit"),
        ({"cpu": 0.0000000004}, "CPU limit"),
        ({"cpu": 0.05}, "CPU limit"),
        ({"cpu": float("nan")}, "CPU limit"),
        ({"cpu": float("inf")}, "CPU limit"),
        ({"cpu": -1.0}, "CPU limit"),
        ({"memory_mb": 0}, "memory limit"),
        ({"memory_mb": 32}, "memory limit"),
    ],
)
def test_limits_below_the_minimum_are_refused_before_anything_is_made(
    backend, docker_client, new_session, limits, words
):
    spec = new_session(**limits)
    with pytest.raises(BackendError) as err:
        backend.create(spec)
    assert err.value.retryable is False
    assert words in err.value.message
    assert _container(docker_client, spec.session_id) is None


def test_a_sound_template_whose_vnc_port_is_the_sound_port_is_refused(backend, docker_client, new_session):
    """One published port cannot serve both (Template.clean refuses it too)."""
    spec = new_session(sound=True, vnc_port=5711)
    with pytest.raises(BackendError) as err:
        backend.create(spec)
    assert err.value.retryable is False and "sound port" in err.value.message
    assert _container(docker_client, spec.session_id) is None


def test_a_nan_cpu_in_the_payload_is_refused(backend, docker_client, new_session):
    sid = new_session().session_id
    spec = SessionSpec.from_payload(sid, {"template": {"image": "x:1"}, "cpu": "NaN", "vnc_password": "pw"})
    with pytest.raises(BackendError, match="CPU limit"):
        backend.create(spec)
    assert _container(docker_client, sid) is None


def test_the_container_gets_exactly_the_limits_asked_for(backend, docker_client, new_session):
    for cpu, memory_mb in ((0.1, 64), (1.001, 100)):
        spec = new_session(cpu=cpu, memory_mb=memory_mb)
        assert backend.create(spec).state == "running"
        host = _container(docker_client, spec.session_id).attrs["HostConfig"]
        assert host["NanoCpus"] == round(cpu * 1e9) != 0
        assert host["Memory"] == memory_mb * 1024 * 1024 != 0
        assert host["MemorySwap"] == host["Memory"]
        backend.terminate(spec.session_id)


def test_the_agents_minimum_is_its_own_setting(docker_client, agent_id, new_session):
    strict = DockerBackend(docker_client, agent_id=agent_id, min_cpu=0.5, min_memory_mb=256)
    spec = new_session(b=strict, cpu=0.25, memory_mb=512)
    with pytest.raises(BackendError, match=r"CPU limit 0\.25 is outside 0\.5"):
        strict.create(spec)
    spec = new_session(b=strict, cpu=0.5, memory_mb=128)
    with pytest.raises(BackendError, match="memory limit 128 MB is outside 256"):
        strict.create(spec)
    assert _container(docker_client, spec.session_id) is None


def test_a_container_made_without_limits_is_not_woken(backend, docker_client, new_session, monkeypatch):
    """Found by review: a session made before the minimum existed (``cpu=1e-10`` gave
    NanoCpus 0: no limit) was woken as it was. Such a container is refused with a reason and
    stays stopped. The old code's container is made by patching ``nano_cpus`` to return 0
    (what ``int(1e-10 * 1e9)`` gave), the one stand-in here."""
    from agent_clients.backends import docker as docker_backend

    spec = new_session(cpu=0.5, memory_mb=256)
    monkeypatch.setattr(docker_backend, "nano_cpus", lambda cores: 0)
    backend.create(spec)
    monkeypatch.undo()
    assert _container(docker_client, spec.session_id).attrs["HostConfig"]["NanoCpus"] == 0
    backend.hibernate(spec.session_id)
    with pytest.raises(BackendError) as refused:
        backend.wake(spec.session_id)
    assert not refused.value.retryable and "without the CPU or memory limit" in refused.value.message
    assert _container(docker_client, spec.session_id).status == "exited"
