"""The agent runtime against a stand-in control plane (tests/agent/harness.py): hello,
ack/complete, ordering, heartbeats, duplicates, failures, bad frames, session events."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent_clients import protocol
from agent_clients.backends.base import BackendError, SessionStatus
from tests.agent.harness import TOKEN, FakeControlPlane, GatedBackend, create_payload, running_agent

pytestmark = pytest.mark.asyncio


async def test_hello_reports_identity_capacity_and_sessions_held():
    held = [SessionStatus("s-1", "running", "", "127.0.0.1", 5901), SessionStatus("s-2", "hibernated")]
    async with FakeControlPlane() as cp, running_agent(cp, GatedBackend(held)):
        conn = await cp.accept()
        hello = await conn.expect("hello")
        assert conn.headers["authorization"] == f"Bearer {TOKEN}"
        assert conn.path == "/api/v1/agent/connect?agent_id=agent-test"
        p = hello.payload
        assert p["agent_id"] == "agent-test"
        assert p["platform"] == "docker"
        assert p["protocol"] == protocol.PROTOCOL_VERSION
        assert p["region"] == "eu-test"
        assert p["capacity"] == {"cpu": 8, "memory_mb": 16384, "max_sessions": 7}
        assert p["sessions"] == [s.to_dict() for s in held]
        assert conn.log[0].type == "hello"  # hello is the first frame


async def test_ack_then_complete_for_each_command_type():
    backend = GatedBackend([SessionStatus("old", "running")])
    async with FakeControlPlane() as cp, running_agent(cp, backend):
        conn = await cp.accept()
        await conn.expect("hello")
        await conn.command("c1", "create_session", "s-1", create_payload())
        ack = await conn.next()
        assert (ack.type, ack.payload) == ("ack", {"command_id": "c1", "execution": 1})
        done = await conn.expect("complete", command_id="c1")
        assert done.payload["result"] == {
            "session_id": "s-1",
            "state": "running",
            "detail": "",
            "vnc_host": "127.0.0.1",
            "vnc_port": 1,
        }
        await conn.command("c2", "hibernate_session", "s-1")
        assert (await conn.expect("complete", command_id="c2")).payload["result"]["state"] == "hibernated"
        await conn.command("c3", "wake_session", "s-1")
        assert (await conn.expect("complete", command_id="c3")).payload["result"]["state"] == "running"
        await conn.command("c4", "get_session", "nope")
        assert (await conn.expect("complete", command_id="c4")).payload["result"]["state"] == "missing"
        await conn.command("c5", "list_sessions")
        listed = (await conn.expect("complete", command_id="c5")).payload["result"]["sessions"]
        assert {s["session_id"] for s in listed} == {"old", "s-1"}
        await conn.command("c6", "terminate_session", "s-1", {"keep_home": True})
        done = await conn.expect("complete", command_id="c6")
        assert done.payload["result"] == {"session_id": "s-1", "state": "terminated"}
        assert "s-1" not in backend.sessions


async def test_same_session_in_order_other_sessions_concurrently():
    backend = GatedBackend()
    gate_a = backend.gate("create", "a")
    async with FakeControlPlane() as cp, running_agent(cp, backend):
        conn = await cp.accept()
        await conn.expect("hello")
        await conn.command("a1", "create_session", "a", create_payload())
        await conn.command("a2", "hibernate_session", "a")
        await conn.command("a3", "wake_session", "a")
        await conn.command("b1", "create_session", "b", create_payload())
        await gate_a.wait_entered()
        # b completes while a's create is still held; a's later commands wait their turn.
        await conn.expect("complete", command_id="b1")
        assert ("hibernate", "a", "start") not in backend.events
        gate_a.open()
        results = [await conn.expect(t, command_id=c) for t, c in (("complete", "a1"), ("complete", "a2"))]
        assert results[1].payload["result"]["state"] == "hibernated"
        await conn.expect("complete", command_id="a3")
        a_events = [e for e in backend.events if e[1] == "a"]
        assert a_events == [
            ("create", "a", "start"),
            ("create", "a", "end"),
            ("hibernate", "a", "start"),
            ("hibernate", "a", "end"),
            ("wake", "a", "start"),
            ("wake", "a", "end"),
        ]


async def test_heartbeats_keep_flowing_during_a_slow_create_and_a_slow_list():
    backend = GatedBackend([SessionStatus("s-0", "running")])
    gate = backend.gate("create", "slow")
    async with FakeControlPlane() as cp, running_agent(cp, backend, heartbeat_interval=0.2):
        conn = await cp.accept()
        await conn.expect("hello")
        await conn.command("c1", "create_session", "slow", create_payload())
        await gate.wait_entered()
        for _ in range(3):
            hb = await conn.expect("heartbeat", timeout=2)
            assert hb.payload["status"] == "online"
            assert hb.payload["capacity"]["max_sessions"] == 7
            assert hb.payload["sessions"] == [{"session_id": "s-0", "state": "running"}]
        # Now the backend's list hangs too: heartbeats go on with the last known list.
        backend.list_gate = list_gate = type(gate)()
        await list_gate.wait_entered()
        conn.clear_pending("heartbeat")
        for _ in range(2):
            hb = await conn.expect("heartbeat", timeout=3)
            assert hb.payload["sessions"] == [{"session_id": "s-0", "state": "running"}]
        list_gate.open()
        gate.open()
        await conn.expect("complete", command_id="c1")
        conn.clear_pending("heartbeat")
        hb = await conn.expect("heartbeat", timeout=3)
        assert {s["session_id"] for s in hb.payload["sessions"]} == {"s-0", "slow"}


async def test_duplicate_command_id_is_not_executed_twice():
    backend = GatedBackend()
    gate = backend.gate("create", "s-2")
    async with FakeControlPlane() as cp, running_agent(cp, backend):
        conn = await cp.accept()
        await conn.expect("hello")
        await conn.command("c1", "create_session", "s-1", create_payload())
        first = await conn.expect("complete", command_id="c1")
        await conn.command("c1", "create_session", "s-1", create_payload())
        await conn.expect("ack", command_id="c1")
        again = await conn.expect("complete", command_id="c1")
        assert again.payload == first.payload
        assert backend.calls[("create", "s-1")] == 1
        # In flight: acked again, executed once, answered once.
        await conn.command("c2", "create_session", "s-2", create_payload())
        await gate.wait_entered()
        await conn.command("c2", "create_session", "s-2", create_payload())
        await conn.expect("ack", command_id="c2")
        await conn.expect("ack", command_id="c2")
        gate.open()
        await conn.expect("complete", command_id="c2")
        await conn.command("c3", "get_session", "s-2")
        await conn.expect("complete", command_id="c3")
        assert [m.payload["command_id"] for m in conn.log if m.type == "complete"].count("c2") == 1
        assert backend.calls[("create", "s-2")] == 1


async def test_backend_errors_become_failed_with_retryable_flag():
    backend = GatedBackend()
    backend.errors[("create", "perm")] = BackendError("image not found", retryable=False, detail="404 from engine")
    backend.errors[("create", "temp")] = BackendError("engine busy", retryable=True)
    backend.errors[("create", "boom")] = ZeroDivisionError("secret internals")
    async with FakeControlPlane() as cp, running_agent(cp, backend):
        conn = await cp.accept()
        await conn.expect("hello")
        await conn.command("p", "create_session", "perm", create_payload())
        await conn.command("t", "create_session", "temp", create_payload())
        await conn.command("b", "create_session", "boom", create_payload())
        await conn.command("x", "create_session", "bad", {"template": {}})  # no image: invalid payload
        await conn.command("n", "hibernate_session", None)  # needs a session id
        p = await conn.expect("failed", command_id="p")
        assert p.payload == {"command_id": "p", "execution": 1, "error": "image not found", "retryable": False}
        t = await conn.expect("failed", command_id="t")
        assert t.payload["retryable"] is True
        b = await conn.expect("failed", command_id="b")
        assert b.payload["retryable"] is True and "secret" not in b.payload["error"]
        x = await conn.expect("failed", command_id="x")
        assert x.payload["retryable"] is False and "invalid create_session payload" in x.payload["error"]
        n = await conn.expect("failed", command_id="n")
        assert n.payload["retryable"] is False


async def test_invalid_control_frames_are_ignored():
    backend = GatedBackend()
    async with FakeControlPlane() as cp, running_agent(cp, backend) as agent:
        conn = await cp.accept()
        await conn.expect("hello")
        for frame in [
            "not json",
            "[]",
            '{"type": "command", "payload": {}}',
            '{"type": "reboot", "payload": {}}',
            '{"type": "command", "payload": {"command_id": "z", "type": "format_disk", "payload": {}}}',
            '{"type": "tunnel_open", "payload": {"tunnel_id": -3, "session_id": "s"}}',
            "x" * (protocol.MAX_TEXT_FRAME + 10),
            b"\x01",
            b"\x09\x00\x00\x00\x01abc",
            protocol.pack_data(77, b"for nobody"),
        ]:
            await conn.send_raw(frame)
        await conn.send("error", {"reason": "test says hi", "ref": None})
        await conn.command("ok", "create_session", "s-1", create_payload())
        await conn.expect("complete", command_id="ok")
        assert agent.connections == 1
        assert not any(m.type == "ack" and m.payload["command_id"] == "z" for m in conn.log)


async def test_session_events_from_backend_watch():
    class WatchingBackend(GatedBackend):
        def watch(self, emit, stop: threading.Event) -> None:
            self.watch_emit = emit
            self.watching.set()
            stop.wait()

    backend = WatchingBackend([SessionStatus("s-1", "running")])
    backend.watching = threading.Event()
    async with FakeControlPlane() as cp, running_agent(cp, backend):
        conn = await cp.accept()
        await conn.expect("hello")
        assert await asyncio.to_thread(backend.watching.wait, 5)
        backend.watch_emit(SessionStatus("s-1", "stopped", "container exited (137)"))
        backend.watch_emit(SessionStatus("s-1", "exploded", "not a state"))  # dropped with a warning
        ev = await conn.expect("session_event")
        assert ev.payload == {"session_id": "s-1", "state": "stopped", "reason": "container exited (137)"}


async def test_a_new_execution_runs_again_and_a_redelivered_one_is_answered_from_cache():
    """A retried command comes back with execution 2: it runs again (the cached failure of
    execution 1 is not the answer); a redelivery of execution 2 is not run a third time."""
    backend = GatedBackend()
    backend.errors[("create", "s-1")] = BackendError("the engine is busy", retryable=True)
    async with FakeControlPlane() as cp, running_agent(cp, backend):
        conn = await cp.accept()
        await conn.expect("hello")
        await conn.command("c1", "create_session", "s-1", create_payload())
        failed = await conn.expect("failed", command_id="c1")
        assert failed.payload["execution"] == 1 and failed.payload["retryable"] is True
        del backend.errors[("create", "s-1")]
        await conn.send(
            "command",
            {
                "command_id": "c1",
                "type": "create_session",
                "session_id": "s-1",
                "payload": create_payload(),
                "execution": 2,
            },
        )
        done = await conn.expect("complete", command_id="c1")
        assert done.payload["execution"] == 2 and done.payload["result"]["state"] == "running"
        await conn.send(
            "command",
            {
                "command_id": "c1",
                "type": "create_session",
                "session_id": "s-1",
                "payload": create_payload(),
                "execution": 2,
            },
        )
        again = await conn.expect("complete", command_id="c1")
        assert again.payload == done.payload
        assert backend.calls[("create", "s-1")] == 2


async def test_a_void_command_waiting_for_its_turn_is_skipped():
    backend = GatedBackend()
    gate = backend.gate("create", "s-1")
    async with FakeControlPlane() as cp, running_agent(cp, backend):
        conn = await cp.accept()
        await conn.expect("hello")
        await conn.command("c1", "create_session", "s-1", create_payload())
        await gate.wait_entered()
        await conn.command("c2", "hibernate_session", "s-1")  # queued behind the create
        await conn.expect("ack", command_id="c2")
        await conn.send("void", {"command_id": "c2", "execution": 1, "reason": "the control plane gave up"})
        await conn.command("c3", "get_session", "s-1")  # a later command: runs once the void one is skipped
        await conn.expect("ack", command_id="c3")  # read after the void, so the void has been read
        gate.open()
        await conn.expect("complete", command_id="c1")
        assert (await conn.expect("complete", command_id="c3")).payload["result"]["state"] == "running"
        await conn.expect_none("complete", 0.3, command_id="c2")
        assert ("hibernate", "s-1") not in backend.calls


async def test_a_superseded_agent_stops_with_one_clear_line_and_a_non_zero_exit(caplog):
    """Close 4409 on the current socket: another process connected with this agent's id."""
    from agent_clients.leadership.base import AlwaysLeader
    from agent_clients.runtime.agent import EXIT_SUPERSEDED, Agent
    from tests.agent.harness import make_config

    async with FakeControlPlane() as cp:
        agent = Agent(make_config(cp.url), GatedBackend(), AlwaysLeader(), install_signal_handlers=False)
        task = asyncio.create_task(agent.run())
        conn = await cp.accept()
        await conn.expect("hello")
        await conn.ws.close(protocol.CLOSE_REPLACED, "replaced by a newer connection of the same agent")
        assert await asyncio.wait_for(task, 10) == EXIT_SUPERSEDED
        assert agent.connect_attempts == 1  # it did not reconnect
    lines = [r.getMessage() for r in caplog.records if "this one stops" in r.getMessage()]
    assert lines == ["another process connected as agent agent-test: this one stops"]
