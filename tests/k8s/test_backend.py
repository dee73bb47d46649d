"""KubernetesBackend against kmock's Kubernetes emulator over real HTTP, with the
official ``kubernetes`` client.

The emulator has no controllers and no kubelet: nothing would ever make a pod or
report readiness. The ``kubelet`` fixture (tests/k8s/emulator.py:FakeKubelet) plays both,
writing pods and Deployment status straight into the emulator's memory. So these tests
prove what the backend asks of the API and how it reads the answers; they do not
prove that a real kubelet reports readiness the way the fake does.

The emulator also ignores ``labelSelector`` on lists (it returns every object of the
namespace); the backend re-checks labels on its side, and the tests rely on that.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import threading

import kmock
import kubernetes
import pytest

from agent_clients.backends import k8s_manifests as m
from agent_clients.backends.base import BackendError, SessionSpec, SessionStatus
from agent_clients.backends.kubernetes import KubernetesBackend
from tests.k8s.emulator import api_client, calls

pytestmark = pytest.mark.asyncio
NS = "streamspace"
AGENT = "k8s-agent-1"


def make_backend(emu, **kw):
    options = dict(
        namespace=NS,
        agent_id=AGENT,
        ready_timeout=3.0,
        poll_interval=0.05,
        retry_attempts=4,
        retry_base=0.01,
        request_timeout=5.0,
    )
    options.update(kw)
    return KubernetesBackend(api_client(emu), **options)


def spec(session_id="5b0c7e62-1f3a-4c2d-9e8f-7a6b5c4d3e2f", **kw):
    base = dict(
        session_id=session_id,
        owner="alice",
        image="streamspace/desktop:bookworm-3",
        cpu=1.0,
        memory_mb=1024,
        env={"RESOLUTION": "1280x800"},
        vnc_password="pw-12345",
        template="desktop",
    )
    base.update(kw)
    return SessionSpec(**base)


async def eventually(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` (bounded) instead of sleeping a fixed time."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def live(emu, plural, name):
    try:
        return not emu.objects[plural, NS, name].deleted
    except KeyError:
        return False


def names(s):
    return {
        "apps/v1/deployments": m.deployment_name(s.session_id),
        "v1/services": m.service_name(s.session_id),
        "v1/secrets": m.secret_name(s.session_id),
        "v1/persistentvolumeclaims": m.pvc_name(s.session_id),
        "networking.k8s.io/v1/networkpolicies": m.network_policy_name(s.session_id),
    }


def history_len(emu, plural, name):
    return len(emu.objects[plural, NS, name].history)


async def test_create_makes_deployment_service_pvc_secret(emulator, kubelet):
    backend = make_backend(emulator)
    s = spec()
    status = await asyncio.to_thread(backend.create, s)
    assert status.state == "running"
    assert status.vnc_host == f"{m.service_name(s.session_id)}.{NS}.svc" and status.vnc_port == 5901
    for plural, name in names(s).items():
        assert live(emulator, plural, name), plural

    dep = emulator.objects["apps/v1/deployments", NS, m.deployment_name(s.session_id)]
    assert dep >= {"spec": m.make_deployment(s, AGENT, NS)["spec"]}
    assert dep["metadata"]["labels"]["streamspace.io/agent"] == AGENT
    svc = emulator.objects["v1/services", NS, m.service_name(s.session_id)]
    assert svc >= {
        "spec": {"type": "ClusterIP", "ports": [{"name": "vnc", "port": 5901, "targetPort": "vnc", "protocol": "TCP"}]}
    }
    secret = emulator.objects["v1/secrets", NS, m.secret_name(s.session_id)]
    assert base64.b64decode(secret["data"]["VNC_PASSWORD"]) == b"pw-12345"
    pvc = emulator.objects["v1/persistentvolumeclaims", NS, m.pvc_name(s.session_id)]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    policy = emulator.objects["networking.k8s.io/v1/networkpolicies", NS, m.network_policy_name(s.session_id)]
    assert policy >= {"spec": m.make_network_policy(s, AGENT, NS)["spec"]}
    assert (await asyncio.to_thread(backend.status, s.session_id)).state == "running"


async def test_hibernate_and_wake_change_replicas(emulator, kubelet):
    backend = make_backend(emulator)
    s = spec()
    await asyncio.to_thread(backend.create, s)
    dep_name = m.deployment_name(s.session_id)

    status = await asyncio.to_thread(backend.hibernate, s.session_id)
    assert status.state == "hibernated"
    assert emulator.objects["apps/v1/deployments", NS, dep_name]["spec"]["replicas"] == 0
    await asyncio.sleep(0.1)  # the fake controller removes the pod
    assert (await asyncio.to_thread(backend.status, s.session_id)).state == "hibernated"
    assert live(emulator, "v1/persistentvolumeclaims", m.pvc_name(s.session_id)), "home kept across hibernation"
    # Hibernating twice is fine.
    assert (await asyncio.to_thread(backend.hibernate, s.session_id)).state == "hibernated"

    status = await asyncio.to_thread(backend.wake, s.session_id)
    assert status.state == "running"
    assert emulator.objects["apps/v1/deployments", NS, dep_name]["spec"]["replicas"] == 1


async def test_status_reports_starting_until_ready(emulator, kubelet):
    backend = make_backend(emulator, ready_timeout=0.3)
    s = spec()
    kubelet.hold = True
    with pytest.raises(BackendError) as err:
        await asyncio.to_thread(backend.create, s)
    assert err.value.retryable is True and "not ready after" in err.value.message
    # A create that could not finish leaves nothing behind.
    for plural, name in names(s).items():
        assert not live(emulator, plural, name), plural


async def test_terminate_removes_everything_and_keeps_home_when_asked(emulator, kubelet):
    backend = make_backend(emulator)
    a, b = spec("sess-a"), spec("sess-b")
    await asyncio.to_thread(backend.create, a)
    await asyncio.to_thread(backend.create, b)

    await asyncio.to_thread(backend.terminate, a.session_id)
    for plural, name in names(a).items():
        assert not live(emulator, plural, name), plural
    assert (await asyncio.to_thread(backend.status, a.session_id)).state == "missing"
    # Gone counts as done.
    await asyncio.to_thread(backend.terminate, a.session_id)

    await asyncio.to_thread(backend.terminate, b.session_id, keep_home=True)
    assert live(emulator, "v1/persistentvolumeclaims", m.pvc_name(b.session_id))
    for plural in ("apps/v1/deployments", "v1/services", "v1/secrets", "networking.k8s.io/v1/networkpolicies"):
        assert not live(emulator, plural, names(b)[plural])


async def test_a_restarted_backend_lists_the_sessions_it_holds(emulator, kubelet):
    first = make_backend(emulator)
    nasty = spec("Ünïcode.Session@Example.COM/" + "x" * 100, owner="Ünïcode.User@Example.COM")
    plain = spec("sess-plain")
    await asyncio.to_thread(first.create, nasty)
    await asyncio.to_thread(first.create, plain)
    await asyncio.to_thread(first.hibernate, plain.session_id)
    # Another agent's session in the same namespace (the emulator ignores label selectors:
    # the backend must not claim it anyway).
    other = m.make_deployment(spec("theirs"), "someone-else", NS)
    emulator.objects["apps/v1/deployments", NS, other["metadata"]["name"]] = other
    first.close()

    restarted = make_backend(emulator)
    held = {st.session_id: st.state for st in await asyncio.to_thread(restarted.list_sessions)}
    assert held == {nasty.session_id: "running", plain.session_id: "hibernated"}


async def test_invalid_template_fails_before_any_api_call(emulator):
    backend = make_backend(emulator)
    for bad in (spec(image="Not A Valid Image!"), spec(cpu=500), spec(memory_mb=1)):
        with pytest.raises(BackendError) as err:
            await asyncio.to_thread(backend.create, bad)
        assert err.value.retryable is False
    assert calls(emulator) == set()
    assert not emulator.objects


async def test_unpullable_image_fails_readably_and_leaves_nothing(emulator, kubelet):
    backend = make_backend(emulator)
    s = spec(image="registry.example.com/does-not/exist:1")
    kubelet.broken_images.add(s.image)
    with pytest.raises(BackendError) as err:
        await asyncio.to_thread(backend.create, s)
    assert err.value.retryable is False
    assert "image cannot be pulled" in err.value.message and "ErrImagePull" in err.value.message
    for plural, name in names(s).items():
        assert not live(emulator, plural, name), plural


async def test_repeated_create_is_idempotent(emulator, kubelet):
    backend = make_backend(emulator)
    s = spec()
    first = await asyncio.to_thread(backend.create, s)
    versions = {plural: history_len(emulator, plural, name) for plural, name in names(s).items()}
    again = await asyncio.to_thread(make_backend(emulator).create, s)  # a redelivered command, maybe after a restart
    assert again == first
    # Nothing was recreated or deleted: each object still has its one and only version.
    assert {plural: history_len(emulator, plural, name) for plural, name in names(s).items()} == versions
    deployments = [k for k, o in emulator.objects.items() if k[0].plural == "deployments" and not o.deleted]
    assert len(deployments) == 1


async def test_wake_puts_back_a_missing_network_policy_before_the_pod_runs(emulator, kubelet):
    """Found by review: wake only scaled the Deployment, so a session made before policies
    existed, or whose policy was deleted, woke with unrestricted egress."""
    backend = make_backend(emulator)
    s = spec(egress="none", egress_allow=("10.1.2.3:443",))
    await asyncio.to_thread(backend.create, s)
    await asyncio.to_thread(backend.hibernate, s.session_id)
    name = m.network_policy_name(s.session_id)
    del emulator.objects["networking.k8s.io/v1/networkpolicies", NS, name]
    assert not live(emulator, "networking.k8s.io/v1/networkpolicies", name)

    assert (await asyncio.to_thread(backend.wake, s.session_id)).state == "running"
    policy = emulator.objects["networking.k8s.io/v1/networkpolicies", NS, name]
    assert policy["spec"] == m.make_network_policy(s, AGENT, NS)["spec"]  # rebuilt from the annotations


async def test_repeated_create_of_a_hibernated_session_starts_it(emulator, kubelet):
    backend = make_backend(emulator)
    s = spec()
    await asyncio.to_thread(backend.create, s)
    await asyncio.to_thread(backend.hibernate, s.session_id)
    assert (await asyncio.to_thread(backend.create, s)).state == "running"


async def test_name_collision_with_a_stranger_is_refused_and_cleaned_up(emulator, kubelet):
    backend = make_backend(emulator)
    s = spec()
    stranger = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": m.service_name(s.session_id), "namespace": NS},
    }
    emulator.objects["v1/services", NS, m.service_name(s.session_id)] = stranger
    with pytest.raises(BackendError) as err:
        await asyncio.to_thread(backend.create, s)
    assert err.value.retryable is False
    assert "already exists" in err.value.message and "does not belong" in err.value.message
    assert emulator.objects["v1/services", NS, m.service_name(s.session_id)] == stranger, (
        "the stranger's Service untouched"
    )
    # What this create made before the collision (Secret, PVC) is gone again.
    assert not live(emulator, "v1/secrets", m.secret_name(s.session_id))
    assert not live(emulator, "v1/persistentvolumeclaims", m.pvc_name(s.session_id))
    assert not live(emulator, "apps/v1/deployments", m.deployment_name(s.session_id))


def requests_to(emu, method, plural):
    return [r for r in list(emu) if r.method == method and r.resource is not None and r.resource.plural == plural]


async def test_5xx_and_429_are_retried(emulator, kubelet):
    """Uses kmock's own response injection (a sliced reaction) for reads: no side effects."""
    backend = make_backend(emulator)
    s = spec()
    await asyncio.to_thread(backend.create, s)
    before = len(requests_to(emulator, "GET", "deployments"))
    # kmock slices count every matching request since the start: inject on the next three.
    emulator["get", kmock.resource("apps", "v1", "deployments")][before : before + 3] << 503
    assert (await asyncio.to_thread(backend.status, s.session_id)).state == "running"
    assert len(requests_to(emulator, "GET", "deployments")) - before == 4  # three 503s, then the answer

    before = len(requests_to(emulator, "GET", "pods"))
    emulator["get", kmock.resource("", "v1", "pods")][before : before + 1] << 429
    assert (await asyncio.to_thread(backend.status, s.session_id)).state == "running"
    assert len(requests_to(emulator, "GET", "pods")) - before == 2


async def test_retries_are_bounded_and_stay_retryable(emulator, kubelet):
    backend = make_backend(emulator, retry_attempts=3)
    emulator["get", kmock.resource("apps", "v1", "deployments")] << 500
    with pytest.raises(BackendError) as err:
        await asyncio.to_thread(backend.status, "any")
    assert err.value.retryable is True and "HTTP 500" in err.value.message
    assert len(requests_to(emulator, "GET", "deployments")) == 3


async def test_other_4xx_are_not_retried_and_read_well(emulator, kubelet):
    """Write failures are injected with the labelled emulator extension ``fail()``, which
    refuses BEFORE storing, as a real API server does for 403/422."""
    backend = make_backend(emulator)
    s = spec()
    message = (
        'deployments.apps is forbidden: User "system:serviceaccount:streamspace:streamspace-agent" '
        'cannot create resource "deployments" in API group "apps" in the namespace "streamspace"'
    )
    emulator.fail("POST", "deployments", 403, message=message)
    with pytest.raises(BackendError) as err:
        await asyncio.to_thread(backend.create, s)
    assert err.value.retryable is False
    assert "forbidden" in err.value.message and "HTTP 403" in err.value.message
    assert len(requests_to(emulator, "POST", "deployments")) == 1, "a 403 is not retried"
    for plural, name in names(s).items():
        assert not live(emulator, plural, name), f"{plural} left behind after a failed create"

    emulator.fail("PATCH", "deployments", 422, message="spec.replicas: Invalid value")
    await asyncio.to_thread(backend.create, s)
    with pytest.raises(BackendError) as err:
        await asyncio.to_thread(backend.hibernate, s.session_id)
    assert err.value.retryable is False and "Invalid value" in err.value.message
    assert len(requests_to(emulator, "PATCH", "deployments")) == 1

    with pytest.raises(BackendError) as err:
        await asyncio.to_thread(backend.hibernate, "never-created")
    assert err.value.retryable is False and "not found" in err.value.message


async def test_conflict_on_update_is_retried(emulator, kubelet):
    backend = make_backend(emulator)
    s = spec()
    await asyncio.to_thread(backend.create, s)
    emulator.fail("PATCH", "deployments", 409, times=2, message="the object has been modified")
    assert (await asyncio.to_thread(backend.hibernate, s.session_id)).state == "hibernated"
    assert len(requests_to(emulator, "PATCH", "deployments")) == 3


async def test_unreachable_api_is_retryable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.retries = 0
    backend = KubernetesBackend(
        kubernetes.client.ApiClient(configuration), namespace=NS, agent_id=AGENT, retry_attempts=2, retry_base=0.01
    )
    with pytest.raises(BackendError) as err:
        await asyncio.to_thread(backend.list_sessions)
    assert err.value.retryable is True and "unreachable" in err.value.message


async def test_open_vnc_stream_port_forwards_to_the_ready_pod(emulator, kubelet, monkeypatch):
    """The port-forward itself cannot run against the emulator (no WebSocket
    ``pods/portforward`` there). ``kubernetes.stream.portforward`` is replaced with a fake
    that hands back one end of a socketpair, as the real one does; an echo server sits on
    the other end. This proves the pod and port choice and the asyncio wrapping only."""
    backend = make_backend(emulator)
    s = spec(vnc_port=5999)
    await asyncio.to_thread(backend.create, s)
    asked = {}

    class FakeForward:
        def __init__(self, method, name, namespace, ports):
            asked.update(method=method.__name__, name=name, namespace=namespace, ports=ports)
            ours, theirs = socket.socketpair()
            self._socket = ours

            def echo():
                with theirs:
                    while data := theirs.recv(65536):
                        theirs.sendall(data)

            threading.Thread(target=echo, daemon=True).start()

        def socket(self, port):
            assert port == 5999
            return self._socket

    monkeypatch.setattr(kubernetes.stream, "portforward", FakeForward)
    reader, writer = await backend.open_vnc_stream(s.session_id)
    writer.write(b"RFB 003.008\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(12), 2) == b"RFB 003.008\n"
    writer.close()
    pods = [k[2] for k, o in emulator.objects.items() if k[0].plural == "pods" and not o.deleted]
    assert asked == {
        "method": "connect_get_namespaced_pod_portforward",
        "name": pods[0],
        "namespace": NS,
        "ports": "5999",
    }

    await asyncio.to_thread(backend.hibernate, s.session_id)
    with pytest.raises(BackendError, match="hibernated"):
        await backend.open_vnc_stream(s.session_id)


async def test_watch_emits_changes(emulator, kubelet):
    backend = make_backend(emulator, watch_interval=0.05)
    s = spec()
    await asyncio.to_thread(backend.create, s)
    events: list[SessionStatus] = []
    stop = threading.Event()
    polls_before = len(requests_to(emulator, "GET", "deployments"))
    thread = threading.Thread(target=backend.watch, args=(events.append, stop), daemon=True)
    thread.start()
    # The watch's first poll is its baseline: break the pod only after a second poll began.
    await eventually(lambda: len(requests_to(emulator, "GET", "deployments")) >= polls_before + 2, what="two polls")
    # A pod that starts failing by itself (the image vanished from the registry).
    kubelet.broken_images.add(s.image)
    del emulator.objects["v1/pods", NS, next(k[2] for k in emulator.objects if k[0].plural == "pods")]

    def states():
        return [e.state for e in events if e.session_id == s.session_id]

    await eventually(lambda: "failed" in states(), what="the watch to report the failing pod")
    await asyncio.to_thread(backend.terminate, s.session_id)
    await eventually(lambda: states()[-1] == "missing", what="the watch to report the session gone")
    stop.set()
    await asyncio.to_thread(thread.join, 2)
    assert "failed" in states() and states()[-1] == "missing"
