"""The Docker agent's garbage collector, end to end: a real Daphne control plane, the real
Docker agent process (GC every 1 s, 2 s grace) and the real engine.

Found by a review: the collector removed every object labelled with this agent's id whose
session was not live on the control plane. (a) Several installs on one host shared the
agent id ``local-docker``: one install's collector deleted the other's running desktops
and homes within a minute. (b) A desktop that died became ``failed`` and its home volume
was deleted 60 s later. Now the collector acts only on sessions the control plane knows
and has finished, and a failed session that had run keeps its home until the user's
Terminate."""

from __future__ import annotations

import uuid

import pytest

from agent_clients.backends.docker import (
    LABEL_AGENT,
    LABEL_KEEP_HOME,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_SESSION,
    container_name,
    volume_name,
)
from agents_app.models import Agent
from sessions_app.models import Session
from sessions_app.states import State
from tests.docker.conftest import IMAGE
from tests.e2e import conftest as e2e_fixtures
from tests.e2e.test_docker_e2e import api, assert_nothing_left, create, engine_objects, full_log, wait_state
from tests.live import wait_for

docker_client = e2e_fixtures.docker_client
docker_stack = e2e_fixtures.docker_stack

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.docker]


def test_gc_leaves_unknown_sessions_alone_and_keeps_the_home_of_a_desktop_that_died(
    control_plane, docker_stack, docker_client, desktop_template, alice
):
    stack = docker_stack(GC_INTERVAL="1", GC_GRACE="2")
    # Another install's desktop on the same engine, under the same agent id: a session id
    # this control plane has never heard of.
    stranger = str(uuid.uuid4())
    labels = {LABEL_MANAGED: "true", LABEL_SESSION: stranger, LABEL_OWNER: "bob", LABEL_AGENT: stack.agent_id}
    docker_client.volumes.create(volume_name(stranger), labels={**labels, LABEL_KEEP_HOME: "false"})
    docker_client.containers.create(IMAGE, name=container_name(stranger), labels=labels)
    try:
        session_id = create(control_plane, alice, cpu=0.25, memory_mb=128)
        wait_state(control_plane, alice, session_id, State.RUNNING, timeout=60, stack=stack)
        docker_client.containers.get(container_name(session_id)).kill()  # the desktop dies
        wait_state(control_plane, alice, session_id, State.FAILED, timeout=30, stack=stack)

        # A marker the collector must remove: a session terminated on the control plane whose
        # home is made now. The round that removes it is later than the desktop's death and
        # than the grace on the desktop's objects: that round (or an earlier one) is where a
        # collector that deletes failed homes or unknown sessions would have done so.
        marker = Session.objects.create(
            owner=alice,
            template=desktop_template,
            agent=Agent.objects.get(agent_id=stack.agent_id),
            state=State.TERMINATED,
            cpu=0.25,
            memory_mb=128,
        )
        marker_labels = {**labels, LABEL_SESSION: str(marker.pk), LABEL_OWNER: "alice"}
        docker_client.volumes.create(volume_name(str(marker.pk)), labels={**marker_labels, LABEL_KEEP_HOME: "false"})
        wait_for(
            lambda: engine_objects(docker_client, str(marker.pk))["volume"] is None,
            30,
            0.2,
            what=f"the garbage collector to remove a terminated session's home\n{stack.output()}",
        )
        died = engine_objects(docker_client, session_id)
        assert died["container"] is None and died["network"] is None, "the dead desktop's container or network stayed"
        assert died["volume"] is not None, "the garbage collector deleted the home of a desktop that died"
        stranger_left = engine_objects(docker_client, stranger)
        assert stranger_left["container"] is not None and stranger_left["volume"] is not None, (
            "the garbage collector deleted another install's desktop"
        )
        log = full_log(stack.agent)
        assert log.count(f"session {stranger} is not known to the control plane: left alone") == 1, log
        assert f"removed volume ss-{session_id}-home" not in log

        # The user's Terminate removes the home through the terminate path (keep_home false).
        api(control_plane, alice, "DELETE", f"/sessions/{session_id}", expect=202)
        wait_state(control_plane, alice, session_id, State.TERMINATED, stack=stack)
        assert_nothing_left(docker_client, session_id)
        assert all(engine_objects(docker_client, stranger)[k] is not None for k in ("container", "volume"))
    finally:
        left = engine_objects(docker_client, stranger)
        for kind in ("container", "volume"):
            if left[kind] is not None:
                left[kind].remove(force=True)
