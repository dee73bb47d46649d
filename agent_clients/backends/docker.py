"""Docker backend: one container, one bridge network and one home volume per session.

Each session network gets a small subnet (a /28 by default) from the agent's pool
(``DOCKER_NETWORK_POOL``, default 10.213.0.0/16): the engine's default address pools hold
only about 30 bridge networks, the pool thousands. The engine is the source of truth for
what is taken (the subnets of every network on it); allocation is serialised within the
process and an overlap the engine reports (another process took it) moves on to the next.

Names are deterministic (``ss-<session>``, ``ss-<session>-net``, ``ss-<session>-home``) and
every object carries the labels ``streamspace.managed``, ``streamspace.session``,
``streamspace.owner`` and ``streamspace.agent``, so the engine itself is the source of
truth after an agent restart. The VNC port is published on 127.0.0.1 only, on an
ephemeral host port. Hibernate = ``docker stop`` (home and network stay); wake = start.

Every method blocks (docker SDK); the runtime calls them from threads. Errors are
:class:`BackendError` with ``retryable`` telling whether trying again can help.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container

from agent_clients import protocol
from agent_clients.backends import docker_files
from agent_clients.backends import egress as eg
from agent_clients.backends.base import (
    DEFAULT_MIN_CPU,
    DEFAULT_MIN_MEMORY_MB,
    Backend,
    BackendError,
    SessionSpec,
    SessionStatus,
)

log = logging.getLogger(__name__)

LABEL_MANAGED = "streamspace.managed"
LABEL_SESSION = "streamspace.session"
LABEL_OWNER = "streamspace.owner"
LABEL_AGENT = "streamspace.agent"
LABEL_VNC_PORT = "streamspace.vnc_port"  # the container-side VNC port (templates may differ)
# Templates with sound: the container-side port of the desktop's Opus stream (the image's
# SOUND_PORT), published on 127.0.0.1 like VNC; absent on desktops without sound.
LABEL_SOUND_PORT = "streamspace.sound_port"
SOUND_PORT = protocol.SOUND_PORT
# On home volumes: "true" if the session asked to keep its home after terminate. The garbage
# collector removes only volumes labelled "false" (a volume without the label predates it).
LABEL_KEEP_HOME = "streamspace.keep_home"
# On containers: the session's egress policy (agent_clients.backends.egress), so that the agent can
# re-assert its rules after a restart or a wake without asking the control plane.
LABEL_EGRESS = "streamspace.egress"
LABEL_EGRESS_ALLOW = "streamspace.egress_allow"  # comma-separated egress_allow entries

DEFAULT_NETWORK_POOL = "10.213.0.0/16"
DEFAULT_NETWORK_PREFIX = 28
# Serialises subnet allocation among the backends of this process (one engine per host).
_NETWORK_LOCK = threading.Lock()
CREATE_RACE_RETRIES = 3  # a create that lost an object to a concurrent removal starts over

# The agent's own floor (SESSION_MIN_CPU / SESSION_MIN_MEMORY_MB): below it a limit could
# round to "none" (NanoCpus=0 means unlimited to the engine) or charge next to nothing.
# The session id becomes part of Docker object names: keep it to what Docker accepts.
_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")
# Exit codes of a container we stopped: 0 (our entrypoint traps SIGTERM) or 143 (128+SIGTERM).
_CLEAN_STOP_CODES = frozenset({0, 143})


def container_name(session_id: str) -> str:
    return f"ss-{session_id}"


def network_name(session_id: str) -> str:
    return f"ss-{session_id}-net"


def volume_name(session_id: str) -> str:
    return f"ss-{session_id}-home"


def bridge_of(network: Any) -> str:
    """The host interface of a session's bridge network (what its egress rules match)."""
    options = network.attrs.get("Options") or {}
    return options.get("com.docker.network.bridge.name") or f"br-{network.id[:12]}"


class _EgressRules:
    """A create's record that it installed the session's egress rules (undone on failure)."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.name = f"egress rules of {session_id}"


F = TypeVar("F", bound=Callable[..., Any])


def nano_cpus(cores: float) -> int:
    """The engine's NanoCpus for a validated limit: rounded, never truncated, never 0
    (0 means no limit at all)."""
    return max(1, round(cores * 1e9))


def memory_bytes(mb: int) -> int:
    """The engine's Memory (and MemorySwap: no swap beyond it) for a validated limit."""
    return max(1, mb) * 1024 * 1024


def engine_error(what: str, exc: Exception) -> BackendError:
    """An engine error (other than NotFound) as a sentence: refused, or unreachable."""
    if isinstance(exc, docker.errors.APIError):
        code = exc.status_code or 500
        return BackendError(
            f"Docker refused to {what}: {exc.explanation or exc}",
            retryable=code >= 500 or code in (408, 409, 429),
            detail=str(exc),
        )
    return BackendError("Docker engine unreachable", retryable=True, detail=f"{what}: {exc}")


def readable_errors(what: str) -> Callable[[F], F]:
    """A public backend method raises BackendError only: an object that vanished under it
    (NotFound, a race with a concurrent removal) or any other engine error becomes a
    sentence for the user, never an "internal agent error"."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except docker.errors.NotFound as exc:
                raise BackendError(
                    f"a Docker object disappeared while the agent was trying to {what}: {exc.explanation or exc}",
                    retryable=True,
                    detail=str(exc),
                ) from None
            except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
                raise engine_error(what, exc) from None

        return call  # type: ignore[return-value]

    return wrap


def _created_at(raw: Any) -> float | None:
    """When an engine object was made, as seconds since the epoch, from the engine's RFC 3339
    timestamps (nanoseconds, Z or an offset) or unix integers; None if unreadable. A value
    in whole seconds is rounded up (the object is never taken for older than it is)."""
    if isinstance(raw, (int, float)):
        return float(raw) + 1
    if not isinstance(raw, str) or not raw:
        return None
    text = re.sub(r"(\.\d{1,6})\d*", r"\1", raw.strip()).replace("Z", "+00:00")
    try:
        stamp = datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
    return stamp if "." in text else stamp + 1


def rfb_banner(host: str, port: int, timeout: float = 1.0) -> bytes | None:
    """The 12-byte RFB ProtocolVersion banner the server sends first, or None."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            data = b""
            while len(data) < 12:
                chunk = sock.recv(12 - len(data))
                if not chunk:
                    return None
                data += chunk
            return data if data.startswith(b"RFB 003.") else None
    except OSError:
        return None


class DockerBackend(Backend):
    platform = "docker"

    def __init__(
        self,
        client: docker.DockerClient,
        *,
        agent_id: str,
        max_sessions: int = 10,
        rfb_timeout: float = 30.0,
        stop_timeout: int = 10,
        network_pool: str = DEFAULT_NETWORK_POOL,
        network_prefix: int = DEFAULT_NETWORK_PREFIX,
        firewall: eg.IptablesEgress | None = None,
        egress_proxy: str | None = None,
        egress_dns: list[str] | None = None,
        min_cpu: float = DEFAULT_MIN_CPU,
        min_memory_mb: int = DEFAULT_MIN_MEMORY_MB,
    ) -> None:
        self.client = client
        self.agent_id = agent_id
        self.max_sessions = max_sessions
        self.rfb_timeout = rfb_timeout
        self.stop_timeout = stop_timeout
        self.network_pool = ipaddress.IPv4Network(network_pool)
        self.network_prefix = int(network_prefix)
        self.min_cpu = float(min_cpu)
        self.min_memory_mb = int(min_memory_mb)
        if not (math.isfinite(self.min_cpu) and self.min_cpu >= 0.001) or self.min_memory_mb < 6:
            raise ValueError(f"minimum limits {min_cpu!r} cores, {min_memory_mb!r} MB are below 0.001 cores or 6 MB")
        if not self.network_pool.prefixlen <= self.network_prefix <= 30:
            raise ValueError(f"subnet prefix /{network_prefix} does not fit the pool {network_pool} (or exceeds /30)")
        # Sessions this process stopped or removed on purpose: their "die" events are not
        # news for watch(). Cleared when the session starts again.
        self._expected_stops: set[str] = set()
        self._lock = threading.Lock()
        self._host_info: dict[str, Any] | None = None
        # Egress policy: iptables chains per session (agent_clients.backends.egress). DNS is allowed
        # (mode internet) to the host's resolvers, which dockerd forwards queries to from the
        # container's namespace.
        self.firewall = firewall or eg.IptablesEgress()
        self.egress_proxy = eg.parse_proxy(egress_proxy)
        self.egress_dns = eg.resolvers() if egress_dns is None else list(egress_dns)

    @classmethod
    def from_config(cls, cfg: Any) -> DockerBackend:
        """Connect to the engine named by DOCKER_HOST (or the local socket)."""
        try:
            client = docker.from_env()
            client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise BackendError("Docker engine unreachable", retryable=True, detail=str(exc)) from None
        dns = getattr(cfg, "egress_dns", "")
        try:
            backend = cls(
                client,
                agent_id=cfg.agent_id,
                max_sessions=cfg.max_sessions,
                network_pool=cfg.docker_network_pool,
                network_prefix=cfg.docker_network_prefix,
                rfb_timeout=cfg.docker_start_timeout,
                egress_proxy=getattr(cfg, "egress_proxy", "") or None,
                egress_dns=[d.strip() for d in dns.split(",") if d.strip()] if dns else None,
                min_cpu=cfg.session_min_cpu,
                min_memory_mb=cfg.session_min_memory_mb,
            )
        except ValueError as exc:
            raise BackendError(str(exc), retryable=False) from None
        return backend  # its rules are re-asserted by maintain(), once this process leads

    def close(self) -> None:
        self.client.close()

    # --- helpers -----------------------------------------------------------------

    def _labels(self, session_id: str, owner: str) -> dict[str, str]:
        return {
            LABEL_MANAGED: "true",
            LABEL_SESSION: session_id,
            LABEL_OWNER: owner,
            LABEL_AGENT: self.agent_id,
        }

    def _ours(self, labels: dict[str, str] | None, session_id: str) -> bool:
        labels = labels or {}
        return (
            labels.get(LABEL_MANAGED) == "true"
            and labels.get(LABEL_SESSION) == session_id
            and labels.get(LABEL_AGENT) == self.agent_id
        )

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one SDK call, turning transport and server errors into BackendError
        (NotFound passes through for the caller to decide)."""
        try:
            return fn(*args, **kwargs)
        except docker.errors.NotFound:
            raise
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
            raise engine_error(what, exc) from None

    def _get_container(self, session_id: str) -> Any | None:
        try:
            return self._call("inspect the container", self.client.containers.get, container_name(session_id))
        except docker.errors.NotFound:
            return None

    def _check_id(self, session_id: str) -> None:
        if not _SESSION_ID.match(session_id or ""):
            raise BackendError(f"invalid session id {session_id!r}", retryable=False)

    def _host(self) -> dict[str, Any]:
        if self._host_info is None:
            info = self._call("read the engine info", self.client.info)
            self._host_info = {"cpu": int(info.get("NCPU") or 0), "memory_mb": int(info.get("MemTotal") or 0) >> 20}
        return self._host_info

    @staticmethod
    def _host_port(container: Any, label: str = LABEL_VNC_PORT, default: str | None = "5901") -> int | None:
        port = (container.labels or {}).get(label, default)
        if port is None:
            return None
        bindings = (container.attrs.get("NetworkSettings") or {}).get("Ports") or {}
        for binding in bindings.get(f"{port}/tcp") or []:
            if binding.get("HostIp") in ("127.0.0.1", "") and binding.get("HostPort"):
                return int(binding["HostPort"])
        return None

    def _status_of(self, container: Any) -> SessionStatus:
        sid = container.labels.get(LABEL_SESSION, "")
        state = container.attrs.get("State") or {}
        status = state.get("Status", container.status)
        if status == "running":
            port = self._host_port(container)
            return SessionStatus(sid, "running", vnc_host="127.0.0.1" if port else None, vnc_port=port)
        if status in ("created", "restarting"):
            return SessionStatus(sid, "starting")
        if status in ("exited", "dead"):
            code = state.get("ExitCode")
            with self._lock:
                stopped_by_us = sid in self._expected_stops
            if stopped_by_us or (code in _CLEAN_STOP_CODES and not state.get("OOMKilled")):
                return SessionStatus(sid, "hibernated")
            reason = "killed: out of memory" if state.get("OOMKilled") else f"container exited with code {code}"
            return SessionStatus(sid, "failed", detail=reason)
        if status == "paused":
            return SessionStatus(sid, "stopped", detail="container paused")
        return SessionStatus(sid, "failed", detail=f"container state {status}")

    def _wait_ready(self, container: Any, timeout: float) -> SessionStatus:
        """Wait until the container runs and its published VNC port answers an RFB banner."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            self._call("inspect the container", container.reload)
            state = container.attrs.get("State") or {}
            if state.get("Status") in ("exited", "dead"):
                logs = b""
                with contextlib.suppress(docker.errors.DockerException):
                    logs = container.logs(tail=5)
                tail = logs.decode("utf-8", "replace").strip().splitlines()
                raise BackendError(
                    f"session container exited with code {state.get('ExitCode')} during start-up"
                    + (f": {tail[-1][:300]}" if tail else ""),
                    retryable=False,
                    detail=logs.decode("utf-8", "replace"),
                )
            port = self._host_port(container)
            if state.get("Status") == "running" and port and rfb_banner("127.0.0.1", port, timeout=1.0):
                return SessionStatus(container.labels[LABEL_SESSION], "running", vnc_host="127.0.0.1", vnc_port=port)
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"VNC server did not answer within {timeout:.0f}s",
                    retryable=True,
                    detail=f"container {container.name} state {state.get('Status')} port {port}",
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _start(self, container: Any) -> SessionStatus:
        with self._lock:
            self._expected_stops.discard(container.labels.get(LABEL_SESSION, ""))
        self._call("start the container", container.start)
        return self._wait_ready(container, self.rfb_timeout)

    def _validate(self, spec: SessionSpec) -> None:
        self._check_id(spec.session_id)
        if not spec.image:
            raise BackendError("the template names no image", retryable=False)
        if not spec.vnc_password:
            raise BackendError("no VNC password given: refusing to run an open VNC server", retryable=False)
        if not 0 < spec.vnc_port < 65536:
            raise BackendError(f"invalid VNC port {spec.vnc_port}", retryable=False)
        if spec.sound and spec.vnc_port == SOUND_PORT:
            raise BackendError(
                f"the template's VNC port {spec.vnc_port} is the desktop's sound port: choose another", retryable=False
            )
        host = self._host()
        cpu_ok = isinstance(spec.cpu, (int, float)) and not isinstance(spec.cpu, bool) and math.isfinite(spec.cpu)
        if not cpu_ok or spec.cpu < self.min_cpu or (host["cpu"] and spec.cpu > host["cpu"]):
            raise BackendError(
                f"CPU limit {spec.cpu!r} is outside {self.min_cpu:g}..{host['cpu']} cores "
                "(this agent's minimum and this host's cores)",
                retryable=False,
            )
        memory_ok = isinstance(spec.memory_mb, int) and not isinstance(spec.memory_mb, bool)
        if (
            not memory_ok
            or spec.memory_mb < self.min_memory_mb
            or (host["memory_mb"] and spec.memory_mb > host["memory_mb"])
        ):
            raise BackendError(
                f"memory limit {spec.memory_mb!r} MB is outside {self.min_memory_mb}..{host['memory_mb']} MB "
                "(this agent's minimum and this host's memory)",
                retryable=False,
            )
        if not os.path.isabs(spec.home_path):
            raise BackendError(f"home path {spec.home_path!r} is not absolute", retryable=False)
        self._egress_of(spec.egress, spec.egress_allow)

    def _egress_of(self, mode: str, allow: Any) -> tuple[str, tuple[eg.AllowRule, ...]]:
        try:
            return eg.check_policy(mode, allow, self.egress_proxy)
        except ValueError as exc:
            raise BackendError(f"invalid egress policy: {exc}", retryable=False) from None

    # --- egress rules ------------------------------------------------------------------

    def _apply_egress(self, sid: str, network: Any, mode: str, allow: Any) -> None:
        """Install (or re-assert) the session's egress rules; a desktop never runs without."""
        parsed = self._egress_of(mode, allow)
        try:
            self.firewall.apply(
                eg.Chains.of(self.agent_id, sid),
                bridge_of(network),
                *parsed,
                dns=self.egress_dns,
                proxy=self.egress_proxy,
            )
        except eg.EgressError as exc:
            raise BackendError(
                f"could not apply the session's egress policy, so it is not started: {exc}", retryable=False
            ) from None

    def _apply_egress_of(self, container: Any) -> None:
        """Re-assert a container's rules from its labels (wake, repeated create, agent start)."""
        labels = container.labels or {}
        sid = labels.get(LABEL_SESSION, "")
        network = self._call("inspect the network", self.client.networks.get, network_name(sid))
        allow = [e for e in labels.get(LABEL_EGRESS_ALLOW, "").split(",") if e]
        self._apply_egress(sid, network, labels.get(LABEL_EGRESS, eg.DEFAULT_MODE), allow)

    def _remove_egress(self, sid: str, current: list[str] | None = None) -> bool:
        try:
            return self.firewall.remove(eg.Chains.of(self.agent_id, sid), current)
        except eg.IptablesMissing as exc:
            # Without the command no rule can have been installed: nothing to remove (a
            # terminate must not hang on it).
            log.warning("session %s: not removing egress rules: %s", sid, exc)
            return False
        except eg.EgressError as exc:
            raise BackendError(f"could not remove the session's egress rules: {exc}", retryable=True) from None

    @readable_errors("re-assert the sessions' egress rules")
    def maintain(self) -> list[str]:
        """Re-install the egress rules of every session container this agent holds whose
        rules are not all there (a host reboot, a firewall reload or an ``iptables -F``
        removed them): one listing, then a re-apply only where a jump or a rule is missing.
        Called by the runtime only while this process leads (never by a standby), right
        after every hello and then every GC_INTERVAL. A running desktop whose rules cannot
        be applied is stopped: it never runs without its policy. Returns "egress rules of <id>"
        for each session repaired."""
        rows = self._call(
            "list containers",
            self.client.api.containers,
            all=True,
            filters={"label": [f"{LABEL_AGENT}={self.agent_id}", f"{LABEL_MANAGED}=true"]},
        )
        if not rows:
            return []
        try:
            listing = self.firewall.listing()
        except eg.EgressError as exc:
            listing = []  # every session then counts as broken: each re-apply says why it fails
            log.error("cannot list the egress rules: %s", exc)
        repaired = []
        for row in rows:
            labels = row.get("Labels") or {}
            sid = labels.get(LABEL_SESSION, "")
            if not sid or not self._ours(labels, sid) or self._egress_intact(sid, labels, listing):
                continue
            container = self._get_container(sid)
            if container is None:
                continue
            try:
                self._apply_egress_of(container)
                repaired.append(f"egress rules of {sid}")
            except (BackendError, docker.errors.NotFound) as exc:
                log.error("session %s: its egress policy could not be re-applied: %s", sid, exc)
                if container.status == "running":
                    with self._lock:
                        self._expected_stops.add(sid)
                    log.error("stopping session %s: a desktop never runs without its egress policy", sid)
                    with contextlib.suppress(docker.errors.DockerException):
                        container.stop(timeout=self.stop_timeout)
        return repaired

    def _egress_intact(self, sid: str, labels: dict[str, str], listing: list[str]) -> bool:
        """Whether the listing holds both jumps and every rule of the session's policy."""
        allow = [e for e in labels.get(LABEL_EGRESS_ALLOW, "").split(",") if e]
        try:
            mode, rules = self._egress_of(labels.get(LABEL_EGRESS, eg.DEFAULT_MODE), allow)
        except BackendError:
            return False  # re-applying says why
        return self.firewall.intact(
            eg.Chains.of(self.agent_id, sid), mode, rules, dns=self.egress_dns, proxy=self.egress_proxy, listing=listing
        )

    # --- Backend interface ---------------------------------------------------------

    @readable_errors("create the session")
    def create(self, spec: SessionSpec) -> SessionStatus:
        self._validate(spec)
        for attempt in range(1, CREATE_RACE_RETRIES + 1):
            try:
                return self._create_once(spec)
            except docker.errors.ImageNotFound:
                raise BackendError(f"image {spec.image} is not present on this Docker host", retryable=False) from None
            except docker.errors.NotFound as exc:
                # Something this create relies on vanished under it (removed concurrently):
                # what it made is undone; start over, a few times.
                log.warning(
                    "create %s: %s disappeared during the create (attempt %d of %d)",
                    spec.session_id,
                    exc.explanation or exc,
                    attempt,
                    CREATE_RACE_RETRIES,
                )
                if attempt == CREATE_RACE_RETRIES:
                    raise
                time.sleep(0.1 * attempt)
        raise AssertionError("unreachable")

    def _create_once(self, spec: SessionSpec) -> SessionStatus:
        sid = spec.session_id
        existing = self._get_container(sid)
        if existing is not None:
            if not self._ours(existing.labels, sid):
                raise BackendError(
                    f"name collision: a container named {container_name(sid)} exists that is not this session's",
                    retryable=False,
                )
            self._check_limits(existing)
            self._apply_egress_of(existing)
            if existing.status == "running":
                return self._wait_ready(existing, self.rfb_timeout)
            return self._start(existing)

        # The plain listing (no inspect per container): a container removed meanwhile
        # cannot fail it, and it costs one call however many sessions the agent holds.
        held = self._call(
            "list containers",
            self.client.api.containers,
            all=True,
            filters={"label": [f"{LABEL_AGENT}={self.agent_id}", f"{LABEL_MANAGED}=true"]},
        )
        if len(held) >= self.max_sessions:
            raise BackendError(
                f"this agent holds {len(held)} sessions, its maximum is {self.max_sessions}", retryable=False
            )
        try:
            self._call("inspect the image", self.client.images.get, spec.image)
        except docker.errors.NotFound:
            raise BackendError(
                f"image {spec.image} is not present on this Docker host (the agent does not pull images)",
                retryable=False,
            ) from None

        made: list[Any] = []  # what this call created, removed again if it fails
        labels = self._labels(sid, spec.owner)
        try:
            network = self._own_or_make(
                "network",
                network_name(sid),
                sid,
                lambda: self.client.networks.get(network_name(sid)),
                lambda: self._make_network(network_name(sid), labels),
                made,
            )
            self._apply_egress(sid, network, spec.egress, spec.egress_allow)
            made.append(_EgressRules(sid))
            volume = self._own_or_make(
                "volume",
                volume_name(sid),
                sid,
                lambda: self.client.volumes.get(volume_name(sid)),
                lambda: self.client.volumes.create(
                    volume_name(sid), labels={**labels, LABEL_KEEP_HOME: "true" if spec.keep_home else "false"}
                ),
                made,
            )
            env = {**spec.desktop_env(), "VNC_PASSWORD": spec.vnc_password}
            sound = {LABEL_SOUND_PORT: str(SOUND_PORT)} if spec.sound else {}
            if spec.sound:
                env["SOUND_PORT"] = str(SOUND_PORT)
            if spec.egress == "proxy" and self.egress_proxy:
                env.update(eg.proxy_env(self.egress_proxy))
            container = self._call(
                "create the container",
                self.client.containers.create,
                spec.image,
                name=container_name(sid),
                labels={
                    **labels,
                    LABEL_VNC_PORT: str(spec.vnc_port),
                    docker_files.LABEL_HOME: spec.home_path,
                    LABEL_EGRESS: spec.egress,
                    LABEL_EGRESS_ALLOW: ",".join(spec.egress_allow),
                    **sound,
                },
                environment=env,
                nano_cpus=nano_cpus(spec.cpu),
                mem_limit=memory_bytes(spec.memory_mb),
                memswap_limit=memory_bytes(spec.memory_mb),
                ports={f"{port}/tcp": ("127.0.0.1", None) for port in (spec.vnc_port, *map(int, sound.values()))},
                volumes={volume.name: {"bind": spec.home_path, "mode": "rw"}},
                network=network.name,
                hostname="streamspace",
                security_opt=["no-new-privileges"],
                # Session networks are IPv4 only and the egress rules are IPv4 rules: no
                # IPv6 at all in the desktop (not even link-local to the host's bridge).
                sysctls={"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"},
                pids_limit=2048,
                detach=True,
            )
            made.append(container)
            return self._start(container)
        except BaseException:
            self._undo(made, sid)
            raise

    # --- session networks: small subnets from the agent's pool -------------------------

    def _used_subnets(self) -> list[ipaddress.IPv4Network]:
        """Every IPv4 subnet of every network on the engine (ours, other agents', anyone's)."""
        used = []
        for net in self._call("list networks", self.client.api.networks):
            for cfg in (net.get("IPAM") or {}).get("Config") or []:
                with contextlib.suppress(ValueError, TypeError):
                    subnet = ipaddress.ip_network(cfg.get("Subnet") or "", strict=False)
                    if subnet.version == 4:
                        used.append(subnet)
        return used

    def _free_subnets(self, used: list[ipaddress.IPv4Network]):
        """The pool's /prefix subnets that overlap nothing in ``used``, lowest first."""
        pool, size = self.network_pool, 1 << (32 - self.network_prefix)
        start, count = int(pool.network_address), pool.num_addresses // size
        taken: set[int] = set()
        for net in used:
            lo, hi = int(net.network_address), int(net.broadcast_address)
            if hi < start or lo >= start + pool.num_addresses:
                continue
            taken.update(range(max(0, (lo - start) // size), min(count - 1, (hi - start) // size) + 1))
        for index in range(count):
            if index not in taken:
                yield ipaddress.IPv4Network((start + index * size, self.network_prefix))

    def _make_network(self, name: str, labels: dict[str, str]) -> Any:
        """Create the session's bridge network on a free subnet of the pool.

        Raises a non-retryable BackendError naming the pool when none is left."""
        with _NETWORK_LOCK:
            for subnet in self._free_subnets(self._used_subnets()):
                ipam = docker.types.IPAMConfig(
                    pool_configs=[docker.types.IPAMPool(subnet=str(subnet), gateway=str(subnet.network_address + 1))]
                )
                try:
                    return self.client.networks.create(name, driver="bridge", labels=labels, ipam=ipam)
                except docker.errors.APIError as exc:
                    if "overlap" not in str(exc.explanation or exc).lower():
                        raise
                    # Taken meanwhile by another process on this engine: try the next one.
                    log.info("subnet %s for %s is taken already: trying the next", subnet, name)
            raise BackendError(
                f"no free /{self.network_prefix} subnet is left in this agent's session network pool "
                f"{self.network_pool} (DOCKER_NETWORK_POOL): every session needs one. Terminate sessions you no "
                "longer need, or give the agent a larger pool (DOCKER_NETWORK_POOL) or smaller subnets "
                "(DOCKER_NETWORK_PREFIX).",
                retryable=False,
            )

    def _own_or_make(
        self,
        kind: str,
        name: str,
        sid: str,
        get: Callable[[], Any],
        make: Callable[[], Any],
        made: list[Any],
    ) -> Any:
        """Reuse our leftover object of that name (an interrupted create), refuse a foreign one."""
        try:
            obj = self._call(f"inspect the {kind}", get)
        except docker.errors.NotFound:
            obj = None
        if obj is not None:
            if not self._ours(obj.attrs.get("Labels"), sid):
                raise BackendError(
                    f"name collision: a {kind} named {name} exists that is not this session's", retryable=False
                )
            return obj
        obj = self._call(f"create the {kind}", make)
        made.append(obj)
        return obj

    def _undo(self, made: list[Any], sid: str) -> None:
        with self._lock:
            self._expected_stops.add(sid)
        container_left = False  # its rules stay then: a desktop that may run keeps its policy
        for obj in reversed(made):
            try:
                if isinstance(obj, _EgressRules):
                    if not container_left:
                        self._remove_egress(obj.session_id)
                elif isinstance(obj, Container):
                    try:
                        obj.remove(force=True)
                    except docker.errors.NotFound:
                        pass
                    except Exception:
                        container_left = True
                        raise
                else:
                    obj.remove()
            except docker.errors.NotFound:
                pass
            except Exception as exc:
                log.warning(
                    "could not remove %s after a failed create (the garbage collector will): %s",
                    getattr(obj, "name", obj),
                    exc,
                )

    @readable_errors("remove the session")
    def terminate(self, session_id: str, *, keep_home: bool = False) -> None:
        self._check_id(session_id)
        with self._lock:
            self._expected_stops.add(session_id)
        container = self._get_container(session_id)
        if container is not None:
            if self._ours(container.labels, session_id):
                with contextlib.suppress(docker.errors.NotFound):
                    self._call("remove the container", container.remove, force=True)
            else:
                log.warning("not removing %s: it is not this session's container", container.name)
                container = None
        if container is not None or self._get_container(session_id) is None:
            self._remove_egress(session_id)
        self._remove_owned("network", network_name(session_id), session_id, self.client.networks.get)
        if not keep_home:
            self._remove_owned("volume", volume_name(session_id), session_id, self.client.volumes.get)
        with self._lock:
            # A late "die" event finds no container and is dropped: no need to remember the id.
            self._expected_stops.discard(session_id)

    def _remove_owned(self, kind: str, name: str, sid: str, get: Callable[[str], Any]) -> None:
        for attempt in range(5):
            try:
                obj = self._call(f"inspect the {kind}", get, name)
                if not self._ours(obj.attrs.get("Labels"), sid):
                    log.warning("not removing %s %s: it is not this session's", kind, name)
                    return
                self._call(f"remove the {kind}", obj.remove)
                return
            except docker.errors.NotFound:
                return
            except BackendError as exc:
                # "in use" right after the container went away: the engine catches up.
                if not exc.retryable or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    @readable_errors("hibernate the session")
    def hibernate(self, session_id: str) -> SessionStatus:
        self._check_id(session_id)
        container = self._require(session_id)
        with self._lock:
            self._expected_stops.add(session_id)
        if container.status in ("running", "restarting", "paused"):
            try:
                self._call("stop the container", container.stop, timeout=self.stop_timeout)
            except docker.errors.NotFound:
                raise BackendError(f"session {session_id} not found", retryable=False) from None
        return SessionStatus(session_id, "hibernated")

    @readable_errors("wake the session")
    def wake(self, session_id: str) -> SessionStatus:
        self._check_id(session_id)
        container = self._require(session_id)
        self._check_limits(container)
        self._apply_egress_of(container)
        if container.status == "running":
            return self._wait_ready(container, self.rfb_timeout)
        return self._start(container)

    def _check_limits(self, container: Any) -> None:
        """A container made before the minimums existed may have no CPU or memory limit at
        all (``cpu=1e-10`` gave NanoCpus 0, which the engine reads as unlimited): it is not
        started again."""
        host = (container.attrs or {}).get("HostConfig") or {}
        nano, quota = host.get("NanoCpus") or 0, host.get("CpuQuota") or 0
        memory = host.get("Memory") or 0
        if (nano < nano_cpus(self.min_cpu) and quota <= 0) or memory < memory_bytes(self.min_memory_mb):
            raise BackendError(
                "this desktop's container was made without the CPU or memory limit every session now "
                f"has (at least {self.min_cpu:g} cores and {self.min_memory_mb} MB): it is not started "
                "again; terminate the session (keep its home if you want it) and launch a new one",
                retryable=False,
            )

    def _require(self, session_id: str) -> Any:
        container = self._get_container(session_id)
        if container is None or not self._ours(container.labels, session_id):
            raise BackendError(f"session {session_id} not found on this Docker host", retryable=False)
        return container

    @readable_errors("read the session's state")
    def status(self, session_id: str) -> SessionStatus:
        self._check_id(session_id)
        container = self._get_container(session_id)
        if container is None or not self._ours(container.labels, session_id):
            return SessionStatus(session_id, "missing")
        return self._status_of(container)

    @readable_errors("list the sessions")
    def list_sessions(self) -> list[SessionStatus]:
        """One plain listing of the engine (no inspect per container: hundreds of sessions
        are listed in one call); only stopped containers are inspected, for their exit code."""
        rows = self._call(
            "list containers",
            self.client.api.containers,
            all=True,
            filters={"label": [f"{LABEL_AGENT}={self.agent_id}", f"{LABEL_MANAGED}=true"]},
        )
        out = []
        for row in rows:
            labels = row.get("Labels") or {}
            sid = labels.get(LABEL_SESSION, "")
            if not sid or (row.get("Names") or [""])[0].lstrip("/") != container_name(sid):
                continue
            if row.get("State") == "running":
                port = self._listed_port(row)
                out.append(SessionStatus(sid, "running", vnc_host="127.0.0.1" if port else None, vnc_port=port))
                continue
            try:
                container = self._call("inspect the container", self.client.containers.get, row["Id"])
            except docker.errors.NotFound:
                continue  # removed since the listing
            out.append(self._status_of(container))
        return sorted(out, key=lambda s: s.session_id)

    @staticmethod
    def _listed_port(row: dict[str, Any]) -> int | None:
        """The host port of the VNC port in a container listing (the same rule as _host_port)."""
        port = int((row.get("Labels") or {}).get(LABEL_VNC_PORT, "5901"))
        for binding in row.get("Ports") or []:
            if (
                binding.get("PrivatePort") == port
                and binding.get("Type") == "tcp"
                and binding.get("IP") in ("127.0.0.1", "")
                and binding.get("PublicPort")
            ):
                return int(binding["PublicPort"])
        return None

    @readable_errors("find the session's VNC port")
    def vnc_endpoint(self, session_id: str) -> tuple[str, int]:
        container = self._require(session_id)
        port = self._host_port(container) if container.status == "running" else None
        if port is None:
            raise BackendError(f"session {session_id} is not running", retryable=True)
        return "127.0.0.1", port

    @readable_errors("find the session's sound port")
    def audio_endpoint(self, session_id: str) -> tuple[str, int]:
        container = self._require(session_id)
        if LABEL_SOUND_PORT not in (container.labels or {}):
            raise BackendError(f"session {session_id} has no sound (its template has none)", retryable=False)
        port = self._host_port(container, LABEL_SOUND_PORT, None) if container.status == "running" else None
        if port is None:
            raise BackendError(f"session {session_id} is not running", retryable=True)
        return "127.0.0.1", port

    def file_transfer(self, session_id: str, request: dict[str, Any], stream: Any) -> None:
        """List, download or upload in the session's home (backends/docker_files.py)."""
        self._check_id(session_id)
        container = self._get_container(session_id)
        if container is None or not self._ours(container.labels, session_id):
            raise BackendError("the session's desktop is not on this agent", retryable=False)
        if container.status != "running":
            raise BackendError("the desktop is not running", retryable=False)
        docker_files.transfer(self.client, container, request, stream, session_home=self._home_of(container))

    def _home_of(self, container: Any) -> str | None:
        """Where the session's home volume is mounted (a container made before the home label)."""
        volume = volume_name((container.labels or {}).get(LABEL_SESSION, ""))
        for mount in (container.attrs or {}).get("Mounts") or []:
            if mount.get("Type") == "volume" and mount.get("Name") == volume:
                return mount.get("Destination")
        return None

    def capacity(self) -> dict[str, Any]:
        host = self._host()
        return {"cpu": host["cpu"], "memory_mb": host["memory_mb"], "max_sessions": self.max_sessions}

    # --- garbage collection -------------------------------------------------------------

    def _own_session(self, labels: dict[str, str] | None) -> str | None:
        """The session id of an object this agent manages, or None (the engine's label filter
        did this already; never trust it alone)."""
        labels = labels or {}
        if labels.get(LABEL_MANAGED) != "true" or labels.get(LABEL_AGENT) != self.agent_id:
            return None
        return labels.get(LABEL_SESSION) or None

    @readable_errors("list the sessions' objects")
    def session_ids_found(self) -> set[str]:
        """The session ids of every container, network and volume labelled with this agent's
        id: what the garbage collector asks the control plane about."""
        flt = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_AGENT}={self.agent_id}"]}
        containers = self._call("list containers", self.client.api.containers, all=True, filters=flt)
        labels = [c.get("Labels") for c in containers]
        labels += [n.get("Labels") for n in self._call("list networks", self.client.api.networks, filters=flt)]
        volumes = self._call("list volumes", self.client.api.volumes, filters=flt) or {}
        labels += [v.get("Labels") for v in volumes.get("Volumes") or []]
        found = {sid for sid in map(self._own_session, labels) if sid}
        try:
            return found | self.firewall.sessions(self.agent_id)
        except eg.EgressError as exc:
            log.warning("garbage collector: cannot list egress rules: %s", exc)
            return found

    @readable_errors("collect garbage")
    def collect_garbage(
        self, remove: set[str] | frozenset[str], remove_keep_home: set[str] | frozenset[str], grace: float
    ) -> list[str]:
        """Remove this agent's managed objects of the sessions the control plane has finished,
        once older than ``grace`` seconds (a younger one may belong to a create in flight):
        container and network of the sessions in ``remove`` and ``remove_keep_home``, the home
        volume of those in ``remove`` only, and only if labelled keep_home=false (a volume made
        before that label existed, or of a session that asked to keep its home, stays). Any
        other session's objects, and objects not labelled with this agent's id, are never
        touched. Returns what was removed ("network ss-...-net"), one log line each."""
        cutoff = time.time() - grace
        flt = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_AGENT}={self.agent_id}"]}
        finished = set(remove) | set(remove_keep_home)
        removed: list[str] = []

        def garbage(labels: dict[str, str] | None, created: Any) -> str | None:
            sid = self._own_session(labels)
            if sid not in finished:
                return None
            born = _created_at(created)
            if born is None or born > cutoff:
                return None
            return sid

        def drop(kind: str, name: str, sid: str, fn: Callable[[], Any]) -> bool:
            """Remove one object; False if it is still there."""
            try:
                self._call(f"remove the {kind} {name}", fn)
            except docker.errors.NotFound:
                return True
            except BackendError as exc:
                log.warning("garbage collector: could not remove %s %s: %s", kind, name, exc.detail)
                return False
            log.info("garbage collector: removed %s %s of session %s (finished on the control plane)", kind, name, sid)
            removed.append(f"{kind} {name}")
            return True

        in_use: set[str] = set()  # sessions whose container stays: their rules, network and volume stay too
        for c in self._call("list containers", self.client.api.containers, all=True, filters=flt):
            sid = garbage(c.get("Labels"), c.get("Created"))
            if sid is None:
                in_use.add((c.get("Labels") or {}).get(LABEL_SESSION, ""))
                continue
            name = (c.get("Names") or [c["Id"]])[0].lstrip("/")
            with self._lock:
                self._expected_stops.add(sid)
            if not drop("container", name, sid, lambda c=c: self.client.api.remove_container(c["Id"], force=True)):
                in_use.add(sid)  # still there (maybe running): its rules, network and volume stay
            with self._lock:
                self._expected_stops.discard(sid)
        young: set[str] = set()  # sessions with a network too young to collect: a create may be in flight
        for n in self._call("list networks", self.client.api.networks, filters=flt):
            sid = garbage(n.get("Labels"), n.get("Created"))
            if sid is not None and sid not in in_use:
                drop("network", n.get("Name", n["Id"]), sid, lambda n=n: self.client.api.remove_network(n["Id"]))
            elif sid is None:
                young.add(self._own_session(n.get("Labels")) or "")
        try:
            with_rules = self.firewall.sessions(self.agent_id) & finished
        except eg.EgressError as exc:
            log.warning("garbage collector: cannot list egress rules: %s", exc)
            with_rules = set()
        for sid in sorted(with_rules - in_use - young):
            try:
                if self._remove_egress(sid):
                    log.info("garbage collector: removed egress rules of session %s (finished)", sid)
                    removed.append(f"egress rules {sid}")
            except BackendError as exc:
                log.warning("garbage collector: could not remove egress rules of %s: %s", sid, exc.detail)
        volumes = self._call("list volumes", self.client.api.volumes, filters=flt) or {}
        for v in volumes.get("Volumes") or []:
            labels = v.get("Labels") or {}
            sid = garbage(labels, v.get("CreatedAt"))
            if sid is None or sid in in_use:
                continue
            if sid not in remove or labels.get(LABEL_KEEP_HOME) != "false":
                log.debug("garbage collector: keeping home volume %s of session %s", v.get("Name"), sid)
                continue
            drop("volume", v["Name"], sid, lambda v=v: self.client.api.remove_volume(v["Name"]))
        return removed

    # --- events ------------------------------------------------------------------

    def watch(
        self,
        emit: Callable[[SessionStatus], None],
        stop: threading.Event,
        *,
        since: float | None = None,
        window: float = 0.5,
    ) -> None:
        """Report containers of this agent that die without hibernate/terminate.

        Reads the engine's event stream in short contiguous windows (since/until), so it
        notices ``stop`` within about ``window`` seconds and never loses events between
        windows; the engine replays the gap after an engine hiccup.
        """
        since = time.time() if since is None else since
        seen: dict[tuple[str, int, str], float] = {}
        backoff = 0.5
        while not stop.is_set():
            until = time.time() + window
            try:
                stream = self.client.api.events(
                    since=f"{since:.9f}",
                    until=f"{until:.9f}",
                    decode=True,
                    filters={"type": "container", "event": "die", "label": [f"{LABEL_AGENT}={self.agent_id}"]},
                )
                try:
                    for event in stream:
                        key = (event.get("id", ""), int(event.get("timeNano") or 0), event.get("Action", ""))
                        if key in seen:
                            continue
                        seen[key] = until
                        self._on_die(event, emit)
                        if stop.is_set():
                            break
                finally:
                    stream.close()
                since = until - 0.001  # overlap by a millisecond; `seen` drops the duplicates
                seen = {k: t for k, t in seen.items() if t > since - 5}
                backoff = 0.5
            except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
                log.warning("docker events: %s (retrying)", exc)
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _on_die(self, event: dict[str, Any], emit: Callable[[SessionStatus], None]) -> None:
        attrs = (event.get("Actor") or {}).get("Attributes") or {}
        sid = attrs.get(LABEL_SESSION, "")
        if attrs.get(LABEL_MANAGED) != "true" or not sid or attrs.get("name") != container_name(sid):
            return
        with self._lock:
            if sid in self._expected_stops:
                return
        container = self._get_container_quiet(sid)
        if container is None or container.status == "running":
            return  # removed on purpose, or already started again
        code = attrs.get("exitCode", "?")
        state = "stopped" if code == "0" else "failed"
        emit(SessionStatus(sid, state, detail=f"container exited with code {code}"))

    def _get_container_quiet(self, sid: str) -> Any | None:
        try:
            return self._get_container(sid)
        except BackendError:
            return None
