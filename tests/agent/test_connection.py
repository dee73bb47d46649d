"""Reconnects, backoff, answers kept across a drop, and the drain on SIGTERM (in-process
and on a real ``python -m agent_clients`` subprocess with the test FileBackend)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

import pytest

from agent_clients import protocol
from agent_clients.backends.base import SessionStatus
from agent_clients.leadership.base import Leadership
from agent_clients.runtime.agent import Agent, backoff_delay
from tests.agent.harness import FakeControlPlane, Gate, GatedBackend, create_payload, make_config, running_agent
from tests.support.file_backend import FileBackend

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parents[2]


async def test_backoff_is_full_jitter_exponential_and_capped():
    rng = random.Random(7)
    for attempt in range(40):
        ceiling = min(3.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, base=0.5, cap=3.0, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # spread over the whole range (full jitter)


async def test_reconnects_after_drops_with_capped_backoff_and_resends_held_answers():
    backend = GatedBackend([SessionStatus("s-0", "running")])
    gate = backend.gate("create", "s-1")
    async with FakeControlPlane() as cp, running_agent(cp, backend, reconnect_cap=0.3) as agent:
        conn = await cp.accept()
        await conn.expect("hello")
        await conn.command("c1", "create_session", "s-1", create_payload())
        await conn.expect("ack", command_id="c1")
        await gate.wait_entered()
        # The control plane goes away (and refuses reconnects) while the create runs.
        cp.refuse_with = 1013
        await conn.ws.close(1011, "server restarting")
        await asyncio.wait_for(conn.closed.wait(), 5)
        gate.open()
        await wait_until(lambda: ("c1", 1) in agent._unsent)  # answered while disconnected
        for _ in range(3):
            await cp.accept()
        cp.refuse_with = None
        # Drop the next connection right after hello.
        conn = await cp.accept()
        await conn.expect("hello")
        await conn.ws.close(1012, "again")
        conn = await cp.accept()
        hello = await conn.expect("hello")
        assert {s["session_id"] for s in hello.payload["sessions"]} == {"s-0", "s-1"}
        answered = [c for c in cp.all if any(m.type == "complete" for m in c.log)]
        if answered:
            # Held answers follow the hello at once.
            assert [m.type for m in answered[0].log[:2]] == ["hello", "complete"]
        else:
            # It went out on a connection the server was closing: the control plane redelivers,
            # and the agent answers from its cache without executing again.
            await conn.command("c1", "create_session", "s-1", create_payload())
            await conn.expect("complete", command_id="c1")
        assert backend.calls[("create", "s-1")] == 1
        assert agent.connections >= 2
        assert len(agent.reconnect_delays) >= 5
        assert all(0 <= d <= 0.3 for d in agent.reconnect_delays)


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_refused_token_is_retried_with_backoff():
    async with FakeControlPlane() as cp:
        cp.refuse_with = protocol.CLOSE_UNAUTHORIZED
        async with running_agent(cp, GatedBackend(), reconnect_cap=0.2) as agent:
            for _ in range(4):
                conn = await cp.accept()
                await asyncio.wait_for(conn.closed.wait(), 5)
            cp.refuse_with = None
            conn = await cp.accept()
            await conn.expect("hello")
            assert agent.connect_attempts >= 5
            assert all(d <= 0.2 for d in agent.reconnect_delays)


async def test_in_process_drain_finishes_in_flight_and_leaves_new_commands_unacked():
    backend = GatedBackend()
    gate = backend.gate("create", "s-1")
    async with FakeControlPlane() as cp:
        async with running_agent(cp, backend, heartbeat_interval=30) as agent:
            conn = await cp.accept()
            await conn.expect("hello")
            await conn.command("c1", "create_session", "s-1", create_payload())
            await gate.wait_entered()
            agent.request_shutdown()
            hb = await conn.expect("heartbeat")
            assert hb.payload["status"] == "draining"
            await conn.command("c2", "create_session", "s-2", create_payload())
            gate.open()
            await conn.expect("complete", command_id="c1")
            await asyncio.wait_for(conn.closed.wait(), 10)
        assert conn.close_code == 1000
        assert not any(m.type == "ack" and m.payload["command_id"] == "c2" for m in conn.log)
        assert ("create", "s-2") not in backend.calls
        assert "s-1" in backend.sessions  # sessions keep running
        assert backend.closed


def agent_process(cp: FakeControlPlane, state_dir: Path, **env: str):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "CONTROL_PLANE", "HA_"))}
    full_env.update(
        FILE_BACKEND_DIR=str(state_dir),
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        **env,
    )
    argv = [
        sys.executable,
        "-m",
        "agent_clients",
        "--backend",
        "tests.support.file_backend:FileBackend",
        "--agent-id",
        "agent-sub",
        "--control-plane-url",
        f"http://127.0.0.1:{cp.port}",
        "--token",
        "sub-token",
        "--heartbeat-interval",
        "0.5",
        "--reconnect-cap",
        "0.5",
        "--drain-timeout",
        "10",
    ]
    return asyncio.create_subprocess_exec(
        *argv, cwd=str(ROOT), env=full_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )


async def finish(proc, timeout: float = 15) -> tuple[int, str]:
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(errors="replace")


async def test_sigterm_drains_a_real_agent_process(tmp_path):
    async with FakeControlPlane() as cp:
        proc = await agent_process(cp, tmp_path, FILE_BACKEND_CREATE_DELAY="1.5")
        try:
            conn = await cp.accept(timeout=15)
            hello = await conn.expect("hello")
            assert hello.payload["agent_id"] == "agent-sub"
            assert conn.headers["authorization"] == "Bearer sub-token"
            await conn.command("c1", "create_session", "s-1", create_payload())
            await conn.expect("ack", command_id="c1")
            proc.send_signal(signal.SIGTERM)
            hb = await conn.expect("heartbeat", status="draining")
            assert hb.payload["status"] == "draining"
            await conn.command("c2", "create_session", "s-2", create_payload())
            done = await conn.expect("complete", command_id="c1", timeout=10)
            assert done.payload["result"]["state"] == "running"
            await asyncio.wait_for(conn.closed.wait(), 10)
            assert conn.close_code == 1000
            code, out = await finish(proc)
        finally:
            if proc.returncode is None:
                proc.kill()
        assert code == 0, out
        assert "sub-token" not in out  # the token is never logged
        assert "hello sent (0 sessions)" in out
        assert not any(m.type == "ack" and m.payload["command_id"] == "c2" for m in conn.log)
        assert FileBackend.executions(tmp_path, "create", "s-1") == 1
        assert FileBackend.executions(tmp_path, "create", "s-2") == 0
        assert FileBackend.read_state(tmp_path)["sessions"]["s-1"]["state"] == "running"


async def test_sigkill_between_ack_and_complete_then_redelivery_executes_once(tmp_path):
    async with FakeControlPlane() as cp:
        # 1. Killed while the create sleeps: nothing was created yet.
        proc = await agent_process(cp, tmp_path, FILE_BACKEND_CREATE_DELAY="1.0")
        conn = await cp.accept(timeout=15)
        await conn.expect("hello")
        await conn.command("c1", "create_session", "s-1", create_payload())
        await conn.expect("ack", command_id="c1")
        proc.kill()
        await proc.wait()
        # 2. A new process; the control plane redelivers: executed once, completed.
        proc = await agent_process(cp, tmp_path, FILE_BACKEND_CREATE_DELAY="0.2")
        try:
            conn = await cp.accept(timeout=15)
            await conn.expect("hello")
            await conn.command("c1", "create_session", "s-1", create_payload())
            await conn.expect("complete", command_id="c1", timeout=10)
            assert FileBackend.executions(tmp_path, "create", "s-1") == 1
            proc.kill()
            await proc.wait()
            # 3. Killed after completing: a third process finds the session, does not recreate it.
            proc = await agent_process(cp, tmp_path)
            conn = await cp.accept(timeout=15)
            hello = await conn.expect("hello")
            assert [s["session_id"] for s in hello.payload["sessions"]] == ["s-1"]
            await conn.command("c1", "create_session", "s-1", create_payload())
            await conn.expect("complete", command_id="c1", timeout=10)
            assert FileBackend.executions(tmp_path, "create", "s-1") == 1
            proc.send_signal(signal.SIGTERM)
            code, out = await finish(proc)
            assert code == 0, out
        finally:
            if proc.returncode is None:
                proc.kill()


async def test_bad_configuration_exits_2():
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent_clients",
        "--agent-id",
        "x",
        "--control-plane-url",
        "ftp://nope",
        "--token",
        "t",
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2
    assert err.decode().strip().count("\n") == 0 and "CONTROL_PLANE_URL" in err.decode()


async def test_no_hello_before_the_backend_has_listed_its_sessions():
    """Sessions missing from a hello are reconciled as gone: never report a guess."""
    backend = GatedBackend([SessionStatus("s-1", "running")])
    backend.list_gate = gate = Gate()
    async with FakeControlPlane() as cp, running_agent(cp, backend, reconnect_cap=0.2) as agent:
        agent.hello_list_timeout = 0.2
        await gate.wait_entered()
        with pytest.raises(TimeoutError):
            await cp.accept(timeout=0.6)
        gate.open()
        conn = await cp.accept()
        hello = await conn.expect("hello")
        assert [s["session_id"] for s in hello.payload["sessions"]] == ["s-1"]


class SwitchLeadership(Leadership):
    """Leadership a test can take away and give back."""

    def __init__(self) -> None:
        self.granted = asyncio.Event()
        self.granted.set()
        self.taken = asyncio.Event()
        self.released = False

    async def acquire(self) -> None:
        await self.granted.wait()
        self.taken.clear()

    async def lost(self) -> None:
        await self.taken.wait()

    async def release(self) -> None:
        self.released = True

    @property
    def is_leader(self) -> bool:
        return self.granted.is_set() and not self.taken.is_set()

    def take_away(self) -> None:
        self.granted.clear()
        self.taken.set()


async def test_losing_leadership_disconnects_until_it_is_acquired_again():
    leadership = SwitchLeadership()
    async with FakeControlPlane() as cp:
        agent = Agent(make_config(cp.url, reconnect_cap=0.2), GatedBackend(), leadership, install_signal_handlers=False)
        task = asyncio.create_task(agent.run())
        try:
            conn = await cp.accept()
            await conn.expect("hello")
            leadership.take_away()
            await asyncio.wait_for(conn.closed.wait(), 5)
            assert conn.close_code == 1000
            with pytest.raises(TimeoutError):
                await cp.accept(timeout=0.5)  # a standby acts now: this replica stays away
            leadership.granted.set()
            conn = await cp.accept()
            await conn.expect("hello")
        finally:
            agent.request_shutdown()
            assert await asyncio.wait_for(task, 10) == 0
        assert leadership.released
