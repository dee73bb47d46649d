"""Leader election across hosts: a Redis key with a lease.

``SET key identity NX PX lease``, renewed every retry period by a compare-and-extend
script. A leader whose renewals have not succeeded for ``ha_renew_deadline`` seconds
steps down (``lost()`` returns) before its lease can expire for the others
(``ha_renew_deadline < ha_lease_duration``). When a leader dies without releasing, a
standby takes over when the lease expires: **the takeover time is the lease duration**
(plus at most one retry period). With the defaults (15 s) that is 15-17 s; for takeover
within 5 s use e.g. ``HA_LEASE_DURATION=3 HA_RENEW_DEADLINE=2 HA_RETRY_PERIOD=0.5``. A
graceful ``release`` deletes the key, so a standby takes over within one retry period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from agent_clients.leadership.base import Leadership
from agent_clients.runtime.deadlines import within

log = logging.getLogger(__name__)


# Extend the lease only if the key still holds our identity; delete likewise.
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_DELETE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class RedisLeadership(Leadership):
    def __init__(
        self,
        url: str,
        key: str,
        *,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
    ) -> None:
        if not 0 < renew_deadline < lease_duration:
            raise ValueError("renew_deadline must be positive and shorter than lease_duration")
        self.url = url
        self.key = key
        self.identity = identity
        self.lease_ms = int(lease_duration * 1000)
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        # One Redis call may take at most this long: a hung server must not hold us past the deadline.
        self.call_timeout = max(0.1, min(retry_period, renew_deadline / 2))
        self._client: Any = None
        self._leader = False
        self._lost = asyncio.Event()
        self._renewer: asyncio.Task | None = None
        self.last_renewed: float = 0.0  # monotonic time a successful acquire/renew was *sent*

    @classmethod
    def from_config(cls, cfg: Any) -> RedisLeadership:
        return cls(
            cfg.ha_redis_url,
            cfg.lock_name,
            identity=cfg.identity,
            lease_duration=cfg.ha_lease_duration,
            renew_deadline=cfg.ha_renew_deadline,
            retry_period=cfg.ha_retry_period,
        )

    def _redis(self) -> Any:
        if self._client is None:
            import redis.asyncio as aioredis

            self._client = aioredis.Redis.from_url(
                self.url,
                socket_timeout=self.call_timeout,
                socket_connect_timeout=self.call_timeout,
                retry_on_timeout=False,
            )
        return self._client

    async def _bounded(self, coro: Any, timeout: float | None = None) -> Any:
        return await within(timeout or self.call_timeout, coro)

    async def _try_acquire(self) -> bool:
        r = self._redis()
        if await self._bounded(r.set(self.key, self.identity, nx=True, px=self.lease_ms)):
            return True
        # Still ours from before (e.g. acquire again after a brief step-down): extend it.
        return bool(await self._bounded(r.eval(_EXTEND, 1, self.key, self.identity, self.lease_ms)))

    async def acquire(self) -> None:
        if self._leader:
            return
        while True:
            sent = time.monotonic()
            try:
                if await self._try_acquire():
                    break
            except Exception as exc:  # connection refused, timeout, server error
                log.warning("redis leadership %s: %s (retrying)", self.key, exc)
            await asyncio.sleep(self.retry_period)
        self.last_renewed = sent
        self._leader = True
        self._lost = asyncio.Event()
        self._renewer = asyncio.create_task(self._renew_loop(), name="ha-redis-renew")
        log.info("leadership acquired: redis key %s as %s", self.key, self.identity)

    async def _renew_loop(self) -> None:
        r = self._redis()
        try:
            while True:
                deadline = self.last_renewed + self.renew_deadline
                await asyncio.sleep(max(0.0, min(self.retry_period, deadline - time.monotonic())))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("could not renew leadership for %.1fs: stepping down", self.renew_deadline)
                    break
                sent = time.monotonic()
                try:
                    extended = await self._bounded(
                        r.eval(_EXTEND, 1, self.key, self.identity, self.lease_ms),
                        min(self.call_timeout, remaining),
                    )
                except Exception as exc:
                    log.warning("leadership renewal failed: %s", exc)
                    continue
                if not extended:
                    log.warning("leadership key %s is no longer ours: stepping down", self.key)
                    break
                self.last_renewed = sent
        finally:
            self._leader = False
            self._lost.set()

    async def lost(self) -> None:
        await self._lost.wait()

    async def release(self) -> None:
        task, self._renewer = self._renewer, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        was_leader, self._leader = self._leader, False
        self._lost.set()
        if was_leader or task is not None:
            try:
                await self._bounded(self._redis().eval(_DELETE, 1, self.key, self.identity))
            except Exception as exc:
                log.warning("could not delete leadership key %s: %s (it expires by itself)", self.key, exc)

    async def aclose(self) -> None:
        """Release and close the Redis client (an addition to the Leadership interface)."""
        await self.release()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    @property
    def is_leader(self) -> bool:
        return self._leader and time.monotonic() - self.last_renewed < self.renew_deadline
