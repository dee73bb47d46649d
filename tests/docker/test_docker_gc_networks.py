"""The Docker backend's garbage collector, session subnets from the agent's pool, and
NotFound races in create, against the real engine.

Races are reproduced on the real engine: a hook on the backend's own client removes a real
object (through another client) at the exact moment the race needs, and the engine's real
404 follows. Nothing is mocked."""

from __future__ import annotations

import ipaddress
import time
import uuid

import docker
import pytest

from agent_clients.backends.base import BackendError
from agent_clients.backends.docker import (
    LABEL_AGENT,
    LABEL_KEEP_HOME,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_SESSION,
    DockerBackend,
    container_name,
    network_name,
    volume_name,
)
from tests.docker.conftest import IMAGE
from tests.live import wait_for

pytestmark = pytest.mark.docker


def _labels(agent: str, sid: str) -> dict[str, str]:
    return {LABEL_MANAGED: "true", LABEL_SESSION: sid, LABEL_OWNER: "alice", LABEL_AGENT: agent}


def _exists(client, kind: str, name: str) -> bool:
    try:
        getattr(client, kind).get(name)
        return True
    except docker.errors.NotFound:
        return False


def _remove_all(client, agent_prefix: str) -> None:
    flt = {"label": f"{LABEL_MANAGED}=true"}

    def mine(labels) -> bool:
        return str((labels or {}).get(LABEL_AGENT, "")).startswith(agent_prefix)

    for c in client.containers.list(all=True, filters=flt, ignore_removed=True):
        if mine(c.labels):
            c.remove(force=True)
    for n in client.networks.list(filters=flt):
        if mine(n.attrs.get("Labels")):
            n.remove()
    for v in client.volumes.list(filters=flt):
        if mine(v.attrs.get("Labels")):
            v.remove(force=True)


def _leftovers(client, sid: str) -> list[str]:
    return [
        kind
        for kind, name in (
            ("containers", container_name(sid)),
            ("networks", network_name(sid)),
            ("volumes", volume_name(sid)),
        )
        if _exists(client, kind, name)
    ]


# --- the garbage collector ---------------------------------------------------------------


def test_gc_removes_only_what_the_control_plane_finished(docker_client, agent_id):
    """What an engine cut mid-create leaves (a network and a volume, no container) and a
    finished session's container, once older than the grace period, go when the control
    plane says remove. Kept: live sessions' objects, young objects (a create in flight),
    another agent's objects (even under an id said to be removed), the home of a session that
    asked to keep it, the home of a session said remove_keep_home (failed after it had run),
    and everything of a session the control plane did not answer for (unknown to it)."""
    me = f"{agent_id}-gc"
    other = f"{agent_id}-gc-other"
    backend = DockerBackend(docker_client, agent_id=me)
    tag = uuid.uuid4().hex[:6]
    names = ("orph", "orphc", "live", "keep", "frgn", "yng", "died", "unkn")
    orphan, orphan_c, live, kept_home, foreign, young, died, unknown = (f"{tag}-{n}" for n in names)

    def make(agent: str, sid: str, *, keep_home: bool = False, container: bool = False) -> None:
        labels = _labels(agent, sid)
        DockerBackend(docker_client, agent_id=agent)._make_network(network_name(sid), labels)
        docker_client.volumes.create(volume_name(sid), labels={**labels, LABEL_KEEP_HOME: str(keep_home).lower()})
        if container:
            docker_client.containers.create(IMAGE, name=container_name(sid), labels=labels, network=network_name(sid))

    try:
        make(me, orphan)
        make(me, orphan_c, container=True)
        make(me, live, container=True)
        make(me, kept_home, keep_home=True)
        make(me, died, container=True)
        make(me, unknown, container=True)
        make(other, foreign)
        old_made = time.time()
        # The young objects are made well after the old ones: a grace halfway between the two
        # ages separates them as long as the collector reads the ages within (10 - 1) / 2 s of
        # ``now`` (volumes carry whole seconds only). With 4 s it failed once on a loaded machine.
        wait_for(lambda: time.time() - old_made > 10, 15, 0.1, what="the first objects to age")
        young_started = time.time()
        make(me, young)
        now = time.time()
        grace = ((now - old_made) + (now - young_started)) / 2

        assert backend.session_ids_found() == {orphan, orphan_c, live, kept_home, died, unknown, young}
        remove = {orphan, orphan_c, kept_home, foreign, young}
        removed = backend.collect_garbage(remove, {died}, grace)

        assert sorted(removed) == sorted(
            [
                f"network {network_name(orphan)}",
                f"volume {volume_name(orphan)}",
                f"container {container_name(orphan_c)}",
                f"network {network_name(orphan_c)}",
                f"volume {volume_name(orphan_c)}",
                f"network {network_name(kept_home)}",
                f"container {container_name(died)}",
                f"network {network_name(died)}",
            ]
        )
        assert _leftovers(docker_client, orphan) == []
        assert _leftovers(docker_client, orphan_c) == []
        assert _leftovers(docker_client, live) == ["containers", "networks", "volumes"]
        assert _leftovers(docker_client, kept_home) == ["volumes"]
        assert _leftovers(docker_client, died) == ["volumes"]
        assert _leftovers(docker_client, unknown) == ["containers", "networks", "volumes"]
        assert _leftovers(docker_client, foreign) == ["networks", "volumes"]
        assert _leftovers(docker_client, young) == ["networks", "volumes"]
        assert backend.collect_garbage(remove, {died}, grace) == []  # nothing more to do
    finally:
        _remove_all(docker_client, me)
        _remove_all(docker_client, other)


def test_created_home_volume_says_whether_to_keep_it(backend, docker_client, new_session):
    """The GC tells a kept home by its label, set at creation from the session's keep_home."""
    kept, plain = new_session(keep_home=True), new_session()
    backend.create(kept)
    backend.create(plain)
    assert docker_client.volumes.get(volume_name(kept.session_id)).attrs["Labels"][LABEL_KEEP_HOME] == "true"
    assert docker_client.volumes.get(volume_name(plain.session_id)).attrs["Labels"][LABEL_KEEP_HOME] == "false"


# --- session networks from the pool -----------------------------------------------------


def test_forty_session_networks_fit_beyond_the_engine_default_pools(docker_client, agent_id):
    """A default dockerd has about 30 bridge networks' worth of address pools; the agent's
    own pool carries far more, one small subnet per session, none overlapping."""
    me = f"{agent_id}-net"
    backend = DockerBackend(docker_client, agent_id=me)
    try:
        subnets = []
        for i in range(40):
            sid = f"{me}-{i}"
            net = backend._make_network(network_name(sid), _labels(me, sid))
            net.reload()
            subnets.append(ipaddress.ip_network(net.attrs["IPAM"]["Config"][0]["Subnet"]))
        assert all(s.prefixlen == 28 and s.subnet_of(ipaddress.ip_network("10.213.0.0/16")) for s in subnets)
        assert len(set(subnets)) == 40
        assert not any(a.overlaps(b) for i, a in enumerate(subnets) for b in subnets[i + 1 :])
    finally:
        _remove_all(docker_client, me)


def test_an_exhausted_pool_is_said_in_words_and_leaves_nothing(docker_client, agent_id, new_session):
    """A /27 pool holds two /28 session networks; the third create fails for good with a
    sentence naming the pool and what to do, and leaves no object behind."""
    me = f"{agent_id}-tiny"
    pool = f"10.214.{int(uuid.uuid4().hex[:2], 16)}.0/27"
    backend = DockerBackend(docker_client, agent_id=me, network_pool=pool, network_prefix=28)
    try:
        for i in range(2):
            sid = f"{me}-{i}"
            backend._make_network(network_name(sid), _labels(me, sid))
        spec = new_session(b=backend)
        with pytest.raises(BackendError) as err:
            backend.create(spec)
        assert err.value.retryable is False
        assert pool in err.value.message and "DOCKER_NETWORK_POOL" in err.value.message
        assert "Terminate sessions" in err.value.message
        assert _leftovers(docker_client, spec.session_id) == []
    finally:
        _remove_all(docker_client, me)


# --- NotFound races in create -------------------------------------------------------------


def test_a_container_removed_while_create_counts_sessions_is_no_error(docker_client, agent_id, new_session):
    """Found by a check that removed one session while another was being created: the
    listing inspected the removed container and the engine's 404 became "internal agent
    error". Here the other session's container is removed (for real) just before the
    backend would inspect it."""
    me = f"{agent_id}-race"
    client = docker.from_env()
    backend = DockerBackend(client, agent_id=me, rfb_timeout=30)
    doomed_sid = f"{me}-doomed"
    doomed = docker_client.containers.create(IMAGE, name=container_name(doomed_sid), labels=_labels(me, doomed_sid))
    real_inspect = client.api.inspect_container

    def inspect_after_removal(container, *args, **kwargs):
        if container == doomed.id:
            docker_client.api.remove_container(doomed.id, force=True)
        return real_inspect(container, *args, **kwargs)

    client.api.inspect_container = inspect_after_removal
    try:
        spec = new_session(b=backend)
        assert backend.create(spec).state == "running"
        assert backend.list_sessions()[0].session_id == spec.session_id
    finally:
        client.api.inspect_container = real_inspect
        _remove_all(docker_client, me)
        client.close()


def test_a_network_removed_under_a_create_is_retried(docker_client, agent_id, new_session):
    """The session's network vanishes between its creation and the container's (a real
    removal): the create starts over within the call and the session runs."""
    me = f"{agent_id}-race2"
    client = docker.from_env()
    backend = DockerBackend(client, agent_id=me, rfb_timeout=30)
    real_create = client.api.create_container
    calls = []

    def create_after_network_removal(*args, **kwargs):
        calls.append(kwargs.get("name"))
        if len(calls) == 1:
            docker_client.networks.get(network_name(spec.session_id)).remove()
        return real_create(*args, **kwargs)

    client.api.create_container = create_after_network_removal
    try:
        spec = new_session(b=backend)
        status = backend.create(spec)
        assert status.state == "running"
        assert len(calls) == 2
        assert sorted(_leftovers(docker_client, spec.session_id)) == ["containers", "networks", "volumes"]
    finally:
        client.api.create_container = real_create
        _remove_all(docker_client, me)
        client.close()
