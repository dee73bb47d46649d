"""The agent runtime's garbage-collector round against a fake control plane (tests/agent/
harness.py; the backend is in memory: what it removes is the Docker backend's part, tested
on the real engine in tests/docker/test_docker_gc_networks.py and end to end in
tests/e2e/test_docker_gc_e2e.py).

A round names every session id the backend found in queries of at most
MAX_SESSIONS_QUERY ids, hands the backend only the ids the control plane said to remove
(minus sessions with a command running here), and logs each id the control plane did not
answer for once per process."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agent_clients import protocol
from tests.agent.harness import FakeControlPlane, GatedBackend, create_payload, running_agent

pytestmark = pytest.mark.asyncio

IDS = [f"s-{i:04d}" for i in range(1200)]
LIVE, REMOVE, KEEP_HOME, IN_FLIGHT = "s-0002", "s-0000", "s-0001", "s-0003"


class CollectingBackend(GatedBackend):
    def __init__(self) -> None:
        super().__init__()
        self.collected: list[tuple[set[str], set[str]]] = []

    def session_ids_found(self) -> set[str]:
        return set(IDS)

    def collect_garbage(self, remove, remove_keep_home, grace) -> list[str]:
        self.collected.append((set(remove), set(remove_keep_home)))
        return []


async def answer_a_round(conn) -> list[int]:
    """Answer one round's queries: a verdict for four ids, nothing about the others."""
    sizes, asked = [], 0
    while asked < len(IDS):
        query = await asyncio.wait_for(conn.gc_requests.get(), 5)
        ids = query.payload["session_ids"]
        sizes.append(len(ids))
        asked += len(ids)
        await conn.send(
            "sessions_verdict",
            {
                "request_id": query.id,
                "live": [i for i in ids if i == LIVE],
                "remove": [i for i in ids if i in (REMOVE, IN_FLIGHT)],
                "remove_keep_home": [i for i in ids if i == KEEP_HOME],
            },
        )
    return sizes


async def test_a_round_asks_in_chunks_acts_on_verdicts_only_and_logs_unknown_ids_once(caplog):
    caplog.set_level(logging.INFO, logger="agent_clients.runtime.agent")
    backend = CollectingBackend()
    gate = backend.gate("create", IN_FLIGHT)
    async with FakeControlPlane() as cp, running_agent(cp, backend, gc_interval=3600.0, gc_grace=60.0) as agent:
        conn = await cp.accept()
        await conn.expect("hello")
        # The round right after hello.
        assert await answer_a_round(conn) == [protocol.MAX_SESSIONS_QUERY, protocol.MAX_SESSIONS_QUERY, 200]
        await asyncio.wait_for(_until(lambda: backend.collected), 5)
        assert backend.collected[0] == ({REMOVE, IN_FLIGHT}, {KEEP_HOME})

        # A create runs for one of them: the next round leaves that session alone.
        await conn.command("c1", "create_session", IN_FLIGHT, create_payload())
        await gate.wait_entered()
        round_two = asyncio.create_task(agent.collect_garbage())
        await answer_a_round(conn)
        await asyncio.wait_for(round_two, 5)
        assert backend.collected[1] == ({REMOVE}, {KEEP_HOME})
        gate.open()
        await conn.expect("complete", command_id="c1")

    unknown = [r.getMessage() for r in caplog.records if "is not known to the control plane" in r.getMessage()]
    assert len(unknown) == len(IDS) - 4  # one line per unknown id, over two rounds
    assert "garbage collector: session s-0004 is not known to the control plane: left alone" in unknown
    assert not any(sid in line for line in unknown for sid in (LIVE, REMOVE, KEEP_HOME, IN_FLIGHT))


async def _until(predicate, step: float = 0.01) -> None:
    while not predicate():
        await asyncio.sleep(step)
