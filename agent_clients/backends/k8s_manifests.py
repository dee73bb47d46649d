"""Kubernetes objects for one session, built by pure functions (the kubespawner
``objects.py`` idea): session spec + agent id + namespace in, plain dicts out.

Every name is a valid DNS-1123 label (lowercase ``[a-z0-9-]``, at most 63 characters,
starting with a letter so it is also a valid Service name) for ANY session id; when the
id had to be changed to fit (sanitised or truncated) a stable hash of the original is
appended, so two different ids never share a name by accident. Label values are
sanitised the same way; the original session id and owner ride along in annotations.

Bad input (an image reference that cannot be pulled by anybody, absurd limits) raises
:class:`BackendError` with ``retryable=False`` before any API call is made.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from typing import Any

from agent_clients.backends import egress as eg
from agent_clients.backends.base import DEFAULT_MIN_CPU, DEFAULT_MIN_MEMORY_MB, BackendError, SessionSpec

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "streamspace"
LABEL_SESSION = "streamspace.io/session"
LABEL_OWNER = "streamspace.io/owner"
LABEL_AGENT = "streamspace.io/agent"
ANNOTATION_SESSION_ID = "streamspace.io/session-id"
ANNOTATION_OWNER = "streamspace.io/owner"
ANNOTATION_TEMPLATE = "streamspace.io/template"
# The session's egress policy, kept on its objects so a wake can rebuild its NetworkPolicy.
ANNOTATION_EGRESS = "streamspace.io/egress"
ANNOTATION_EGRESS_ALLOW = "streamspace.io/egress-allow"

VNC_PASSWORD_KEY = "VNC_PASSWORD"  # noqa: S105 (the key name, not a password)
CONTAINER_NAME = "desktop"
HOME_VOLUME = "home"
DEFAULT_HOME_SIZE = "10Gi"

# The agent's own floor by default (SESSION_MIN_CPU / SESSION_MIN_MEMORY_MB): below it a
# quantity could round to "0" (no request, no limit) or charge next to nothing.
MAX_CPU = 64.0  # cores
MAX_MEMORY_MB = 256 * 1024

_NAME_PREFIX = "ss-"
_LONGEST_SUFFIX = "-home"  # names are <base>, <base>-vnc, <base>-home
_DNS_MAX = 63
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS_LABEL_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME_RE = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")

# The Docker distribution reference grammar (github.com/distribution/reference), simplified:
# [registry[:port]/]path[:tag][@sha256:digest], path components lowercase.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
# A first component is a registry only if it looks like one: has a dot, a port, or is localhost.
_DOMAIN = rf"(?:localhost(?::[0-9]+)?|{_HOST}(?:\.{_HOST})+(?::[0-9]+)?|{_HOST}:[0-9]+)"
_IMAGE_RE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?(?:@sha256:[a-f0-9]{{64}})?$"
)


def _hash(raw: str, n: int = 8) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:n]


def dns_label(raw: str, *, max_len: int = _DNS_MAX, prefix: str = "") -> str:
    """A valid DNS-1123 label (starting with a letter) for any string, deterministic.

    The original survives untouched when it already fits; otherwise it is lowercased,
    every run of characters outside ``[a-z0-9]`` becomes one ``-``, it is cut to fit,
    and ``-<8 hex of sha256(original)>`` is appended.
    """
    candidate = prefix + raw
    if len(candidate) <= max_len and _DNS_LABEL_RE.match(candidate):
        return candidate
    cleaned = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")
    suffix = "-" + _hash(raw)
    room = max_len - len(prefix) - len(suffix)
    body = cleaned[:room].strip("-")
    name = f"{prefix}{body}{suffix}" if body else f"{prefix}x{suffix}"
    if not name[0].isalpha():
        name = ("x" + name)[:max_len]
    return name


def label_value(raw: str) -> str:
    """A valid label value (<= 63, alphanumeric at both ends, ``-_.`` inside) for any string."""
    if len(raw) <= _DNS_MAX and _LABEL_VALUE_RE.match(raw):
        return raw
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("-_.")
    suffix = _hash(raw)
    body = cleaned[: _DNS_MAX - len(suffix) - 1].rstrip("-_.")
    return f"{body}-{suffix}" if body else suffix


def base_name(session_id: str) -> str:
    """The Deployment and Service name of a session; the Secret and PVC add a suffix."""
    return dns_label(session_id, max_len=_DNS_MAX - len(_LONGEST_SUFFIX), prefix=_NAME_PREFIX)


def deployment_name(session_id: str) -> str:
    return base_name(session_id)


def service_name(session_id: str) -> str:
    return base_name(session_id)


def secret_name(session_id: str) -> str:
    return base_name(session_id) + "-vnc"


def pvc_name(session_id: str) -> str:
    return base_name(session_id) + "-home"


def network_policy_name(session_id: str) -> str:
    return base_name(session_id) + "-net"


def session_selector(session_id: str) -> dict[str, str]:
    """The labels that pick one session's pods (the Deployment's selector)."""
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_SESSION: label_value(session_id)}


def agent_selector(agent_id: str) -> str:
    """The label selector of everything one agent manages."""
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_AGENT}={label_value(agent_id)}"


def labels(spec: SessionSpec, agent_id: str) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_SESSION: label_value(spec.session_id),
        LABEL_OWNER: label_value(spec.owner or "unknown"),
        LABEL_AGENT: label_value(agent_id),
    }


def annotations(spec: SessionSpec) -> dict[str, str]:
    return {
        ANNOTATION_SESSION_ID: spec.session_id,
        ANNOTATION_OWNER: spec.owner,
        ANNOTATION_TEMPLATE: spec.template,
        ANNOTATION_EGRESS: spec.egress,
        ANNOTATION_EGRESS_ALLOW: ",".join(spec.egress_allow),
    }


def spec_for_policy(session_id: str, notes: dict[str, str]) -> SessionSpec:
    """The part of a session's spec its NetworkPolicy needs, from an object's annotations
    (a session made before they existed gets the default policy, ``internet``)."""
    return SessionSpec(
        session_id=session_id,
        owner=notes.get(ANNOTATION_OWNER, ""),
        image="-",
        template=notes.get(ANNOTATION_TEMPLATE, ""),
        egress=notes.get(ANNOTATION_EGRESS) or eg.DEFAULT_MODE,
        egress_allow=tuple(e for e in notes.get(ANNOTATION_EGRESS_ALLOW, "").split(",") if e),
    )


def _metadata(name: str, spec: SessionSpec, agent_id: str, namespace: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels(spec, agent_id), "annotations": annotations(spec)}


def cpu_quantity(cores: float) -> str:
    """Millicores, rounded, never "0m" (validate refuses less than 0.001 cores anyway)."""
    return f"{max(1, round(cores * 1000))}m"


def memory_quantity(mb: int) -> str:
    return f"{max(1, mb)}Mi"


def validate(
    spec: SessionSpec,
    *,
    home_size: str = DEFAULT_HOME_SIZE,
    egress_proxy: tuple[str, int] | None = None,
    min_cpu: float = DEFAULT_MIN_CPU,
    min_memory_mb: int = DEFAULT_MIN_MEMORY_MB,
) -> None:
    """Raise a non-retryable BackendError naming what is wrong with the spec."""

    def bad(message: str) -> BackendError:
        return BackendError(message, retryable=False)

    if not spec.session_id:
        raise bad("session id is empty")
    image = spec.image.strip()
    if not image or len(image) > 512 or not _IMAGE_RE.match(image):
        raise bad(f"invalid image reference {spec.image[:200]!r}: expected [registry/]name[:tag][@sha256:digest]")
    min_cpu = max(min_cpu, 0.001)  # one millicore: the smallest quantity that is not "0"
    number = isinstance(spec.cpu, (int, float)) and not isinstance(spec.cpu, bool)
    if not (number and math.isfinite(spec.cpu) and min_cpu <= spec.cpu <= MAX_CPU):
        raise bad(f"cpu must be at least {min_cpu:g} and at most {MAX_CPU:g} cores, got {spec.cpu!r}")
    whole = isinstance(spec.memory_mb, int) and not isinstance(spec.memory_mb, bool)
    if not (whole and max(min_memory_mb, 1) <= spec.memory_mb <= MAX_MEMORY_MB):
        raise bad(f"memory must be between {min_memory_mb} MiB and {MAX_MEMORY_MB} MiB, got {spec.memory_mb!r}")
    if not (isinstance(spec.vnc_port, int) and 1 <= spec.vnc_port <= 65535):
        raise bad(f"VNC port must be between 1 and 65535, got {spec.vnc_port!r}")
    if not spec.home_path.startswith("/") or spec.home_path == "/" or ":" in spec.home_path:
        raise bad(f"home path must be an absolute path other than '/', got {spec.home_path!r}")
    for name in spec.env:
        if not _ENV_NAME_RE.match(name):
            raise bad(f"invalid environment variable name {name[:100]!r}")
    if not _QUANTITY_RE.match(home_size):
        raise bad(f"invalid home volume size {home_size!r}")
    try:
        eg.check_policy(spec.egress, spec.egress_allow, egress_proxy)
    except ValueError as exc:
        raise bad(f"invalid egress policy: {exc}") from None


# DNS: the cluster's resolver (kube-dns / CoreDNS, label k8s-app=kube-dns in kube-system).
KUBE_DNS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}


def _ports(port: int, protocols: tuple[str, ...] = ("TCP", "UDP")) -> list[dict[str, Any]]:
    return [{"protocol": p, "port": port} for p in protocols]


def make_network_policy(
    spec: SessionSpec, agent_id: str, namespace: str, *, egress_proxy: tuple[str, int] | None = None
) -> dict[str, Any]:
    """The session pod's egress policy (agent_clients.backends.egress): ``internet`` = 0.0.0.0/0
    except the private and special ranges, plus DNS to kube-dns; ``none`` = nothing;
    ``proxy`` = the agent's proxy only; ``egress_allow`` entries on top of any mode.
    Egress only: ingress (the agent's port-forward goes through the kubelet) is unchanged."""
    rules: list[dict[str, Any]] = []
    if spec.egress == "internet":
        rules.append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(eg.BLOCKED_V4)}}]})
        rules.append({"to": [KUBE_DNS_PEER], "ports": _ports(53, ("UDP", "TCP"))})
    elif spec.egress == "proxy" and egress_proxy is not None:
        proxy_peer = {"ipBlock": {"cidr": f"{egress_proxy[0]}/32"}}
        rules.append({"to": [proxy_peer], "ports": _ports(egress_proxy[1], ("TCP",))})
    for entry in eg.parse_allow(list(spec.egress_allow)):
        rule: dict[str, Any] = {}
        if entry.network is not None:
            rule["to"] = [{"ipBlock": {"cidr": entry.network}}]
        else:  # a bare port: public addresses only (never the metadata service, the LAN, nodes)
            rule["to"] = [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(eg.BLOCKED_V4)}}]
        if entry.port is not None:
            rule["ports"] = _ports(entry.port)
        rules.append(rule)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(network_policy_name(spec.session_id), spec, agent_id, namespace),
        "spec": {
            "podSelector": {"matchLabels": session_selector(spec.session_id)},
            "policyTypes": ["Egress"],
            "egress": rules,
        },
    }


def make_secret(spec: SessionSpec, agent_id: str, namespace: str) -> dict[str, Any]:
    """The per-session Secret holding the VNC password under key VNC_PASSWORD."""
    encoded = base64.b64encode(spec.vnc_password.encode("utf-8")).decode("ascii")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(secret_name(spec.session_id), spec, agent_id, namespace),
        "type": "Opaque",
        "data": {VNC_PASSWORD_KEY: encoded},
    }


def make_pvc(
    spec: SessionSpec,
    agent_id: str,
    namespace: str,
    *,
    size: str = DEFAULT_HOME_SIZE,
    storage_class: str | None = None,
) -> dict[str, Any]:
    """The session's home volume (ReadWriteOnce); it outlives hibernation."""
    pvc_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if storage_class:
        pvc_spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(pvc_name(spec.session_id), spec, agent_id, namespace),
        "spec": pvc_spec,
    }


def make_service(spec: SessionSpec, agent_id: str, namespace: str) -> dict[str, Any]:
    """A ClusterIP Service on the VNC port (cluster-internal; the agent itself port-forwards)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(service_name(spec.session_id), spec, agent_id, namespace),
        "spec": {
            "type": "ClusterIP",
            "selector": session_selector(spec.session_id),
            "ports": [{"name": "vnc", "port": spec.vnc_port, "targetPort": "vnc", "protocol": "TCP"}],
        },
    }


def make_deployment(
    spec: SessionSpec,
    agent_id: str,
    namespace: str,
    *,
    hibernated: bool = False,
    egress_proxy: tuple[str, int] | None = None,
    min_cpu: float = DEFAULT_MIN_CPU,
    min_memory_mb: int = DEFAULT_MIN_MEMORY_MB,
) -> dict[str, Any]:
    """One pod running the session image: replicas 1, or 0 when hibernated."""
    validate(spec, egress_proxy=egress_proxy, min_cpu=min_cpu, min_memory_mb=min_memory_mb)
    pod_labels = labels(spec, agent_id)
    env: list[dict[str, Any]] = [
        {"name": name, "value": value} for name, value in sorted(spec.desktop_env().items()) if name != VNC_PASSWORD_KEY
    ]
    if spec.egress == "proxy" and egress_proxy is not None:
        env += [{"name": k, "value": v} for k, v in eg.proxy_env(egress_proxy).items()]
    env.append(
        {
            "name": VNC_PASSWORD_KEY,
            "valueFrom": {"secretKeyRef": {"name": secret_name(spec.session_id), "key": VNC_PASSWORD_KEY}},
        }
    )
    amount = {"cpu": cpu_quantity(spec.cpu), "memory": memory_quantity(spec.memory_mb)}
    container = {
        "name": CONTAINER_NAME,
        "image": spec.image.strip(),
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "vnc", "containerPort": spec.vnc_port, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": dict(amount), "limits": dict(amount)},
        "volumeMounts": [{"name": HOME_VOLUME, "mountPath": spec.home_path}],
        "readinessProbe": {
            "tcpSocket": {"port": spec.vnc_port},
            "initialDelaySeconds": 1,
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(deployment_name(spec.session_id), spec, agent_id, namespace),
        "spec": {
            "replicas": 0 if hibernated else 1,
            # The home volume is ReadWriteOnce: never run two pods of one session at once.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": session_selector(spec.session_id)},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": annotations(spec)},
                "spec": {
                    # A desktop has no business talking to the Kubernetes API.
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "containers": [container],
                    "volumes": [
                        {"name": HOME_VOLUME, "persistentVolumeClaim": {"claimName": pvc_name(spec.session_id)}}
                    ],
                },
            },
        },
    }


def make_all(
    spec: SessionSpec,
    agent_id: str,
    namespace: str,
    *,
    home_size: str = DEFAULT_HOME_SIZE,
    storage_class: str | None = None,
    egress_proxy: tuple[str, int] | None = None,
    min_cpu: float = DEFAULT_MIN_CPU,
    min_memory_mb: int = DEFAULT_MIN_MEMORY_MB,
) -> list[dict[str, Any]]:
    """Every object of a session, in creation order (NetworkPolicy first: the pod never runs
    without it; Secret, PVC, Service, Deployment)."""
    validate(spec, home_size=home_size, egress_proxy=egress_proxy, min_cpu=min_cpu, min_memory_mb=min_memory_mb)
    return [
        make_network_policy(spec, agent_id, namespace, egress_proxy=egress_proxy),
        make_secret(spec, agent_id, namespace),
        make_pvc(spec, agent_id, namespace, size=home_size, storage_class=storage_class),
        make_service(spec, agent_id, namespace),
        make_deployment(
            spec, agent_id, namespace, egress_proxy=egress_proxy, min_cpu=min_cpu, min_memory_mb=min_memory_mb
        ),
    ]
