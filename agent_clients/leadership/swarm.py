"""Leader election on Docker Swarm: the labels of a Swarm config, written by compare-and-swap.

The lock is a Swarm config named ``HA_LOCK_NAME`` (default ``streamspace-agent-<AGENT_ID>``),
kept in the managers' raft store. Its labels are the record: ``streamspace.leader.holder``
(the leader's identity; ``""`` after a graceful release) and ``streamspace.leader.renewals``
(a counter, for operators). Every write is an update carrying the version index the writer
read; the engine refuses a stale one ("update out of sequence"), so of several racing
writers exactly one wins. Only labels of a config can change, and nothing else writes them.

Why not labels on the agent's own service (a label-only service update would not restart
its tasks): ``docker stack deploy`` writes the compose file's labels, which wipes the
record under a live leader and lets a standby take it at once; and every renewal bumps
the service's version, so an operator's read-then-update can meet "update out of
sequence". A config of its own avoids both; the agent never writes its service.

* No wall clock is compared across nodes. A standby measures the holder's silence on its
  own monotonic clock: the config's version index (every write bumps it, so every renewal
  does) must stay the same for ``lease_duration``, counted from when this standby first
  read that version, before it may swap in its own identity. A config without a holder
  label (just created, or labels wiped) is waited out the same way; only an explicit
  ``""`` (a graceful release) may be taken at once.
* The leader renews every ``retry_period`` (read; update with the version read). Its
  renew deadline runs from the moment it *sent* its last successful renewal; when it
  passes, the leader steps down (``lost()`` returns). That renewal was written after it
  was sent and a standby starts counting only after reading it, so a takeover comes at
  least ``lease_duration - renew_deadline`` after the step-down, whatever the clocks
  say, as long as the two machines' clocks tick at about the same rate.
* Leadership lost this way can be won again by the same process (``acquire`` again).
* ``release()`` writes holder ``""`` if the record still names this replica (a replica
  that stepped down a moment before still clears it): a standby takes over on its next
  poll. It is bounded by ``min(renew_deadline, 4 s)`` (the runtime gives it 5 s).

Engine calls are blocking docker SDK calls: they run on this object's own two threads
(a hung engine cannot starve the agent's other threads), with the SDK's socket timeout
``call_timeout`` = ``min(retry_period, renew_deadline / 4)`` (a renewal is a read and a
write: both fit in the renew deadline with room for a retry), and every await is bounded
by ``within``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import docker
import docker.errors

from agent_clients.leadership.base import Leadership
from agent_clients.runtime.deadlines import within

log = logging.getLogger(__name__)
T = TypeVar("T")

HOLDER = "streamspace.leader.holder"
RENEWALS = "streamspace.leader.renewals"
# Swarm's rule for config names (swarmkit controlapi), and its limit.
_NAME = re.compile(r"^[a-zA-Z0-9]+(?:[a-zA-Z0-9-_.]*[a-zA-Z0-9])?$")
# The client negotiates the API version with the engine (Docker Engine 29 refuses < 1.44);
# that is one round trip, made lazily on this object's threads under the call timeout.
_API_VERSION = "auto"
_DATA = b"StreamSpace agent leadership lock: the record is in this config's labels.\n"


def valid_lock_name(name: str) -> bool:
    return len(name) <= 64 and bool(_NAME.match(name))


@dataclass(frozen=True)
class Record:
    config_id: str
    version: int
    labels: dict[str, str]
    spec: dict[str, Any]

    @property
    def holder(self) -> str | None:
        """The holder's identity; "" when released; None when there is no record."""
        return self.labels.get(HOLDER)

    @property
    def renewals(self) -> int:
        try:
            return int(self.labels.get(RENEWALS, "0"))
        except ValueError:
            return 0


_SKIPPED = object()  # a standby round not run: an earlier one still hangs on the engine


def _out_of_sequence(exc: docker.errors.APIError) -> bool:
    return "out of sequence" in str(exc)


class SwarmLeadership(Leadership):
    def __init__(
        self,
        *,
        name: str,
        identity: str,
        docker_host: str = "",
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
    ) -> None:
        if not 0 < retry_period < renew_deadline < lease_duration:
            raise ValueError("need 0 < retry_period < renew_deadline < lease_duration")
        if not valid_lock_name(name):
            raise ValueError(f"{name!r} is not a valid Swarm config name (letters, digits, '-', '_', '.'; at most 64)")
        self.name = name
        self.identity = identity
        self.docker_host = docker_host
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        # The SDK's socket timeout, per call. A renewal is a read and a write, so two calls
        # per attempt: with renew_deadline / 4, two whole attempts fit in the renew deadline.
        self.call_timeout = min(retry_period, renew_deadline / 4)
        self.release_timeout = min(renew_deadline, 4.0)  # the runtime caps release() at 5 s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="swarm-leadership")
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        self._round = threading.Lock()  # one standby round at a time (a hung one is skipped past)
        self._leader = False
        self._lost = asyncio.Event()
        self._renewer: asyncio.Task[None] | None = None
        self._last_renew = 0.0  # monotonic time the last successful write was sent
        self._seen: tuple[str, int] | None = None  # (config id, version) a standby is timing
        self._seen_at = 0.0  # monotonic time it first read that version
        self._last_error = ""
        self._last_holder: str | None = None
        self.terms = 0  # how many times this instance became leader

    @classmethod
    def from_config(cls, cfg: Any) -> SwarmLeadership:
        from agent_clients.config import ConfigError

        try:
            return cls(
                name=cfg.lock_name,
                # Unique per process even if two tasks share a hostname (a hostname template).
                identity=f"{cfg.identity}-{secrets.token_hex(3)}",
                docker_host=cfg.ha_swarm_docker_host,
                lease_duration=cfg.ha_lease_duration,
                renew_deadline=cfg.ha_renew_deadline,
                retry_period=cfg.ha_retry_period,
            )
        except ValueError as exc:
            raise ConfigError(f"HA_BACKEND=swarm: {exc} (set HA_LOCK_NAME)") from None

    @property
    def is_leader(self) -> bool:
        return self._leader and time.monotonic() - self._last_renew < self.renew_deadline

    # --- the engine (blocking; runs on self._pool) -------------------------------------------

    def _docker(self) -> docker.DockerClient:
        with self._client_lock:
            if self._client is None:
                # The agent's engine (DOCKER_HOST and its TLS settings), or exactly the manager named.
                env = {"DOCKER_HOST": self.docker_host} if self.docker_host else dict(os.environ)
                self._client = docker.from_env(environment=env, version=_API_VERSION, timeout=self.call_timeout)
            return self._client

    def _read(self) -> Record | None:
        try:
            info = self._docker().api.inspect_config(self.name)
        except docker.errors.NotFound:
            return None
        spec = info.get("Spec") or {}
        return Record(info["ID"], int(info["Version"]["Index"]), dict(spec.get("Labels") or {}), spec)

    def _create(self) -> None:
        """Create the config without a holder (waited out like any holder). Racing creators: one wins."""
        try:
            self._docker().api.create_config(self.name, _DATA, labels={RENEWALS: "0"})
            log.info("swarm leadership: created config %s", self.name)
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: another replica created it first
                raise

    def _write(self, record: Record, holder: str) -> float | None:
        """Compare-and-swap the record; the monotonic send time on success, None if it changed."""
        labels = {**record.labels, HOLDER: holder, RENEWALS: str(record.renewals + 1)}
        api = self._docker().api
        url = api._url("/configs/{0}/update", record.config_id)
        sent = time.monotonic()
        try:
            api._raise_for_status(
                api._post_json(url, data={**record.spec, "Labels": labels}, params={"version": record.version})
            )
        except docker.errors.APIError as exc:
            if _out_of_sequence(exc) or exc.status_code == 404:
                return None
            raise
        return sent

    def _try_acquire(self) -> Any:
        """One standby round: the send time of a winning write, None, or _SKIPPED."""
        if not self._round.acquire(blocking=False):
            return _SKIPPED  # an earlier round still hangs on the engine
        try:
            return self._standby_round()
        finally:
            self._round.release()

    def _standby_round(self) -> float | None:
        record = self._read()
        now = time.monotonic()
        if record is None:
            self._create()
            return None
        holder = record.holder
        if holder != self._last_holder:
            self._last_holder = holder
            if holder:
                log.info("swarm leadership %s: %s holds it; waiting", self.name, holder)
        if holder == "" or holder == self.identity:
            pass  # released, or still ours from before a step-down: the CAS decides
        elif (record.config_id, record.version) != self._seen:
            self._seen, self._seen_at = (record.config_id, record.version), now
            return None
        elif now - self._seen_at < self.lease_duration:
            return None
        return self._write(record, self.identity)

    def _renew(self) -> float | str | None:
        """One leader round: the send time of a successful renewal; None if the record moved
        under us (a write of someone else's labels): try again; else why it is no longer ours."""
        record = self._read()
        if record is None:
            return f"the lock's config {self.name} was deleted"
        if record.holder != self.identity:
            return f"another replica holds the lock ({record.holder or 'released'})"
        return self._write(record, self.identity)

    def _clear(self) -> None:
        for _ in range(3):  # the version may move between read and write; retry a little
            record = self._read()
            if record is None or record.holder != self.identity:
                return
            if self._write(record, "") is not None:
                return

    async def _call(self, seconds: float, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        result = await within(seconds, loop.run_in_executor(self._pool, fn))
        if result is not _SKIPPED:  # the engine answered: the next outage's error is logged again
            self._last_error = ""
        return result

    def _warn(self, what: str, exc: BaseException) -> None:
        """Engine errors: once per distinct message at warning (no spam every retry period)."""
        text = f"{type(exc).__name__}: {exc}"[:300]
        if text != self._last_error:
            self._last_error = text
            log.warning("swarm leadership %s: %s failed: %s (retrying)", self.name, what, text)
        else:
            log.debug("swarm leadership %s: %s failed again: %s", self.name, what, text)

    # --- the Leadership interface ------------------------------------------------------------

    async def acquire(self) -> None:
        if self._leader:
            return
        while True:
            try:
                sent = await self._call(self.renew_deadline, self._try_acquire)
            except Exception as exc:  # TimeoutError, an unreachable engine, not a manager ...
                self._warn("acquire attempt", exc)
                sent = None
            if sent is _SKIPPED:  # a round still hangs: wait a retry period, not a busy loop
                await asyncio.sleep(self.retry_period)
                continue
            if sent is not None and time.monotonic() - sent < self.renew_deadline:
                break
            pause = self.retry_period
            if self._seen is not None:  # poll again right when the silence would be long enough
                pause = max(0.01, min(pause, self._seen_at + self.lease_duration - time.monotonic()))
            await asyncio.sleep(pause)
        self._last_renew = sent
        self._seen = None
        self._leader = True
        self.terms += 1
        self._lost = asyncio.Event()
        self._renewer = asyncio.create_task(self._renew_loop(), name=f"swarm-leadership-{self.name}")
        log.info("swarm leadership %s: %s is the leader", self.name, self.identity)

    async def _renew_loop(self) -> None:
        reason = "renewal stopped"
        try:
            while True:
                deadline = self._last_renew + self.renew_deadline
                await asyncio.sleep(max(0.0, min(self.retry_period, deadline - time.monotonic())))
                started = time.monotonic()
                if started >= deadline:
                    reason = f"no successful renewal for {self.renew_deadline:g} s"
                    return
                try:
                    result = await self._call(deadline - started, self._renew)
                except TimeoutError:
                    continue  # the deadline has passed: the next round steps down
                except Exception as exc:  # an engine blip: retry until the deadline
                    self._warn("renewal", exc)
                    continue
                if isinstance(result, str):
                    reason = result
                    return
                if result is not None:
                    self._last_renew = result
        finally:
            self._step_down(reason)

    def _step_down(self, reason: str) -> None:
        if self._leader:
            level = logging.INFO if reason == "released" else logging.WARNING
            log.log(level, "swarm leadership %s: %s steps down: %s", self.name, self.identity, reason)
        self._leader = False
        self._lost.set()

    async def lost(self) -> None:
        await self._lost.wait()

    async def release(self) -> None:
        self._step_down("released")
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        if self.terms == 0:
            return  # never held it: nothing of ours to clear
        # Also after a step-down: the record may still name us (a renewal late, not refused);
        # _clear writes only over our own holder, so a successor's record stays.
        try:
            await self._call(self.release_timeout, self._clear)
        except Exception as exc:  # then a standby waits out the lease instead
            log.warning("swarm leadership %s: release failed, the lease will lapse instead: %s", self.name, exc)

    def close(self) -> None:
        """Free the threads and the client (the runtime calls it at shutdown, after release)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
