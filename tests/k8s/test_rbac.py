"""The kustomize manifests: they render, every object loads into the kubernetes client's
models with no unknown field, secrets are only referenced, and the agent's Role grants
exactly the API calls the agent code makes.

"The calls the agent makes" is the explicit table ``API_CALLS`` in k8s_backend.py and
k8s_leader.py. The Role is compared with that table both ways; the table is compared
with what the emulator actually saw during a full lifecycle (every request the agent
makes in every other test is also checked against the table, in conftest.py). The one
call the emulator cannot see is the ``pods/portforward`` WebSocket: that entry is
checked against the Role only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes
import pytest
import yaml

from agent_clients.backends import kubernetes as k8s_backend
from agent_clients.backends.base import SessionSpec
from agent_clients.leadership import lease as k8s_leader
from tests.k8s.emulator import FakeKubelet, api_client, calls
from tests.k8s.test_leader import candidate

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy/kubernetes/base"
OVERLAY = ROOT / "deploy/kubernetes/overlays/single-node"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
SECRET_ENV = {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "AGENT_TOKEN"}
GROUP_OF = {"deployments": "apps", "leases": "coordination.k8s.io", "networkpolicies": "networking.k8s.io"}
NOT_EMULATED = {("pods/portforward", "get"), ("pods/portforward", "create")}


@pytest.fixture(autouse=True, scope="module")
def _kubectl():
    """kubectl renders the manifests; it is part of this project's machines (no skip)."""
    assert Path(KUBECTL).exists(), f"{KUBECTL} is missing: install kubectl to render deploy/kubernetes"


def render(path: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(path)], check=True, capture_output=True, text=True, timeout=60)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def base():
    return render(BASE)


@pytest.fixture(scope="module")
def overlay():
    return render(OVERLAY)


# --- strict loading into the client's models ----------------------------------------------

_PRIMITIVE = {"str", "int", "float", "bool", "object", "datetime", "date", "bytes", "bytearray"}


def check_fields(data, type_name: str, path: str) -> None:
    """Every key must be a field of the model (the client's deserializer alone would
    silently drop a misspelt one)."""
    if type_name in _PRIMITIVE or data is None:
        return
    if match := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
        assert isinstance(data, list), f"{path}: expected a list"
        for i, item in enumerate(data):
            check_fields(item, match.group(1), f"{path}[{i}]")
        return
    if match := re.fullmatch(r"dict\(([^,]+), (.+)\)|Dict\[([^,]+), (.+)\]", type_name):
        assert isinstance(data, dict), f"{path}: expected a mapping"
        for key, value in data.items():
            check_fields(value, match.group(2) or match.group(4), f"{path}.{key}")
        return
    model = getattr(kubernetes.client.models, type_name)
    assert isinstance(data, dict), f"{path}: expected an object of {type_name}"
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    for key, value in data.items():
        assert key in by_json, f"{path}.{key}: no such field in {type_name}"
        check_fields(value, model.openapi_types[by_json[key]], f"{path}.{key}")


def load(obj: dict):
    group_version = obj["apiVersion"]
    version = group_version.split("/")[-1]
    type_name = version.capitalize() + obj["kind"]
    check_fields(obj, type_name, f"{obj['kind']}/{obj['metadata']['name']}")
    # The client's own deserialisation, with its required-field validation.
    return kubernetes.client.ApiClient().deserialize(json.dumps(obj), type_name, "application/json")


@pytest.mark.parametrize("which", ["base", "overlay"])
def test_manifests_render_and_load_strictly(which, request):
    objects = request.getfixturevalue(which)
    kinds = sorted({o["kind"] for o in objects})
    assert {"Deployment", "Service", "Job", "ServiceAccount", "Role", "RoleBinding"} <= set(kinds)
    for obj in objects:
        load(obj)


def test_a_misspelt_field_is_caught(base):
    dep = json.loads(json.dumps(next(o for o in base if o["kind"] == "Deployment")))
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolicyy"):
        load(dep)


def by_name(objects, kind, name):
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def containers(objects):
    for obj in objects:
        pod = None
        if obj["kind"] in ("Deployment", "Job"):
            pod = obj["spec"]["template"]["spec"]
        for c in (pod or {}).get("containers", []):
            yield obj, c


def test_the_processes(base):
    commands = {obj["metadata"]["name"]: c["command"] for obj, c in containers(base)}
    assert commands["streamspace-control-plane"] == [
        "daphne", "-b", "0.0.0.0", "-p", "8000", "--websocket_timeout", "-1", "--websocket_connect_timeout", "30",
        "streamspace.asgi:application",
    ]  # fmt: skip
    assert commands["streamspace-celery-worker"][:4] == ["celery", "-A", "streamspace", "worker"]
    assert commands["streamspace-celery-beat"][:4] == ["celery", "-A", "streamspace", "beat"]
    assert commands["streamspace-migrate"] == ["python", "manage.py", "migrate", "--noinput"]
    assert commands["streamspace-agent"] == ["python", "-m", "agent_clients.k8s_agent"]
    cp = by_name(base, "Deployment", "streamspace-control-plane")["spec"]["template"]["spec"]["containers"][0]
    assert cp["image"] == "streamspace/control-plane:latest"
    assert cp["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert cp["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert cp["ports"][0]["containerPort"] == 8000
    svc = by_name(base, "Service", "streamspace-control-plane")
    assert (
        svc["spec"]["selector"].items()
        <= by_name(base, "Deployment", "streamspace-control-plane")["spec"]["template"]["metadata"]["labels"].items()
    )
    assert by_name(base, "Deployment", "streamspace-celery-beat")["spec"]["replicas"] == 1


def test_agent_deployment(base):
    dep = by_name(base, "Deployment", "streamspace-agent")
    pod = dep["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["HA_BACKEND"]["value"] == "lease"
    assert env["AGENT_ID"]["value"] and env["CONTROL_PLANE_URL"]["value"].startswith("http")
    assert pod["serviceAccountName"] == "streamspace-agent"
    binding = by_name(base, "RoleBinding", "streamspace-agent")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "streamspace-agent"}
    assert binding["subjects"][0]["kind"] == "ServiceAccount" and binding["subjects"][0]["name"] == "streamspace-agent"


@pytest.mark.parametrize("which", ["base", "overlay"])
def test_secrets_are_referenced_never_literal(which, request):
    objects = request.getfixturevalue(which)
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    seen = set()
    for obj, c in containers(objects):
        for e in c.get("env", []):
            if e["name"] in SECRET_ENV:
                seen.add(e["name"])
                assert "value" not in e, f"{obj['metadata']['name']}: {e['name']} is a literal"
                ref = e["valueFrom"]["secretKeyRef"]
                assert ref["key"] == e["name"]
                if which == "overlay":  # the generated Secret exists and has the key
                    assert ref["key"] in secrets[ref["name"]]["data"]
    assert seen == SECRET_ENV


def test_single_node_overlay(overlay):
    for obj in overlay:
        if obj["kind"] == "Deployment":
            assert obj["spec"]["replicas"] == 1, obj["metadata"]["name"]
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "streamspace"
    assert by_name(overlay, "RoleBinding", "streamspace-agent")["subjects"][0]["namespace"] == "streamspace"
    for secret in (o for o in overlay if o["kind"] == "Secret"):
        for key, value in secret["data"].items():
            assert "PLACEHOLDER" in base64.b64decode(value).decode(), f"{key} is not marked as a placeholder"


# --- the Role against the agent's calls ------------------------------------------------------


def granted(objects) -> set[tuple[str, str]]:
    role = by_name(objects, "Role", "streamspace-agent")
    pairs = set()
    for rule in role["rules"]:
        assert "resourceNames" not in rule or rule["resourceNames"]
        for resource in rule["resources"]:
            assert rule["apiGroups"] == [GROUP_OF.get(resource.split("/")[0], "")], resource
            for verb in rule["verbs"]:
                assert verb != "*" and resource != "*"
                pairs.add((resource, verb))
    return pairs


@pytest.mark.parametrize("which", ["base", "overlay"])
def test_role_grants_exactly_what_the_code_calls(which, request):
    declared = k8s_backend.API_CALLS | k8s_leader.API_CALLS
    role = granted(request.getfixturevalue(which))
    assert role - declared == set(), "granted but never called"
    assert declared - role == set(), "called but not granted"


@pytest.mark.asyncio
async def test_the_call_table_matches_what_the_agent_really_does(emulator):
    """Every declared call (but the port-forward WebSocket, which the emulator cannot
    serve) shows up in the emulator's request log of one full lifecycle, and nothing
    else does."""
    backend = k8s_backend.KubernetesBackend(
        api_client(emulator), namespace="streamspace", agent_id="a1", ready_timeout=3, poll_interval=0.05
    )
    s = SessionSpec(session_id="s1", owner="alice", image="streamspace/desktop:1", vnc_password="pw")
    async with FakeKubelet(emulator):
        await asyncio.to_thread(backend.create, s)
        await asyncio.to_thread(backend.create, s)  # idempotent: reads what exists
        await asyncio.to_thread(backend.list_sessions)
        await asyncio.to_thread(backend.hibernate, s.session_id)
        await asyncio.to_thread(backend.wake, s.session_id)
        await asyncio.to_thread(backend.status, s.session_id)
        await asyncio.to_thread(backend.terminate, s.session_id)
    leader = candidate(emulator, "replica-a")
    await leader.acquire()
    await asyncio.sleep(0.5)  # renewals
    await leader.release()

    seen = calls(emulator)
    declared = k8s_backend.API_CALLS | k8s_leader.API_CALLS
    assert seen - declared == set(), "called but not declared"
    assert declared - NOT_EMULATED - seen == set(), "declared but never called"
