"""Leader election on a coordination.k8s.io/v1 Lease, the client-go recipe in asyncio.

* Acquire: create the Lease, or take it over when it is free (holder cleared by a
  release) or expired (``renewTime + leaseDurationSeconds < now``). A take-over is a
  replace (PUT) carrying the resourceVersion we read: the API server's optimistic
  concurrency lets exactly one of several racing candidates win; the others get
  409 Conflict and keep waiting.
* Renew every ``retry_period``. A leader that has not renewed successfully for
  ``renew_deadline`` (measured on the monotonic clock from the moment it *sent* its last
  successful renewal) steps down: ``lost()`` returns. Because renew_deadline <
  lease_duration, it steps down before any other replica may take over, provided the
  replicas' wall clocks agree to better than ``lease_duration - renew_deadline``.
* ``release()`` clears the holder so a standby takes over at once.

Blocking client calls run in threads (``asyncio.to_thread``); a hung API call cannot
keep a leader in office past its deadline (``asyncio.timeout``: see ``agent_clients.runtime.deadlines``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import random
import time
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from agent_clients.leadership.base import Leadership
from agent_clients.runtime.deadlines import within

log = logging.getLogger(__name__)

# The exact (resource, verb) pairs this module calls; the Role grants exactly these.
API_CALLS: frozenset[tuple[str, str]] = frozenset({("leases", "get"), ("leases", "create"), ("leases", "update")})


def _micro_time(when: dt.datetime) -> str:
    """MicroTime as the API server writes it (RFC 3339, always 6 fractional digits)."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseLeadership(Leadership):
    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        request_timeout: float | None = None,
    ) -> None:
        if not 0 < retry_period < renew_deadline < lease_duration:
            raise ValueError("need 0 < retry_period < renew_deadline < lease_duration")
        self.api_client = api_client
        self.coord = kubernetes.client.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.request_timeout = request_timeout or retry_period
        self._leader = False
        self._lost: asyncio.Event | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._last_renew = 0.0  # monotonic time the last successful renewal was sent
        self._observed_rv: str | None = None
        self.terms = 0  # how many times this instance became leader (for logs and tests)

    @classmethod
    def from_config(cls, cfg: Any) -> LeaseLeadership:
        from agent_clients.backends.kubernetes import load_api_client

        return cls(
            load_api_client(),
            namespace=cfg.namespace,
            name=cfg.lock_name,
            identity=cfg.identity,
            lease_duration=cfg.ha_lease_duration,
            renew_deadline=cfg.ha_renew_deadline,
            retry_period=cfg.ha_retry_period,
        )

    @property
    def is_leader(self) -> bool:
        return self._leader

    # --- one round against the API server (blocking, runs in a thread) -----------------

    def _body(self, spec: dict[str, Any], resource_version: str | None = None) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if resource_version is not None:
            metadata["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    def _expired(self, spec: Any, now: dt.datetime) -> bool:
        if spec.renew_time is None:
            return True
        renew = spec.renew_time
        if renew.tzinfo is None:
            renew = renew.replace(tzinfo=dt.UTC)
        duration = spec.lease_duration_seconds or self.lease_duration
        return renew + dt.timedelta(seconds=duration) < now

    def _try_acquire_or_renew(self) -> bool:
        """True if this replica holds the Lease after this call."""
        now = dt.datetime.now(dt.UTC)
        timeout = self.request_timeout
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status != 404:
                raise
            spec = {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": math.ceil(self.lease_duration),
                "acquireTime": _micro_time(now),
                "renewTime": _micro_time(now),
                "leaseTransitions": 0,
            }
            try:
                created = self.coord.create_namespaced_lease(self.namespace, self._body(spec), _request_timeout=timeout)
            except ApiException as exc2:
                if exc2.status == 409:  # another candidate created it first
                    return False
                raise
            self._observed_rv = created.metadata.resource_version
            return True

        spec = lease.spec or kubernetes.client.V1LeaseSpec()
        holder = spec.holder_identity or ""
        if holder and holder != self.identity and not self._expired(spec, now):
            return False
        ours = holder == self.identity
        acquire = spec.acquire_time if ours and spec.acquire_time else now
        new_spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": math.ceil(self.lease_duration),
            "acquireTime": _micro_time(acquire),
            "renewTime": _micro_time(now),
            "leaseTransitions": (spec.lease_transitions or 0) + (0 if ours else 1),
        }
        try:
            replaced = self.coord.replace_namespaced_lease(
                self.name,
                self.namespace,
                self._body(new_spec, lease.metadata.resource_version),
                _request_timeout=timeout,
            )
        except ApiException as exc:
            if exc.status == 409:  # the Lease changed since we read it: someone else wrote first
                return False
            raise
        self._observed_rv = replaced.metadata.resource_version
        return True

    def _clear_holder(self) -> None:
        lease = self.coord.read_namespaced_lease(self.name, self.namespace, _request_timeout=self.request_timeout)
        spec = lease.spec
        if spec is None or spec.holder_identity != self.identity:
            return
        now = dt.datetime.now(dt.UTC)
        cleared = {
            "holderIdentity": None,
            "leaseDurationSeconds": 1,
            "acquireTime": _micro_time(spec.acquire_time or now),
            "renewTime": _micro_time(now),
            "leaseTransitions": spec.lease_transitions or 0,
        }
        self.coord.replace_namespaced_lease(
            self.name,
            self.namespace,
            self._body(cleared, lease.metadata.resource_version),
            _request_timeout=self.request_timeout,
        )

    # --- the Leadership interface ---------------------------------------------------------

    async def acquire(self) -> None:
        if self._leader:
            return
        while True:
            started = time.monotonic()
            try:
                won = await within(self.renew_deadline, asyncio.to_thread(self._try_acquire_or_renew))
            except Exception as exc:
                log.warning("lease %s/%s: acquire attempt failed: %s", self.namespace, self.name, exc)
                won = False
            if won and time.monotonic() - started < self.renew_deadline:
                break
            await asyncio.sleep(self.retry_period * (0.8 + random.random() * 0.4))  # noqa: S311
        self._last_renew = started
        self._leader = True
        self.terms += 1
        self._lost = asyncio.Event()
        self._renewer = asyncio.create_task(self._renew_loop(), name=f"lease-renew-{self.name}")
        log.info("lease %s/%s: %s is the leader", self.namespace, self.name, self.identity)

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
                    ok = await within(deadline - started, asyncio.to_thread(self._try_acquire_or_renew))
                except TimeoutError:
                    continue  # the deadline has passed: the next round steps down
                except Exception as exc:  # an API blip: retry until the deadline
                    log.warning("lease %s/%s: renewal failed: %s", self.namespace, self.name, exc)
                    continue
                if not ok:
                    reason = "another replica holds the lease"
                    return
                self._last_renew = started
        finally:
            self._step_down(reason)

    def _step_down(self, reason: str) -> None:
        if self._leader:
            log.warning("lease %s/%s: %s steps down: %s", self.namespace, self.name, self.identity, reason)
        self._leader = False
        if self._lost is not None:
            self._lost.set()

    async def lost(self) -> None:
        if self._lost is None:
            return
        await self._lost.wait()

    async def release(self) -> None:
        was_leader = self._leader
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        self._step_down("released")
        if not was_leader:
            return
        try:
            await within(self.renew_deadline, asyncio.to_thread(self._clear_holder))
        except Exception as exc:  # the Lease then simply expires
            log.warning("lease %s/%s: release failed, it will expire instead: %s", self.namespace, self.name, exc)
