"""``within``: await something for at most so many seconds.

Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that arrives as the
inner call finishes, so a task cancelled at that instant runs on (a cancelled Kubernetes
election loop ran on forever and a test hung until pytest-timeout killed it).
``asyncio.timeout`` does not. Every deadline in the agents goes through this."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(seconds: float | None, awaitable: Awaitable[T]) -> T:
    """``await awaitable``; TimeoutError after ``seconds`` (None: no deadline)."""
    async with asyncio.timeout(seconds):
        return await awaitable
