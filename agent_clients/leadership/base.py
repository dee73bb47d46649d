"""Leader election for agent replicas: only the leader connects and acts.

Backends: :class:`AlwaysLeader` (one replica), the file and Redis locks for Docker
hosts (``agent_clients.leadership.file`` and ``.redis``), a Swarm config for Docker Swarm
(``.swarm``), and the Kubernetes Lease (``agent_clients.leadership.lease``).
"""

from __future__ import annotations

import abc
import asyncio


class Leadership(abc.ABC):
    """The runtime calls ``acquire`` before it connects, and drops the connection as
    soon as ``lost`` returns; then it calls ``acquire`` again."""

    @abc.abstractmethod
    async def acquire(self) -> None:
        """Return once this replica holds the leadership (renewal then runs in the background)."""

    @abc.abstractmethod
    async def lost(self) -> None:
        """Return when leadership is lost (renewal failed or another replica took over)."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give up the leadership at once (graceful shutdown), so a standby can take over."""

    @property
    @abc.abstractmethod
    def is_leader(self) -> bool: ...


class AlwaysLeader(Leadership):
    """A single replica: always the leader."""

    def __init__(self) -> None:
        self._never = asyncio.Event()

    async def acquire(self) -> None:
        return None

    async def lost(self) -> None:
        await self._never.wait()

    async def release(self) -> None:
        return None

    @property
    def is_leader(self) -> bool:
        return True
