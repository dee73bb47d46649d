"""The Kubernetes backend: one Deployment (replicas 1/0 for wake/hibernate), Service,
PVC and Secret per session, built by :mod:`agent_clients.backends.k8s_manifests`; VNC through
the API server's port-forward.

The cluster is the source of truth: everything the agent makes carries the label
``streamspace.io/agent=<agent id>``, so a restarted agent lists what it holds.

API calls are retried with exponential backoff only where retrying can help
(429, 5xx, 409 on updates, connection errors); any other 4xx becomes a
non-retryable :class:`BackendError` with the API server's own message.

``API_CALLS`` is the exact set of (resource, verb) pairs this module calls. The Role in
``deploy/kubernetes/base`` grants exactly these plus the Lease verbs of
``agent_clients.leadership.lease.API_CALLS``; tests/k8s/test_rbac.py checks both the Role and
the emulator's request log against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from agent_clients.backends import egress as eg
from agent_clients.backends import k8s_manifests as m
from agent_clients.backends.base import (
    DEFAULT_MIN_CPU,
    DEFAULT_MIN_MEMORY_MB,
    Backend,
    BackendError,
    SessionSpec,
    SessionStatus,
)
from agent_clients.config import env_value

log = logging.getLogger(__name__)

API_CALLS: frozenset[tuple[str, str]] = frozenset(
    {
        ("deployments", "create"),
        ("deployments", "get"),
        ("deployments", "list"),
        ("deployments", "patch"),
        ("deployments", "delete"),
        ("services", "create"),
        ("services", "get"),
        ("services", "delete"),
        ("secrets", "create"),
        ("secrets", "get"),
        ("secrets", "delete"),
        ("persistentvolumeclaims", "create"),
        ("persistentvolumeclaims", "get"),
        ("persistentvolumeclaims", "delete"),
        ("networkpolicies", "create"),
        ("networkpolicies", "get"),
        ("networkpolicies", "delete"),
        ("pods", "list"),
        # One port-forward call. It is a WebSocket upgrade (HTTP GET, verb "get"); API servers
        # with AuthorizePodWebsocketUpgradeCreatePermission (on by default since 1.31) also
        # require "create" on the same subresource.
        ("pods/portforward", "get"),
        ("pods/portforward", "create"),
    }
)

USER_AGENT = "streamspace-agent"

# Container waiting reasons after which waiting longer will not help.
_FATAL_WAITING = {
    "ErrImagePull": "the image cannot be pulled",
    "ImagePullBackOff": "the image cannot be pulled",
    "InvalidImageName": "the image name is invalid",
    "CreateContainerConfigError": "the container configuration is invalid",
    "CreateContainerError": "the container cannot be created",
    "CrashLoopBackOff": "the desktop keeps crashing",
}

# Retry policy: which answers of the API server are worth another try.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def load_api_client() -> kubernetes.client.ApiClient:
    """In-cluster service account credentials when running in a pod, else KUBECONFIG
    (or ~/.kube/config)."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config(client_configuration=configuration)
        except (kubernetes.config.ConfigException, OSError) as exc:
            raise BackendError(
                f"no Kubernetes credentials: not in a cluster and no usable kubeconfig ({exc})",
                retryable=False,
            ) from None
    client = kubernetes.client.ApiClient(configuration)
    client.user_agent = USER_AGENT
    return client


def _api_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
        message = body.get("message") or ""
    except (ValueError, AttributeError):
        message = ""
    return message or (exc.reason or "").strip() or f"HTTP {exc.status}"


class KubernetesBackend(Backend):
    platform = "kubernetes"

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        namespace: str,
        agent_id: str,
        ready_timeout: float = 180.0,
        poll_interval: float = 1.0,
        retry_attempts: int = 5,
        retry_base: float = 0.2,
        retry_cap: float = 5.0,
        request_timeout: float = 30.0,
        home_size: str = m.DEFAULT_HOME_SIZE,
        storage_class: str | None = None,
        watch_interval: float = 5.0,
        max_sessions: int = 0,
        egress_proxy: str | None = None,
        min_cpu: float = DEFAULT_MIN_CPU,
        min_memory_mb: int = DEFAULT_MIN_MEMORY_MB,
    ) -> None:
        self.api_client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.apps = kubernetes.client.AppsV1Api(api_client)
        self.networking = kubernetes.client.NetworkingV1Api(api_client)
        self.egress_proxy = eg.parse_proxy(egress_proxy)
        self.namespace = namespace
        self.agent_id = agent_id
        self.ready_timeout = ready_timeout
        self.poll_interval = poll_interval
        self.retry_attempts = max(1, retry_attempts)
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.request_timeout = request_timeout
        self.home_size = home_size
        self.storage_class = storage_class
        self.watch_interval = watch_interval
        self.max_sessions = max_sessions
        self.min_cpu = min_cpu
        self.min_memory_mb = min_memory_mb

    # --- construction -----------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Any) -> KubernetesBackend:
        """In-cluster credentials when running in a pod, else KUBECONFIG / ~/.kube/config.

        Extra settings (environment): K8S_READY_TIMEOUT (seconds, default 180),
        K8S_HOME_SIZE (default 10Gi), K8S_STORAGE_CLASS (default: the cluster's default).
        """
        api_client = load_api_client()
        home_size = env_value("K8S_HOME_SIZE") or m.DEFAULT_HOME_SIZE
        if not m._QUANTITY_RE.match(home_size):
            raise BackendError(f"K8S_HOME_SIZE must be a quantity like 10Gi, got {home_size!r}", retryable=False)
        try:
            ready_timeout = float(env_value("K8S_READY_TIMEOUT") or "180")
        except ValueError:
            raise BackendError("K8S_READY_TIMEOUT must be a number of seconds", retryable=False) from None
        return cls(
            api_client,
            namespace=cfg.namespace,
            agent_id=cfg.agent_id,
            ready_timeout=ready_timeout,
            home_size=home_size,
            storage_class=env_value("K8S_STORAGE_CLASS") or None,
            max_sessions=getattr(cfg, "max_sessions", 0),
            egress_proxy=getattr(cfg, "egress_proxy", "") or None,
            min_cpu=getattr(cfg, "session_min_cpu", DEFAULT_MIN_CPU),
            min_memory_mb=getattr(cfg, "session_min_memory_mb", DEFAULT_MIN_MEMORY_MB),
        )

    def close(self) -> None:
        self.api_client.close()

    # --- the retry policy ---------------------------------------------------------------

    def _api(
        self,
        what: str,
        fn: Callable[..., Any],
        *args: Any,
        passthrough: tuple[int, ...] = (),
        retry_conflict: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Call the API; retry 429/5xx (and 409 when ``retry_conflict``) and connection
        errors with capped exponential backoff and jitter. Statuses in ``passthrough``
        are re-raised as ApiException for the caller to interpret (404 on delete, 409 on
        create); every other failure becomes a BackendError."""
        kwargs.setdefault("_request_timeout", self.request_timeout)
        delay = self.retry_base
        for attempt in range(1, self.retry_attempts + 1):
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status in passthrough:
                    raise
                retryable = exc.status in RETRY_STATUSES or (retry_conflict and exc.status == 409)
                message = f"Kubernetes API refused to {what}: {_api_message(exc)} (HTTP {exc.status})"
                if not retryable or attempt == self.retry_attempts:
                    raise BackendError(message, retryable=retryable, detail=f"{message}\n{exc.body}") from None
                log.warning("%s; retrying (%d/%d)", message, attempt, self.retry_attempts)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                message = f"Kubernetes API unreachable while trying to {what}: {exc}"
                if attempt == self.retry_attempts:
                    raise BackendError(message, retryable=True) from None
                log.warning("%s; retrying (%d/%d)", message, attempt, self.retry_attempts)
            time.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 (jitter, not crypto)
            delay = min(delay * 2, self.retry_cap)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- object helpers ---------------------------------------------------------------

    def _kinds(self) -> dict[str, tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]]:
        """kind -> (create, read, delete) bound to this namespace."""
        return {
            "NetworkPolicy": (
                self.networking.create_namespaced_network_policy,
                self.networking.read_namespaced_network_policy,
                self.networking.delete_namespaced_network_policy,
            ),
            "Secret": (
                self.core.create_namespaced_secret,
                self.core.read_namespaced_secret,
                self.core.delete_namespaced_secret,
            ),
            "PersistentVolumeClaim": (
                self.core.create_namespaced_persistent_volume_claim,
                self.core.read_namespaced_persistent_volume_claim,
                self.core.delete_namespaced_persistent_volume_claim,
            ),
            "Service": (
                self.core.create_namespaced_service,
                self.core.read_namespaced_service,
                self.core.delete_namespaced_service,
            ),
            "Deployment": (
                self.apps.create_namespaced_deployment,
                self.apps.read_namespaced_deployment,
                self.apps.delete_namespaced_deployment,
            ),
        }

    def _create_or_adopt(self, body: dict[str, Any], session_label: str) -> bool:
        """Create one object; True if this call made it, False if ours already existed."""
        kind, name = body["kind"], body["metadata"]["name"]
        create, read, _ = self._kinds()[kind]
        try:
            self._api(f"create {kind} {name}", create, self.namespace, body, passthrough=(409,))
            return True
        except ApiException:
            pass  # 409 AlreadyExists: ours (a repeated create) or a stranger's?
        existing = self._api(f"read {kind} {name}", read, name, self.namespace)
        found = existing.metadata.labels or {}
        if found.get(m.LABEL_SESSION) != session_label or found.get(m.LABEL_AGENT) != m.label_value(self.agent_id):
            raise BackendError(
                f"{kind} {name!r} already exists in namespace {self.namespace!r} and does not belong to "
                "this session; refusing to take it over",
                retryable=False,
            )
        return False

    def _delete(self, kind: str, name: str) -> None:
        """Delete one object; gone already counts as done."""
        _, _, delete = self._kinds()[kind]
        with contextlib.suppress(ApiException):
            self._api(f"delete {kind} {name}", delete, name, self.namespace, passthrough=(404,))

    def _read_deployment(self, session_id: str) -> Any | None:
        name = m.deployment_name(session_id)
        try:
            return self._api(
                f"read Deployment {name}",
                self.apps.read_namespaced_deployment,
                name,
                self.namespace,
                passthrough=(404,),
            )
        except ApiException:
            return None

    def _pods(self, selector: str) -> list[Any]:
        pods = self._api("list pods", self.core.list_namespaced_pod, self.namespace, label_selector=selector).items
        return [p for p in pods if self._matches(p.metadata.labels, selector)]

    @staticmethod
    def _matches(found: dict[str, str] | None, selector: str) -> bool:
        """Equality selectors checked again on our side: a selector that the server
        ignored (or an object with a stale label) never makes us act on a stranger."""
        found = found or {}
        for part in selector.split(","):
            key, _, value = part.partition("=")
            if found.get(key) != value:
                return False
        return True

    def _session_selector(self, session_id: str) -> str:
        sel = m.session_selector(session_id)
        sel[m.LABEL_AGENT] = m.label_value(self.agent_id)
        return ",".join(f"{k}={v}" for k, v in sel.items())

    # --- state ------------------------------------------------------------------------

    def _state(self, session_id: str, deployment: Any | None, pods: list[Any]) -> SessionStatus:
        if deployment is None:
            return SessionStatus(session_id, "missing", "no Deployment for this session")
        host, port = self._endpoint(session_id, deployment)
        if (deployment.spec.replicas or 0) == 0:
            return SessionStatus(session_id, "hibernated", "scaled to zero; home volume kept")
        live = [p for p in pods if not p.metadata.deletion_timestamp]
        if any(self._pod_ready(p) for p in live):
            return SessionStatus(session_id, "running", "", vnc_host=host, vnc_port=port)
        for pod in live:
            problem = self._pod_problem(pod)
            if problem:
                return SessionStatus(session_id, "failed", problem)
        for cond in (deployment.status.conditions if deployment.status else None) or []:
            if cond.type == "Progressing" and cond.status == "False":
                return SessionStatus(session_id, "failed", f"{cond.reason}: {cond.message or ''}".strip())
        phase = live[0].status.phase if live and live[0].status else "no pod yet"
        return SessionStatus(session_id, "starting", f"pod {phase}")

    @staticmethod
    def _pod_ready(pod: Any) -> bool:
        status = pod.status
        if status is None or status.phase != "Running":
            return False
        return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])

    @staticmethod
    def _pod_problem(pod: Any) -> str | None:
        status = pod.status
        if status is None:
            return None
        if status.phase == "Failed":
            return f"pod failed: {status.reason or ''} {status.message or ''}".strip()
        for cs in status.container_statuses or []:
            waiting = cs.state.waiting if cs.state else None
            if waiting and waiting.reason in _FATAL_WAITING:
                why = f"{waiting.reason}: {waiting.message}" if waiting.message else waiting.reason
                return f"{_FATAL_WAITING[waiting.reason]} ({why})"
        return None  # Pending/Unschedulable may still fit once something frees up: keep waiting

    def _endpoint(self, session_id: str, deployment: Any | None = None) -> tuple[str, int]:
        port = 5901
        if deployment is not None:
            with contextlib.suppress(AttributeError, IndexError, TypeError):
                port = deployment.spec.template.spec.containers[0].ports[0].container_port
        return f"{m.service_name(session_id)}.{self.namespace}.svc", port

    def _wait_ready(self, session_id: str) -> SessionStatus:
        """Poll until the session runs, fails for good, or ready_timeout passes."""
        deadline = time.monotonic() + self.ready_timeout
        selector = self._session_selector(session_id)
        while True:
            status = self._state(session_id, self._read_deployment(session_id), self._pods(selector))
            if status.state == "running":
                return status
            if status.state == "failed":
                raise BackendError(f"session failed to start: {status.detail}", retryable=False)
            if status.state in ("missing", "hibernated"):
                raise BackendError(f"session is {status.state} while waiting for it to start", retryable=True)
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"session not ready after {self.ready_timeout:g} s ({status.detail})", retryable=True
                )
            time.sleep(self.poll_interval)

    # --- the Backend interface --------------------------------------------------------

    def create(self, spec: SessionSpec) -> SessionStatus:
        objects = m.make_all(
            spec,
            self.agent_id,
            self.namespace,
            home_size=self.home_size,
            storage_class=self.storage_class,
            egress_proxy=self.egress_proxy,
            min_cpu=self.min_cpu,
            min_memory_mb=self.min_memory_mb,
        )
        session_label = m.label_value(spec.session_id)
        made: list[tuple[str, str]] = []
        try:
            for body in objects:
                if self._create_or_adopt(body, session_label):
                    made.append((body["kind"], body["metadata"]["name"]))
            deployment = self._read_deployment(spec.session_id)
            if deployment is not None and (deployment.spec.replicas or 0) == 0:
                self._scale(spec.session_id, 1)  # a repeated create of a hibernated session starts it
            return self._wait_ready(spec.session_id)
        except BaseException:
            for kind, name in reversed(made):
                try:
                    self._delete(kind, name)
                except BackendError as exc:
                    log.warning("could not clean up %s %s after a failed create: %s", kind, name, exc)
            raise

    def terminate(self, session_id: str, *, keep_home: bool = False) -> None:
        self._delete("Deployment", m.deployment_name(session_id))
        self._delete("Service", m.service_name(session_id))
        self._delete("Secret", m.secret_name(session_id))
        if not keep_home:
            self._delete("PersistentVolumeClaim", m.pvc_name(session_id))
        # The egress policy goes last, once the session's pods are gone (a pod still shutting
        # down keeps its policy), waiting at most ready_timeout.
        deadline = time.monotonic() + self.ready_timeout
        while self._pods(self._session_selector(session_id)) and time.monotonic() < deadline:
            time.sleep(self.poll_interval)
        self._delete("NetworkPolicy", m.network_policy_name(session_id))

    def _scale(self, session_id: str, replicas: int) -> None:
        name = m.deployment_name(session_id)
        try:
            self._api(
                f"scale Deployment {name} to {replicas}",
                self.apps.patch_namespaced_deployment,
                name,
                self.namespace,
                {"spec": {"replicas": replicas}},
                passthrough=(404,),
                retry_conflict=True,
            )
        except ApiException:
            raise BackendError(f"session {session_id} not found on this cluster", retryable=False) from None

    def hibernate(self, session_id: str) -> SessionStatus:
        self._scale(session_id, 0)
        return SessionStatus(session_id, "hibernated", "scaled to zero; home volume kept")

    def wake(self, session_id: str) -> SessionStatus:
        self._ensure_network_policy(session_id)
        self._scale(session_id, 1)
        return self._wait_ready(session_id)

    def _ensure_network_policy(self, session_id: str) -> None:
        """A desktop never wakes without its egress policy: one made before policies existed,
        or whose policy was deleted by hand, gets it back (rebuilt from the Deployment's
        annotations) before it is scaled up."""
        deployment = self._read_deployment(session_id)
        if deployment is None:
            return  # _scale says the session is gone
        spec = m.spec_for_policy(session_id, deployment.metadata.annotations or {})
        policy = m.make_network_policy(spec, self.agent_id, self.namespace, egress_proxy=self.egress_proxy)
        self._create_or_adopt(policy, m.label_value(session_id))

    def status(self, session_id: str) -> SessionStatus:
        deployment = self._read_deployment(session_id)
        pods = self._pods(self._session_selector(session_id)) if deployment is not None else []
        return self._state(session_id, deployment, pods)

    def list_sessions(self) -> list[SessionStatus]:
        selector = m.agent_selector(self.agent_id)
        deployments = self._api(
            "list Deployments", self.apps.list_namespaced_deployment, self.namespace, label_selector=selector
        ).items
        pods = self._pods(selector)
        by_session: dict[str, list[Any]] = {}
        for pod in pods:
            by_session.setdefault((pod.metadata.labels or {}).get(m.LABEL_SESSION, ""), []).append(pod)
        result = []
        for dep in deployments:
            if not self._matches(dep.metadata.labels, selector):
                continue
            session_id = (dep.metadata.annotations or {}).get(m.ANNOTATION_SESSION_ID)
            if not session_id:
                continue
            label = (dep.metadata.labels or {}).get(m.LABEL_SESSION, "")
            result.append(self._state(session_id, dep, by_session.get(label, [])))
        return result

    def vnc_endpoint(self, session_id: str) -> tuple[str, int]:
        """The Service's cluster DNS name: reachable only from inside the cluster.
        The runtime uses :meth:`open_vnc_stream`, which goes through the API server."""
        deployment = self._read_deployment(session_id)
        if deployment is None:
            raise BackendError(f"session {session_id} not found on this cluster", retryable=False)
        return self._endpoint(session_id, deployment)

    def capacity(self) -> dict[str, Any]:
        return {"max_sessions": self.max_sessions} if self.max_sessions else {}

    # --- VNC through the API server ----------------------------------------------------

    def _ready_pod(self, session_id: str) -> tuple[str, int]:
        deployment = self._read_deployment(session_id)
        if deployment is None:
            raise BackendError(f"session {session_id} not found on this cluster", retryable=False)
        if (deployment.spec.replicas or 0) == 0:
            raise BackendError(f"session {session_id} is hibernated", retryable=False)
        _, port = self._endpoint(session_id, deployment)
        for pod in self._pods(self._session_selector(session_id)):
            if not pod.metadata.deletion_timestamp and self._pod_ready(pod):
                return pod.metadata.name, port
        raise BackendError(f"session {session_id} has no ready pod yet", retryable=True)

    def _port_forward(self, pod: str, port: int) -> socket.socket:
        from kubernetes.stream import portforward

        try:
            forward = portforward(
                self.core.connect_get_namespaced_pod_portforward, pod, self.namespace, ports=str(port)
            )
        except ApiException as exc:
            retryable = exc.status in RETRY_STATUSES or exc.status == 0
            raise BackendError(
                f"port-forward to {pod}:{port} refused: {_api_message(exc)}", retryable=retryable
            ) from None
        except Exception as exc:  # websocket / connection failures
            raise BackendError(f"port-forward to {pod}:{port} failed: {exc}", retryable=True) from None
        wrapped = forward.socket(port)
        # The client hands out a thin wrapper around one end of a socketpair; asyncio wants the socket itself.
        sock = getattr(wrapped, "_socket", wrapped)
        sock.setblocking(False)
        return sock

    async def open_vnc_stream(self, session_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to the session's VNC server through ``pods/portforward`` on its ready pod."""
        pod, port = await asyncio.to_thread(self._ready_pod, session_id)
        sock = await asyncio.to_thread(self._port_forward, pod, port)
        try:
            return await asyncio.open_connection(sock=sock)
        except OSError as exc:
            sock.close()
            raise BackendError(f"VNC server unreachable through port-forward: {exc}", retryable=True) from None

    # --- session events ---------------------------------------------------------------

    def watch(self, emit: Callable[[SessionStatus], None], stop: threading.Event) -> None:
        """Poll the sessions every ``watch_interval`` and emit each change of state
        (a pod evicted, an image that stopped pulling). Polling, not a watch stream: it
        needs no extra verb and survives API server restarts without bookkeeping."""
        known: dict[str, str] = {}
        first = True
        while not stop.wait(0 if first else self.watch_interval):
            try:
                current = {s.session_id: s for s in self.list_sessions()}
            except BackendError as exc:
                log.warning("session poll failed: %s", exc)
                first = False
                continue
            if not first:
                for sid, st in current.items():
                    if known.get(sid) != st.state:
                        emit(st)
                for sid in set(known) - set(current):
                    emit(SessionStatus(sid, "missing", "its Deployment disappeared"))
            known = {sid: st.state for sid, st in current.items()}
            first = False
