"""Test support for the Kubernetes agent: kmock's Kubernetes emulator served over real
HTTP, reached with the official ``kubernetes`` client.

Two things here are NOT kmock as shipped, and are labelled as such:

* :class:`CASEmulator` — TEST EXTENSION of ``kmock.KubernetesEmulator`` (0.8) giving it
  the optimistic concurrency of a real API server, which kmock does not enforce:
  every create/patch/replace stamps a fresh ``metadata.resourceVersion``; a PATCH or a
  PUT whose body carries a ``resourceVersion`` different from the stored one is
  refused with 409 Conflict; PUT (replace) on a named object is served (kmock answers
  404 to it). It hooks in where kmock's own emulator does its bookkeeping
  (``_handle``), before kmock's handler runs, under one lock, so the compare and the
  swap are atomic.
* :class:`FakeKubelet` — the emulator has no controllers and no kubelet, so nothing
  would ever create a pod or report readiness. This task plays the Deployment
  controller and the kubelet: for each Deployment with replicas 1 it writes a pod that
  turns Running+Ready after a short delay (or gets stuck pulling a "broken" image);
  replicas 0 or a deleted Deployment removes the pod. It writes straight into the
  emulator's memory, so its writes never appear in the request log.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import hashlib
import itertools
import uuid
from collections.abc import Iterable
from typing import Any

import aiohttp.web
import kmock
import kubernetes
from kmock._internal.k8s import KubernetesError, KubernetesObjectNotFoundError

from agent_clients.backends import kubernetes as k8s_backend

RESOURCES = [
    "apps/v1/deployments",
    "v1/services",
    "v1/secrets",
    "v1/persistentvolumeclaims",
    "v1/pods",
    "coordination.k8s.io/v1/leases",
    "networking.k8s.io/v1/networkpolicies",
]


class CASEmulator(kmock.KubernetesEmulator):
    """TEST EXTENSION: kmock's emulator + resourceVersion compare-and-swap (see module doc)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = itertools.count(1000)
        self._cas = asyncio.Lock()
        self.conflicts = 0  # how many writes were refused for a stale resourceVersion
        self._faults: list[list[Any]] = []
        # TEST EXTENSION: every (User-Agent, resource, verb) seen, kept apart from kmock's
        # request log so that the log may be bounded: kmock checks each new request against
        # the whole log (quadratic), and a long election test with retries piled up enough
        # requests to starve the event loop (a CI run hung for minutes in kmock's filters).
        self.seen_calls: set[tuple[str, str, str]] = set()
        self.history_limit: int | None = None  # keep only the newest N requests in kmock's log

    def fail(self, method: str, plural: str, status: int, *, times: int = 1, message: str = "") -> None:
        """TEST EXTENSION: answer the next ``times`` matching requests with ``status``
        BEFORE anything is stored, as a real API server rejects a forbidden or invalid
        write. (kmock's own reactions answer after its bookkeeping has already stored a
        created/patched object, which would make a refused write half-succeed.)"""
        self._faults.append([method.upper(), plural, status, times, message or f"injected HTTP {status}"])

    def _injected(self, request: Any) -> KubernetesError | None:
        for fault in self._faults:
            method, plural, status, times, message = fault
            if times > 0 and request.method == method and request.resource and request.resource.plural == plural:
                fault[3] -= 1
                reason = {403: "Forbidden", 422: "Invalid", 429: "TooManyRequests"}.get(status, "InternalError")
                return KubernetesError(status=status, reason=reason, message=message)
        return None

    def _stored(self, request: Any) -> Any | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects:
            return None
        obj = self.objects[key]
        return None if obj.deleted else obj

    def _conflict(self, request: Any) -> KubernetesError:
        self.conflicts += 1
        return KubernetesError(
            status=409,
            reason="Conflict",
            message=(
                f'Operation cannot be fulfilled on {request.resource.plural} "{request.name}": '
                "the object has been modified; please apply your changes to the latest version and try again"
            ),
        )

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        if request.resource is not None:
            resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
            self.seen_calls.add((request.headers.get("User-Agent", ""), resource, verb_of(request)))
        if self.history_limit is not None and len(self._requests) > self.history_limit:
            del self._requests[: -self.history_limit]
        fault = self._injected(request)
        if fault is not None:
            raise fault
        mutating = request.resource is not None and request.method in ("POST", "PATCH", "PUT", "DELETE")
        if not mutating:
            return await super()._handle(request)
        async with self._cas:
            if request.method == "PUT" and request.name:
                return await self._replace(request)
            data = request.data if isinstance(request.data, dict) else None
            if request.method == "POST" and data is not None:
                meta = data.setdefault("metadata", {})
                meta.setdefault("namespace", request.namespace)
                meta["resourceVersion"] = str(next(self._rv))
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            elif request.method == "PATCH" and data is not None and request.name:
                stored = self._stored(request)
                wanted = (data.get("metadata") or {}).get("resourceVersion")
                if stored is not None and wanted not in (None, stored.get("metadata", {}).get("resourceVersion")):
                    raise self._conflict(request)
                data.setdefault("metadata", {})["resourceVersion"] = str(next(self._rv))
            return await super()._handle(request)

    async def _replace(self, request: Any) -> aiohttp.web.StreamResponse:
        stored = self._stored(request)
        if stored is None:
            raise KubernetesObjectNotFoundError()
        body = copy.deepcopy(request.data) if isinstance(request.data, dict) else {}
        meta = body.setdefault("metadata", {})
        old_meta = stored.get("metadata", {})
        wanted = meta.get("resourceVersion")
        if wanted is not None and wanted != old_meta.get("resourceVersion"):
            raise self._conflict(request)
        for key in ("uid", "creationTimestamp", "namespace", "name"):
            if key in old_meta:
                meta[key] = old_meta[key]
        meta["resourceVersion"] = str(next(self._rv))
        stored.create(body)  # a new version replacing the whole object (not a merge)
        return aiohttp.web.json_response(stored.raw)


def declare_resources(emu: kmock.KubernetesEmulator) -> None:
    for resource in RESOURCES:
        emu.resources[resource] = {}


def api_client(emu: kmock.KubernetesEmulator, *, user_agent: str = k8s_backend.USER_AGENT, host: str | None = None):
    """A real kubernetes ApiClient pointed at the emulator (or at ``host``, e.g. a proxy)."""
    configuration = kubernetes.client.Configuration()
    configuration.host = host or str(emu.url).rstrip("/")
    client = kubernetes.client.ApiClient(configuration)
    client.user_agent = user_agent
    return client


# --- what the agent called, from the emulator's request log --------------------------------


def verb_of(request: Any) -> str:
    method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
    if method == "GET":
        if request.params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if request.name else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method) or (
        "delete" if request.name else "deletecollection"
    )


def calls(emu: kmock.KubernetesEmulator, *, user_agent: str = k8s_backend.USER_AGENT) -> set[tuple[str, str]]:
    """(resource[/subresource], verb) of every Kubernetes request the agent made."""
    return {(resource, verb) for agent, resource, verb in emu.seen_calls if agent == user_agent}


# --- a kubelet and Deployment controller stand-in ------------------------------------------


class FakeKubelet:
    """Plays the Deployment controller and the kubelet (see module doc).

    ``broken_images``: pods of these images get stuck in ErrImagePull.
    ``hold``: while True, pods stay Pending (never Ready).
    """

    def __init__(self, emu: kmock.KubernetesEmulator, *, ready_after: float = 0.1, tick: float = 0.03) -> None:
        self.emu = emu
        self.ready_after = ready_after
        self.tick = tick
        self.broken_images: set[str] = set()
        self.hold = False
        self._born: dict[tuple[str, str], float] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeKubelet:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def _items(self, plural: str) -> Iterable[tuple[str, str, Any]]:
        for (res, ns, name), obj in list(self.emu.objects.items()):
            if res.plural == plural and not obj.deleted:
                yield ns, name, obj

    async def _run(self) -> None:
        while True:
            self.reconcile()
            await asyncio.sleep(self.tick)

    def reconcile(self) -> None:
        loop = asyncio.get_running_loop()
        wanted: dict[tuple[str, str], tuple[dict[str, Any], Any]] = {}
        for ns, name, dep in self._items("deployments"):
            spec = copy.deepcopy(dep.raw).get("spec", {})
            template = spec.get("template", {})
            digest = hashlib.sha256(repr(template).encode()).hexdigest()[:5]
            pod_name = f"{name}-{digest}"
            ready = False
            if spec.get("replicas", 1) >= 1:
                wanted[(ns, pod_name)] = (template, dep)
                self._born.setdefault((ns, pod_name), loop.time())
                ready = self._pod_state(ns, pod_name, template)[1]
            dep["status"] = {"replicas": 1 if ready else 0, "readyReplicas": 1 if ready else 0}
        for ns, name, _pod in list(self._items("pods")):
            if (ns, name) not in wanted:
                self.emu.objects["v1/pods", ns, name].delete()
                self._born.pop((ns, name), None)
        for (ns, pod_name), (template, _dep) in wanted.items():
            phase, ready, waiting = self._pod_state(ns, pod_name, template)
            container = (template.get("spec", {}).get("containers") or [{}])[0]
            body = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod_name,
                    "namespace": ns,
                    "labels": dict(template.get("metadata", {}).get("labels", {})),
                },
                "spec": copy.deepcopy(template.get("spec", {})),
                "status": {
                    "phase": phase,
                    "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                    "containerStatuses": [
                        {
                            "name": container.get("name", "c"),
                            "image": container.get("image", ""),
                            "imageID": "",
                            "ready": ready,
                            "restartCount": 0,
                            "state": {"waiting": waiting} if waiting else {"running": {}},
                        }
                    ],
                },
            }
            key = ("v1/pods", ns, pod_name)
            try:
                obj = self.emu.objects[key]
            except KeyError:
                obj = None
            if obj is not None and not obj.deleted:
                if obj.raw.get("status") != body["status"]:
                    obj["status"] = body["status"]
            else:
                self.emu.objects[key] = body

    def _pod_state(self, ns: str, pod_name: str, template: dict[str, Any]) -> tuple[str, bool, dict[str, Any] | None]:
        image = ((template.get("spec", {}).get("containers") or [{}])[0]).get("image", "")
        if image in self.broken_images:
            return "Pending", False, {"reason": "ErrImagePull", "message": f"pull access denied for {image}"}
        born = self._born.get((ns, pod_name))
        if self.hold or born is None or asyncio.get_running_loop().time() - born < self.ready_after:
            return "Pending", False, {"reason": "ContainerCreating"}
        return "Running", True, None


# --- a network partition between one client and the emulator -------------------------------


class Partition:
    """A TCP proxy in front of the emulator. ``cut = True`` turns it into a black hole:
    requests are swallowed and never answered (the worst kind of outage: calls hang
    until their own timeout), including on pooled keep-alive connections."""

    def __init__(self, port: int) -> None:
        self.upstream_port = port
        self.cut = False
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Partition:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self.cut:
                        continue  # swallowed
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        tasks = [asyncio.create_task(pump(reader, up_writer)), asyncio.create_task(pump(up_reader, writer))]
        self._tasks.update(tasks)
        for task in tasks:
            task.add_done_callback(self._tasks.discard)
