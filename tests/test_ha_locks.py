"""Leader election for Docker agents: the file lock (flock) and the Redis lease, for real.

Redis runs at 127.0.0.1:6379; each test uses its own key. The "Redis goes away" test
starts a private redis-server on a free port and shuts it down.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent_clients.config import AgentConfig
from agent_clients.leadership.file import FileLeadership
from agent_clients.leadership.redis import RedisLeadership

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("HA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# The short lease of the requirement: a standby takes over within 5 s.
LEASE, DEADLINE, RETRY = 3.0, 2.0, 0.5


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def leads_within(leadership, seconds: float) -> bool:
    try:
        await asyncio.wait_for(leadership.acquire(), seconds)
        return True
    except TimeoutError:
        return False


def _cfg(**kwargs) -> AgentConfig:
    base = dict(agent_id="agent-ha", control_plane_url="ws://127.0.0.1:1", token="t")
    return AgentConfig(**{**base, **kwargs})


# --- file lock -----------------------------------------------------------------------

CHILD = """
import asyncio, sys, time
from agent_clients.leadership.file import FileLeadership
async def main():
    lead = FileLeadership(sys.argv[1], identity="child", retry_period=0.1)
    await lead.acquire()
    print("LEADER", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def _wait_line(proc: subprocess.Popen, expected: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if ready:
            line = proc.stdout.readline()
            if line.strip() == expected:
                return
            if not line:
                break
    raise AssertionError(f"child did not print {expected!r}: {proc.stderr.read() if proc.poll() is not None else ''}")


def test_file_lock_one_leader_and_takeover_on_release(tmp_path):
    path = str(tmp_path / "locks" / "leader.lock")

    async def scenario():
        a = FileLeadership.from_config(_cfg(ha_backend="file", ha_lock_path=path, ha_retry_period=0.1, identity="a"))
        b = FileLeadership.from_config(_cfg(ha_backend="file", ha_lock_path=path, ha_retry_period=0.1, identity="b"))
        await a.acquire()
        assert a.is_leader
        assert not await leads_within(b, 0.5)  # five attempts, all refused
        assert not b.is_leader
        assert Path(path).read_text().strip() == "a"
        lost = asyncio.create_task(a.lost())
        await a.release()
        await asyncio.wait_for(lost, 2)
        assert not a.is_leader
        assert await leads_within(b, 2)
        assert b.is_leader
        await b.release()

    run(scenario())


def test_file_lock_taken_over_when_the_leader_process_dies(tmp_path):
    path = str(tmp_path / "leader.lock")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, path],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_line(child, "LEADER", 20)

        async def scenario():
            standby = FileLeadership(path, identity="standby", retry_period=0.1)
            assert not await leads_within(standby, 0.5)
            child.send_signal(signal.SIGKILL)  # no release: the kernel drops the flock
            t0 = time.monotonic()
            assert await leads_within(standby, 5)
            assert time.monotonic() - t0 < 1.0  # within a few retry periods
            await standby.release()

        run(scenario())
    finally:
        child.kill()
        child.wait(5)


def test_file_lock_replaced_file_means_stepping_down(tmp_path):
    path = tmp_path / "leader.lock"

    async def scenario():
        a = FileLeadership(str(path), identity="a", retry_period=0.1)
        await a.acquire()
        path.unlink()  # an operator deletes the lock file: another replica could lock a new one
        await asyncio.wait_for(a.lost(), 2)
        assert not a.is_leader

    run(scenario())


# --- Redis lease ---------------------------------------------------------------------


def _redis_cfg(key: str, identity: str, url: str = REDIS_URL) -> AgentConfig:
    return _cfg(
        ha_backend="redis",
        ha_redis_url=url,
        ha_lock_name=key,
        ha_lease_duration=LEASE,
        ha_renew_deadline=DEADLINE,
        ha_retry_period=RETRY,
        identity=identity,
    )


@pytest.fixture
def key():
    return f"streamspace-test-leader-{uuid.uuid4().hex}"


def test_redis_one_leader_and_graceful_handover(key):
    async def scenario():
        a = RedisLeadership.from_config(_redis_cfg(key, "a"))
        b = RedisLeadership.from_config(_redis_cfg(key, "b"))
        try:
            await a.acquire()
            assert a.is_leader
            assert not await leads_within(b, LEASE + RETRY)  # renewals keep it past one lease
            assert a.is_leader
            assert await a._redis().get(key) == b"a"
            await a.release()
            t0 = time.monotonic()
            assert await leads_within(b, 2 * RETRY + 1)  # the key is gone: next retry wins
            assert time.monotonic() - t0 <= 2 * RETRY + 0.5
            assert await b._redis().get(key) == b"b"
        finally:
            await a.aclose()
            await b.aclose()

    run(scenario())


def test_redis_standby_takes_over_within_the_lease_when_the_leader_dies(key):
    async def scenario():
        a = RedisLeadership.from_config(_redis_cfg(key, "a"))
        b = RedisLeadership.from_config(_redis_cfg(key, "b"))
        try:
            await a.acquire()
            waiting = asyncio.create_task(b.acquire())
            await asyncio.sleep(RETRY * 2)  # let the standby try (and fail) a couple of times
            assert not waiting.done()
            # The leader dies: it stops renewing and never deletes the key.
            a._renewer.cancel()
            died = time.monotonic()
            await asyncio.wait_for(waiting, LEASE + RETRY + 1)
            took = time.monotonic() - died
            assert b.is_leader
            assert took <= LEASE + RETRY + 0.3, took
            assert took < 5  # the requirement
        finally:
            await b.aclose()
            await a.aclose()  # compare-and-delete: b's key stays

    run(scenario())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def private_redis(tmp_path):
    assert shutil.which("redis-server"), "redis-server is missing (./dev test needs a local Redis anyway)"
    port = _free_port()
    subprocess.run(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
            "--dir",
            str(tmp_path),
            "--pidfile",
            str(tmp_path / "redis.pid"),
        ],
        check=True,
        timeout=10,
    )
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
        assert time.monotonic() < deadline, "private redis-server did not start"
        time.sleep(0.05)
    yield port
    subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, timeout=10)


def test_redis_leader_steps_down_before_its_lease_expires_when_redis_goes_away(key, private_redis):
    url = f"redis://127.0.0.1:{private_redis}/0"

    async def scenario():
        a = RedisLeadership.from_config(_redis_cfg(key, "a", url))
        try:
            await a.acquire()
            assert a.is_leader
            # Let one renewal succeed so that the step-down is measured from a renewal.
            first = a.last_renewed
            deadline = time.monotonic() + 3 * RETRY
            while a.last_renewed == first:
                assert time.monotonic() < deadline, "no renewal"
                await asyncio.sleep(0.05)
            subprocess.run(["redis-cli", "-p", str(private_redis), "shutdown", "nosave"], capture_output=True)
            await asyncio.wait_for(a.lost(), LEASE + 1)
            stepped_down = time.monotonic()
            assert not a.is_leader
            since_renewal = stepped_down - a.last_renewed
            # Not before the renew deadline, and well before the lease could expire elsewhere.
            assert DEADLINE - 0.05 <= since_renewal < LEASE - 0.5, since_renewal
        finally:
            await a.aclose()

    run(scenario())


def test_redis_leader_steps_down_when_the_key_is_taken(key):
    async def scenario():
        a = RedisLeadership.from_config(_redis_cfg(key, "a"))
        try:
            await a.acquire()
            await a._redis().set(key, "intruder", px=int(LEASE * 1000))  # e.g. its lease lapsed and b won
            await asyncio.wait_for(a.lost(), RETRY + 1)
            assert not a.is_leader
            await a.release()
            assert await a._redis().get(key) == b"intruder"  # release deletes only our own key
        finally:
            await a.aclose()

    run(scenario())
