"""A replica that loses the leadership stops acting: with the real Redis lease.

The leader (``RedisLeadership`` on the local Redis, a key of its own) runs a slow create
held at a gate, with a hibernate of the same session queued behind it. Another replica
takes the key (written here as that replica would after the lease lapsed); the agent
must step down and then neither answer the create (not on that connection, not after it
leads again) nor start the hibernate: the control plane redelivers unfinished commands
to whoever leads next (its ``hello`` puts them back to pending). The backend is the
in-memory ``GatedBackend`` (tests/agent/harness.py), the control plane the stand-in
``FakeControlPlane``; Redis is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid

import pytest

from agent_clients.leadership.redis import RedisLeadership
from agent_clients.runtime.agent import Agent
from tests.agent.harness import FakeControlPlane, GatedBackend, create_payload, make_config

pytestmark = pytest.mark.asyncio

REDIS_URL = os.environ.get("TEST_REDIS_URL") or os.environ.get("HA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
LEASE, DEADLINE, RETRY = 3.0, 2.0, 0.5


async def test_a_command_in_flight_when_leadership_is_lost_is_not_answered_and_the_next_one_does_not_run():
    key = f"streamspace-test-loss-{uuid.uuid4().hex}"
    leadership = RedisLeadership(
        url=REDIS_URL,
        key=key,
        identity="replica-a",
        lease_duration=LEASE,
        renew_deadline=DEADLINE,
        retry_period=RETRY,
    )
    backend = GatedBackend()
    gate = backend.gate("create", "s-1")
    redis = leadership._redis()
    async with FakeControlPlane() as cp:
        agent = Agent(make_config(cp.url, drain_timeout=1.0), backend, leadership, install_signal_handlers=False)
        run = asyncio.create_task(agent.run())
        try:
            first = await cp.accept()
            await first.expect("hello")
            await first.command("c-create", "create_session", "s-1", create_payload())
            await first.command("c-hibernate", "hibernate_session", "s-1")  # waits for the create
            await first.expect("ack", command_id="c-create")
            await first.expect("ack", command_id="c-hibernate")
            await gate.wait_entered()

            await redis.set(key, "replica-b", px=60_000)  # another replica leads now
            lost_at = time.monotonic()
            await asyncio.wait_for(first.closed.wait(), DEADLINE + RETRY + 2)
            print(f"stepped down and disconnected {time.monotonic() - lost_at:.2f} s after the key was taken")
            assert not leadership.is_leader

            gate.open()  # the create's thread goes on (a running backend call cannot be stopped)
            deadline = time.monotonic() + 5
            while ("create", "s-1", "end") not in backend.events:
                assert time.monotonic() < deadline, "the create never finished"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # room for a wrongly queued hibernate to start
            assert backend.calls.get(("hibernate", "s-1"), 0) == 0, "the queued command ran after the loss"

            await redis.delete(key)  # the other replica is gone: this one leads again
            second = await cp.accept(LEASE + 5)
            await second.expect("hello")
            await second.expect_none("complete", 1.0, command_id="c-create")
            answers = [m for c in cp.all for m in c.log if m.type in ("complete", "failed")]
            assert answers == [], [m.payload for m in answers]
            assert backend.calls.get(("hibernate", "s-1"), 0) == 0
        finally:
            agent.request_shutdown()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(run, 15)
            run.cancel()
            with contextlib.suppress(Exception):
                await redis.delete(key)
            await leadership.aclose()
