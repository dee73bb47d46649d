"""LeaseLeadership against kmock's Kubernetes emulator over real HTTP.

Leader election is only as safe as the API server's compare-and-swap, and kmock 0.8
does not enforce resourceVersion preconditions (and answers 404 to PUT). These tests
therefore run on ``CASEmulator`` (tests/k8s/emulator.py), a clearly labelled test
extension that stamps a fresh resourceVersion on every write and refuses a PUT/PATCH
carrying a stale one with 409 Conflict, atomically under one lock.
``test_the_emulator_enforces_compare_and_swap`` shows that extension at work, and
``test_racing_takeovers_have_exactly_one_winner`` shows the election relying on it.

Outages are made with a TCP proxy per replica (``Partition``) that can black-hole its
traffic: requests hang unanswered, the worst case for a leader that must step down on
time. Timings are short (lease 2 s, renew deadline 1.5 s, retry 0.2 s), all on one
machine's clock: clock skew between replicas is not tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time

import kubernetes
import pytest

from agent_clients.leadership.lease import LeaseLeadership
from tests.k8s.emulator import Partition, api_client

pytestmark = pytest.mark.asyncio
NS = "streamspace"
LEASE = "streamspace-agent-k8s-agent-1"
DURATION, DEADLINE, RETRY = 2.0, 1.5, 0.2


def candidate(emu, identity, *, host=None):
    return LeaseLeadership(
        api_client(emu, host=host),
        namespace=NS,
        name=LEASE,
        identity=identity,
        lease_duration=DURATION,
        renew_deadline=DEADLINE,
        retry_period=RETRY,
        request_timeout=0.5,
    )


@pytest.fixture(autouse=True)
def bounded_request_log(emulator):
    """Election tests make thousands of requests and assert nothing about the log."""
    emulator.history_limit = 200


def holder(emu):
    return emu.objects["coordination.k8s.io/v1/leases", NS, LEASE]["spec"]["holderIdentity"]


async def first_done(*tasks, timeout):
    done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    return done


async def stop(*things):
    for thing in things:
        if isinstance(thing, asyncio.Task):
            thing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await thing
        else:
            await thing.release()


async def test_the_emulator_enforces_compare_and_swap(emulator):
    """The premise of every other test here: a write with a stale resourceVersion fails."""
    coord = kubernetes.client.CoordinationV1Api(api_client(emulator, user_agent="test-harness"))

    def scenario():
        created = coord.create_namespaced_lease(NS, {"metadata": {"name": "x"}, "spec": {"holderIdentity": "a"}})
        rv = created.metadata.resource_version
        coord.replace_namespaced_lease(
            "x", NS, {"metadata": {"name": "x", "resourceVersion": rv}, "spec": {"holderIdentity": "b"}}
        )
        with pytest.raises(kubernetes.client.ApiException) as err:
            coord.replace_namespaced_lease(
                "x", NS, {"metadata": {"name": "x", "resourceVersion": rv}, "spec": {"holderIdentity": "c"}}
            )
        return err.value.status, coord.read_namespaced_lease("x", NS).spec.holder_identity

    assert await asyncio.to_thread(scenario) == (409, "b")


async def test_only_one_leads(emulator):
    a, b = candidate(emulator, "replica-a"), candidate(emulator, "replica-b")
    ta, tb = asyncio.create_task(a.acquire()), asyncio.create_task(b.acquire())
    done = await first_done(ta, tb, timeout=3)
    assert len(done) == 1
    await asyncio.sleep(DURATION + 0.5)  # the winner keeps renewing; the other keeps waiting
    assert [a.is_leader, b.is_leader].count(True) == 1
    assert len([t for t in (ta, tb) if t.done()]) == 1
    leader = a if a.is_leader else b
    assert holder(emulator) == leader.identity
    await stop(ta, tb, a, b)


async def test_release_hands_over_at_once(emulator):
    a, b = candidate(emulator, "replica-a"), candidate(emulator, "replica-b")
    await a.acquire()
    tb = asyncio.create_task(b.acquire())
    await asyncio.sleep(0.5)
    assert not tb.done()
    released = time.monotonic()
    await a.release()
    assert not a.is_leader
    await asyncio.wait_for(lost_returns(a), 0.1)
    await asyncio.wait_for(tb, DURATION)
    assert time.monotonic() - released < 1.0, "a standby takes over a released lease without waiting for expiry"
    assert b.is_leader and holder(emulator) == "replica-b"
    await stop(b)


async def lost_returns(leadership):
    await leadership.lost()


async def test_a_cut_off_leader_steps_down_before_the_other_takes_over(emulator):
    async with Partition(emulator.url.port) as net_a:
        a = candidate(emulator, "replica-a", host=net_a.url)
        b = candidate(emulator, "replica-b")
        await a.acquire()
        tb = asyncio.create_task(b.acquire())
        await asyncio.sleep(0.6)  # a few renewals go through
        assert a.is_leader and not tb.done()

        net_a.cut = True  # a's renewals now hang unanswered
        cut = time.monotonic()
        await asyncio.wait_for(a.lost(), DEADLINE + 1)
        a_down = time.monotonic()
        await asyncio.wait_for(tb, DURATION + 1)
        b_up = time.monotonic()

        assert not a.is_leader and b.is_leader
        # a stepped down within its renew deadline (counted from its last renewal, sent before the cut) ...
        assert a_down - cut <= DEADLINE + 0.1
        # ... strictly before b could take over, and b took over within the lease duration
        # (+ one retry period of polling) of a's last renewal.
        assert a_down < b_up
        assert b_up - cut <= DURATION + 2 * RETRY + 0.3
        assert holder(emulator) == "replica-b"

        # Healed, a does not grab it back: b renews.
        net_a.cut = False
        ta = asyncio.create_task(a.acquire())
        await asyncio.sleep(DURATION + 0.5)
        assert not ta.done() and b.is_leader and not a.is_leader
        await stop(ta, a, b)


async def test_a_leader_that_gets_errors_steps_down_in_time(emulator):
    """Renewals that fail fast (HTTP 500 from the API server) instead of hanging."""
    a = candidate(emulator, "replica-a")
    await a.acquire()
    emulator.fail("GET", "leases", 500, times=1000)
    started = time.monotonic()
    await asyncio.wait_for(a.lost(), DEADLINE + 1)
    # What matters: it stops acting before its lease could pass to another replica.
    # (The former bound, the renew deadline + 0.1 s, failed once at 1.84 s on a loaded loop.)
    assert time.monotonic() - started < DURATION
    assert not a.is_leader
    await stop(a)


async def test_racing_takeovers_have_exactly_one_winner(emulator):
    """Two candidates read the same expired Lease at the same moment and both try to take
    it over with the resourceVersion they read: the CAS lets exactly one through."""
    old = candidate(emulator, "replica-old")
    await old.acquire()
    await stop(old._renewer)  # it dies without releasing; its lease expires
    old._leader = False
    await asyncio.sleep(DURATION + 0.2)

    a, b = candidate(emulator, "replica-a"), candidate(emulator, "replica-b")
    barrier = threading.Barrier(2, timeout=5)
    for c in (a, b):
        real_read = c.coord.read_namespaced_lease

        def read_then_wait(*args, _real=real_read, **kwargs):
            lease = _real(*args, **kwargs)
            barrier.wait()  # both have read the same resourceVersion before either writes
            return lease

        c.coord.read_namespaced_lease = read_then_wait
    results = await asyncio.gather(
        asyncio.to_thread(a._try_acquire_or_renew), asyncio.to_thread(b._try_acquire_or_renew)
    )
    assert sorted(results) == [False, True]
    assert emulator.conflicts >= 1
    assert holder(emulator) == ("replica-a" if results[0] else "replica-b")


async def test_no_command_runs_under_two_leaders(emulator):
    """Two replicas run the agent loop (acquire, act while leader, start over when lost)
    while the network cuts each of them off in turn. Every act is recorded with its
    start and end; no two acts of different replicas may overlap in time, and every
    command from the shared queue is executed exactly once."""
    commands = list(range(10_000))
    executed: list[int] = []
    acts: list[tuple[str, float, float]] = []
    active = {"n": 0, "max": 0}

    async def replica(ldr: LeaseLeadership):
        while True:
            await ldr.acquire()
            while ldr.is_leader and commands:
                start = time.monotonic()
                active["n"] += 1
                active["max"] = max(active["max"], active["n"])
                executed.append(commands.pop(0))
                await asyncio.sleep(0.02)  # the command's work
                active["n"] -= 1
                acts.append((ldr.identity, start, time.monotonic()))

    async with Partition(emulator.url.port) as net_a, Partition(emulator.url.port) as net_b:
        a = candidate(emulator, "replica-a", host=net_a.url)
        b = candidate(emulator, "replica-b", host=net_b.url)
        tasks = [asyncio.create_task(replica(a)), asyncio.create_task(replica(b))]
        for _ in range(2):
            await asyncio.sleep(0.8)
            leader_net = net_a if a.is_leader else net_b
            leader_net.cut = True  # cut off whoever leads; the other must take over
            await asyncio.sleep(DURATION + 1.0)
            leader_net.cut = False
        await asyncio.sleep(0.5)
        await stop(*tasks, a, b)

    assert {who for who, _, _ in acts} == {"replica-a", "replica-b"}, "leadership changed hands"
    assert active["max"] == 1
    ordered = sorted(acts, key=lambda act: act[1])
    for (who1, _s1, end1), (who2, start2, _e2) in itertools.pairwise(ordered):
        if who1 != who2:
            assert end1 <= start2, f"{who1} still acting when {who2} started"
    assert len(executed) == len(set(executed))
